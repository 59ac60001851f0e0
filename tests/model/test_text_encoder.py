"""Prompt/token encoding: truncating to the longest prompt is exact; chunking and checkpointing
agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny_world
from p4q_lightning import calibrate, quantize
from p4q_lightning.model import text_encoder
from p4q_lightning.model.build import build_teacher
from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import (
    TextTower,
    encode_prompts,
    encode_tokens,
    length_pieces,
    template_text_features,
)

NAMES = ["red circle", "blue square", "green triangle", "cat"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    cfg = tiny_world.write_model_config(tmp_path_factory.mktemp("cfg"))
    return build_teacher(tiny_world.MODEL_NAME, None, str(cfg))


@pytest.fixture(scope="module")
def student(clip):
    model, tok = clip
    s = quantize(model, "w4a4")
    calibrate(
        s,
        images=[torch.randn(4, 3, 32, 32)],
        texts=[tok([f"a {n}." for n in NAMES])],
        progress=False,
    )
    return s


def _full_length(pl, model, prompts):
    """The same prompts padded to the full context with the pad token's embedding."""
    tower = TextTower(model)
    pad = tower.token_embedding(torch.zeros(1, dtype=torch.long))
    extra = tower.context_length - prompts.shape[1]
    return torch.cat([prompts, pad.expand(prompts.shape[0], extra, -1)], dim=1)


@pytest.mark.parametrize("which", ["float", "w4a4"])
def test_truncated_prompts_equal_full_context(clip, student, which):
    model = clip[0] if which == "float" else student
    tower = TextTower(model)
    pl = PromptLearner(NAMES, clip[1], tower.width, n_ctx=4)
    pl.set_token_embedding(tower.token_embedding)
    prompts = pl()
    assert prompts.shape[1] < tower.context_length
    short = encode_prompts(model, prompts, pl.eot_index)
    full = encode_prompts(model, _full_length(pl, model, prompts), pl.eot_index)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["float", "w4a4"])
def test_encode_tokens_matches_open_clip_encode_text(clip, student, which):
    model = clip[0] if which == "float" else student
    tokens = clip[1]([f"a photo of a {n}." for n in NAMES] + ["x"])
    torch.testing.assert_close(
        encode_tokens(model, tokens, chunk_size=2), model.encode_text(tokens), rtol=1e-5, atol=1e-5
    )


def test_chunking_and_checkpointing_give_the_same_features_and_gradients(clip, student):
    tower = TextTower(student)
    pl = PromptLearner(NAMES, clip[1], tower.width, n_ctx=4)
    pl.set_token_embedding(tower.token_embedding)
    results = []
    for chunk, ckpt in ((None, False), (3, False), (1, True)):
        pl.ctx.grad = None
        feats = encode_prompts(student, pl(), pl.eot_index, chunk_size=chunk, checkpointing=ckpt)
        feats.sum().backward()
        results.append((feats.detach(), pl.ctx.grad.clone()))
    for feats, grad in results[1:]:
        torch.testing.assert_close(feats, results[0][0])
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-4)


def test_length_pieces_group_sorted_lengths_and_respect_the_chunk_size():
    # 60 short prompts, 30 medium, 2 long: padding all to the longest would triple the work
    eot = torch.tensor([3] * 60 + [9] * 30 + [20] * 2)[torch.randperm(92)]
    pieces = length_pieces(eot, chunk_size=1000)
    assert sum(size for size, _ in pieces) == 92
    assert [length for _, length in pieces] == sorted(length for _, length in pieces)
    assert pieces == [(60, 4), (30, 10), (2, 21)]  # each group pays far more than a piece
    padded = sum(size * length for size, length in pieces)
    assert padded == int((eot + 1).sum())
    chunked = length_pieces(eot, chunk_size=25)
    assert max(size for size, _ in chunked) <= 25
    assert sum(size for size, _ in chunked) == 92
    # a lone length just above a big group joins it rather than paying a piece of its own
    assert length_pieces(torch.tensor([5] * 50 + [6]), chunk_size=1000) == [(51, 7)]


@pytest.mark.parametrize("chunk, ckpt, shared", [(None, False, False), (2, True, True)])
def test_pieces_by_length_equal_one_class_at_a_time(
    clip, student, monkeypatch, chunk, ckpt, shared
):
    """Classes sorted into pieces of similar length, each truncated to its own longest prompt,
    give every class the features and context gradient it gets alone, in the original order."""
    names = ["cat", "big red round striped thing", "dog", "red", "small blue square", "ox"]
    tower = TextTower(student)
    pl = PromptLearner(names, clip[1], tower.width, n_ctx=2)
    pl.set_token_embedding(tower.token_embedding)
    # six classes: let every length have its own piece (the overhead term would merge them)
    monkeypatch.setattr(text_encoder, "PIECE_OVERHEAD_POSITIONS", 0)
    prefix = pl.shared_prefix_length if shared else 0
    assert prefix == (3 if shared else 0)  # SOS and the two context vectors
    lengths = []
    name = "encode_rest" if shared else "encode_embeddings"
    original = getattr(TextTower, name)

    def spy(self, *args, **kwargs):
        x = args[1] if shared else args[0]
        lengths.append((x.shape[0], x.shape[1]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TextTower, name, spy)
    feats = encode_prompts(
        student, pl(), pl.eot_index, chunk_size=chunk, checkpointing=ckpt, shared_prefix=prefix
    )
    pieces = list(lengths)  # the forward's (checkpointing runs them again in the backward)
    feats.sum().backward()
    grad, pl.ctx.grad = pl.ctx.grad.clone(), None
    assert sum(n for n, _ in pieces) == len(names)
    assert sum(n * length for n, length in pieces) < len(names) * (pl.seq_len - prefix)
    alone = []
    for i in range(len(names)):
        length = int(pl.eot_index[i]) + 1
        one = encode_prompts(student, pl()[i : i + 1, :length], pl.eot_index[i : i + 1])
        one.sum().backward()
        alone.append(one.detach())
    torch.testing.assert_close(feats.detach(), torch.cat(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, pl.ctx.grad, rtol=1e-4, atol=1e-4)


def test_template_classifier_is_the_normalised_mean_of_normalised_templates(clip):
    model, tok = clip
    templates = ["a photo of a {}.", "a {}."]
    got = template_text_features(model, tok, NAMES[:2], templates)
    for i, name in enumerate(NAMES[:2]):
        f = F.normalize(model.encode_text(tok([t.format(name) for t in templates])), dim=-1).mean(0)
        torch.testing.assert_close(got[i], F.normalize(f, dim=-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="placeholder"):
        template_text_features(model, tok, NAMES, ["no slot"])


def test_checkpointing_keeps_the_narrow_matmuls_instead_of_recomputing_them(
    clip, student, monkeypatch
):
    """Selective checkpointing: the backward recomputes fewer FLOPs than a whole-chunk
    recomputation (the features and gradients are the same, see above)."""
    from torch.utils.checkpoint import noop_context_fn
    from torch.utils.flop_counter import FlopCounterMode

    tower = TextTower(student)
    pl = PromptLearner(NAMES, clip[1], tower.width, n_ctx=4)
    pl.set_token_embedding(tower.token_embedding)

    def flops() -> int:
        with FlopCounterMode(display=False) as counter:
            encode_prompts(
                student, pl(), pl.eot_index, chunk_size=2, checkpointing=True
            ).sum().backward()
        return counter.get_total_flops()

    selective = flops()
    monkeypatch.setattr(text_encoder, "_keep_narrow_matmuls", noop_context_fn)
    whole = flops()
    with FlopCounterMode(display=False) as counter:
        encode_prompts(student, pl(), pl.eot_index, chunk_size=2).sum().backward()
    plain = counter.get_total_flops()
    assert plain < selective < whole
