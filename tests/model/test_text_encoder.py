"""Prompt/token encoding: truncating to the longest prompt is exact; chunking and checkpointing
agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny_world
from p4q_lightning import calibrate, quantize
from p4q_lightning.model.build import build_teacher
from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import (
    TextTower,
    encode_prompts,
    encode_tokens,
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


def test_template_classifier_is_the_normalised_mean_of_normalised_templates(clip):
    model, tok = clip
    templates = ["a photo of a {}.", "a {}."]
    got = template_text_features(model, tok, NAMES[:2], templates)
    for i, name in enumerate(NAMES[:2]):
        f = F.normalize(model.encode_text(tok([t.format(name) for t in templates])), dim=-1).mean(0)
        torch.testing.assert_close(got[i], F.normalize(f, dim=-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="placeholder"):
        template_text_features(model, tok, NAMES, ["no slot"])
