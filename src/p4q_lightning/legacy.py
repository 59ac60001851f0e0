"""Every layout of version 0.1.0 that is still read, in one place, and why.

Each entry of :data:`STILL_READ` names a layout, what wrote it, where it is read and why it is
kept; the code below is all the translation there is (plain dicts and names, no torch, so every
layer may import it). A layout leaves the list, with its code and its test, once nothing in use
writes it.

Nothing here is chosen by a file: a file only decides whether a fixed renaming applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    """One old layout that is still read."""

    name: str
    written_by: str
    read_in: str
    why: str


STILL_READ: tuple[Layout, ...] = (
    Layout(
        "flat hyper-parameters (n_ctx, prompt_lr, adapter: true/false ...)",
        "checkpoints saved before the option groups",
        "training/checkpointing.py (settings check), commands/export.py (rebuild the module)",
        "a trained run's checkpoint must still evaluate, resume and export",
    ),
    Layout(
        "flat options in a config or on the command line (--model.n_ctx ...)",
        "configs and scripts written for the flat layout",
        "cli.py (refuse_moved_options)",
        "refused in one line naming each option's new place, instead of jsonargparse's usage",
    ),
    Layout(
        "unprefixed slim-checkpoint keys (prompt_learner.ctx, student. ...)",
        "checkpoints saved before the classifier was its own module",
        "training/checkpointing.py (load_state_dict)",
        "such checkpoints load into today's P4QModule",
    ),
    Layout(
        "attention keys before the in_proj leaf (attn.in_proj_weight, attn.input_quantizer ...)",
        "slim checkpoints and export formats 1-2",
        "quant/modules.py (QuantMultiheadAttention's load pre-hook), export/loader.py",
        "their quantizer ranges and weights load into the attention's in_proj leaf",
    ),
    Layout(
        "format-1 adapter description {'target': '<import path>', 'init': ...}",
        "export format 1",
        "export/adapters.py (check_config)",
        "the one known import path is read as the low_bit_adapter kind (never imported)",
    ),
)


# --- flat hyper-parameters and options ------------------------------------------------------

#: Flat option names before the groups existed -> (group, field).
FLAT_NAMES: dict[str, tuple[str, str]] = {
    "n_ctx": ("prompt", "n_ctx"),
    "ctx_init": ("prompt", "ctx_init"),
    "class_specific": ("prompt", "class_specific"),
    "class_token_position": ("prompt", "class_token_position"),
    "ctx_init_std": ("prompt", "init_std"),
    "text_chunk_size": ("prompt", "chunk_size"),
    "text_checkpointing": ("prompt", "checkpointing"),
    "adapter_reduction": ("adapter", "reduction"),
    "adapter_ratio": ("adapter", "ratio"),
    "adapter_bias": ("adapter", "bias"),
    "ce_weight": ("loss", "ce_weight"),
    "distill_weight": ("loss", "distill_weight"),
    "distill_kind": ("loss", "distill_kind"),
    "distill_temperature": ("loss", "temperature"),
    "teacher_text": ("loss", "teacher_text"),
    "prompt_lr": ("optim", "prompt_lr"),
    "prompt_momentum": ("optim", "prompt_momentum"),
    "prompt_weight_decay": ("optim", "prompt_weight_decay"),
    "adapter_lr": ("optim", "adapter_lr"),
    "adapter_weight_decay": ("optim", "adapter_weight_decay"),
    "adapter_eps": ("optim", "adapter_eps"),
    "warmup_epochs": ("optim", "warmup_epochs"),
    "warmup_lr": ("optim", "warmup_lr"),
    "feature_views": ("features", "views"),
    "feature_cache_dir": ("features", "cache_dir"),
}


def group_flat_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters of an earlier version (flat ``n_ctx``, ``prompt_lr``...) in groups.

    ``adapter: true/false`` becomes ``adapter.enabled``. Grouped input is returned unchanged.
    """
    out: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in hparams.items():
        if key == "adapter" and isinstance(value, bool):
            grouped.setdefault("adapter", {})["enabled"] = value
        elif key in FLAT_NAMES:
            group, field = FLAT_NAMES[key]
            grouped.setdefault(group, {})[field] = value
        else:
            out[key] = value
    for group, values in grouped.items():
        existing = out.get(group)
        base = dataclasses.asdict(existing) if dataclasses.is_dataclass(existing) else existing
        out[group] = {**(dict(base) if isinstance(base, Mapping) else {}), **values}
    return out


def moved_options(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(old, new)`` names of the flat options in a config's model section (earlier layout),
    e.g. ``("model.n_ctx", "model.prompt.n_ctx")``."""
    moved = []
    for key, value in model.items():
        if key == "adapter" and isinstance(value, bool):
            moved.append(("model.adapter: true/false", "model.adapter.enabled"))
        elif key in FLAT_NAMES:
            group, field = FLAT_NAMES[key]
            moved.append((f"model.{key}", f"model.{group}.{field}"))
    return moved


# --- checkpoint keys ------------------------------------------------------------------------

#: top-level names of checkpoints written before the classifier was its own module
UNPREFIXED = ("teacher.", "student.", "prompt_learner.", "adapter.")


def with_classifier_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keys of the earlier checkpoint layout (``prompt_learner.ctx``) under ``prefix``
    (``classifier.``); keys of today's layout pass unchanged."""
    return {(prefix + k if k.startswith(UNPREFIXED) else k): v for k, v in state.items()}


#: State-dict names of the quantized attention before its q/k/v projection became the
#: ``in_proj`` leaf (slim checkpoints, export formats 1-2) -> the names now.
LEGACY_ATTENTION_KEYS: tuple[tuple[str, str], ...] = (
    ("in_proj_weight", "in_proj.weight"),
    ("in_proj_bias", "in_proj.bias"),
    ("input_quantizer.", "in_proj.input_quantizer."),
    ("weight_quantizer.", "in_proj.weight_quantizer."),
    ("weights_frozen", "in_proj.weights_frozen"),
)


def upgrade_attention_key(local: str) -> str | None:
    """The current name of an attention-local state-dict key in the old layout, else None."""
    for old, new in LEGACY_ATTENTION_KEYS:
        if old.endswith(".") and local.startswith(old):
            return new + local[len(old) :]
        if local == old:
            return new
    return None


def rename_attention_keys(state_dict: dict[str, Any], prefix: str) -> None:
    """Rename old-layout attention keys under ``prefix`` in place (new keys win); the body of
    the attention's load pre-hook."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = upgrade_attention_key(key[len(prefix) :])
        if new is not None and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(key)


# --- export files ---------------------------------------------------------------------------


def upgrade_export_attention_keys(
    owners: list[str], tensors: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    """Rename a format 1-2 file's attention names (``attn.in_proj_weight``...) to the
    ``in_proj`` leaf's, in the tensors and in the metadata's ``quantized``/``zeros`` maps.

    Only names under ``owners`` (the rebuilt model's attention modules, each ending in ``.``)
    are touched; ``info`` is edited in place and the renamed tensor dict returned.
    """

    def rename(key: str) -> str:
        for owner in owners:
            if key.startswith(owner):
                new = upgrade_attention_key(key[len(owner) :])
                return key if new is None else owner + new
        return key

    for table in ("quantized", "zeros"):
        if isinstance(info.get(table), dict):
            info[table] = {rename(k): v for k, v in info[table].items()}
    return {rename(k): t for k, t in tensors.items()}


#: the one import path format-1 files named their adapter by
LEGACY_ADAPTER_TARGET = "p4q_lightning.model.adapter:LowBitAdapter"


def upgrade_adapter_config(config: Any, kind: str) -> Any:
    """A format-1 adapter description (``target`` = :data:`LEGACY_ADAPTER_TARGET`) as today's
    ``{"kind": kind, "init": ...}``; any other value is returned unchanged (and validated by
    the caller). Only this exact string is understood, looked up as data, never imported."""
    if not (isinstance(config, Mapping) and config.get("target") == LEGACY_ADAPTER_TARGET):
        return config
    init = config.get("init")
    if isinstance(init, Mapping) and isinstance(init.get("spec"), Mapping):
        init = {**init, "spec": {k: v for k, v in init["spec"].items() if k != "__type__"}}
    return {"kind": kind, "init": init}
