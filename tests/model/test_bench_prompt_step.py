"""The benchmark's plain CoOp step computes what P4Q's text path computes on a float tower
(same prompts, 77 tokens instead of truncated and shared-prefix), so its timings compare like
with like."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import open_clip
import torch

from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import encode_prompts

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_prompt_step.py"


def _bench():
    if str(SCRIPT.parent) not in sys.path:  # the script imports its sibling bench_text_memory
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_prompt_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_coop_text_features_equal_the_shared_prefix_path():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    names = _bench().classnames(5)
    plain = _bench().PlainCoOp(model, tokenizer, names, n_ctx=16)
    pl = PromptLearner(names, tokenizer, 64, n_ctx=16)
    pl.ctx.data.copy_(plain.ctx.data)
    pl.set_token_embedding(model.token_embedding)
    ours = encode_prompts(model, pl(), pl.eot_index, shared_prefix=pl.shared_prefix_length)
    assert pl.shared_prefix_length == 17
    torch.testing.assert_close(plain.text_features().detach(), ours.detach(), rtol=1e-5, atol=1e-5)
