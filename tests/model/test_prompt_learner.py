"""PromptLearner: registration, layouts, init, transfer, and gradients through a w4a4 tower."""

from __future__ import annotations

import pytest
import torch

import tiny_world
from p4q_lightning import calibrate, quantize
from p4q_lightning.model.build import build_teacher
from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import TextTower, encode_prompts

NAMES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    cfg = tiny_world.write_model_config(tmp_path_factory.mktemp("cfg"))
    return build_teacher(tiny_world.MODEL_NAME, None, str(cfg))


def make(clip, names=NAMES, **kw):
    model, tok = clip
    tower = TextTower(model)
    pl = PromptLearner(
        names, tok, tower.width, init_embedding=tower.token_embedding, **{"n_ctx": 4, **kw}
    )
    pl.set_token_embedding(tower.token_embedding)
    return pl


def test_context_is_the_only_saved_parameter(clip):
    pl = make(clip)
    assert [n for n, p in pl.named_parameters()] == ["ctx"]
    assert pl.ctx.is_leaf and pl.ctx.requires_grad
    assert list(pl.state_dict()) == ["ctx"]  # prefix/suffix embeddings are not saved
    assert pl.ctx.shape == (4, 64)
    assert torch.allclose(pl.ctx.std(), torch.tensor(0.02), rtol=0.3)


def test_class_specific_context_shape(clip):
    assert make(clip, class_specific=True).ctx.shape == (3, 4, 64)


def test_init_from_words_uses_their_token_embeddings(clip):
    model, tok = clip
    pl = make(clip, ctx_init="a photo of a", n_ctx=16)
    assert pl.n_ctx == 4
    ids = torch.tensor(tok.encode("a photo of a"))
    assert torch.equal(pl.ctx.data, model.token_embedding(ids))


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_layout_places_context_and_name_tokens(clip, position):
    model, tok = clip
    pl = make(clip, class_token_position=position)
    prompts = pl()
    name_ids = tok.encode(NAMES[2])  # "green triangle": 2 tokens
    row = prompts[2]
    ctx_pos = pl.ctx_mask[2].nonzero().flatten().tolist()
    expected_ctx = {"end": [1, 2, 3, 4], "front": [3, 4, 5, 6], "middle": [1, 2, 5, 6]}[position]
    assert ctx_pos == expected_ctx
    for slot, pos in enumerate(ctx_pos):
        assert torch.equal(row[pos], pl.ctx[slot])
    name_start = {"end": 5, "front": 1, "middle": 3}[position]
    for j, tid in enumerate(name_ids):
        assert torch.equal(row[name_start + j], model.token_embedding.weight[tid])
    assert pl.eot_index[2] == 4 + len(name_ids) + 2
    assert prompts.shape[1] == pl.seq_len == int(pl.eot_index.max()) + 1


def test_unified_context_loads_onto_another_class_list(clip):
    a = make(clip)
    b = make(clip, names=["yellow cross", "dog", "cat", "a very small bird", "car"])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.ctx, b.ctx)
    assert b().shape[0] == 5


def test_class_specific_context_refuses_another_class_count(clip):
    a = make(clip, class_specific=True)
    b = make(clip, names=["dog", "cat"], class_specific=True)
    with pytest.raises(ValueError, match="n_ctx"):
        b.load_state_dict(a.state_dict())


def test_too_long_class_name_is_a_clear_error(clip):
    with pytest.raises(ValueError, match="too long"):
        make(clip, names=["a " * 12 + "thing"], n_ctx=4)


@pytest.mark.parametrize("position,csc", [("end", False), ("middle", False), ("front", True)])
def test_gradient_reaches_every_context_position_through_w4a4_text_tower(clip, position, csc):
    model, tok = clip
    student = quantize(model, "w4a4")
    texts = [tok([f"a photo of a {n}." for n in NAMES])]
    calibrate(student, images=[torch.randn(4, 3, 32, 32)], texts=texts, progress=False)
    pl = make(clip, class_token_position=position, class_specific=csc)
    pl.set_token_embedding(TextTower(student).token_embedding)
    feats = encode_prompts(student, pl(), pl.eot_index)
    (feats.pow(2).sum()).backward()
    grad = pl.ctx.grad
    assert grad is not None
    per_position = grad.abs().reshape(-1, pl.n_ctx, grad.shape[-1]).sum(dim=-1)
    assert (per_position > 0).all(), per_position
    assert not any(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_all_imagenet_class_names_fit_and_truncate(position):
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    names = open_clip.IMAGENET_CLASSNAMES
    pl = PromptLearner(names, tok, 512, n_ctx=16, class_token_position=position)
    assert pl.n_cls == 1000 and pl.seq_len <= 31  # instead of 77 positions
    assert int(pl.ctx_mask.sum()) == 1000 * 16
