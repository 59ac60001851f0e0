"""Shared-prefix text encoding is exact: the prefix every class shares runs once, and features
and context gradients equal the full path's.

Tolerances. Float: the two paths add the same terms in another order (a softmax over P + R keys
instead of L keys with -inf entries, a batched-of-one prefix matmul), so they agree to float32
rounding: rtol 1e-5 on features and 1e-5 of the gradient's largest entry. Quantized (w4a4,
w8a8): every quantizer is static and per position, and q.k and probs.v of integer codes are
exact sums in float32, so the codes are the same unless a value sits on a rounding tie, where a
last-bit difference could move one code by one step. With these seeds no tie occurs, so the same
tolerances hold (a flipped code would show as an error of about one quantization step, far
above them).
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from torch import nn

import tiny_world
from p4q_lightning import calibrate, quantize
from p4q_lightning.model import shared_prefix as sp
from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import TextTower, encode_prompts, length_pieces
from p4q_lightning.module import P4QModule

NAMES = ["red circle", "blue square", "green triangle", "cat", "a very long class name"]


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def _tiny_clip() -> nn.Module:
    """open_clip's ``CLIP`` (text transformer with nn.MultiheadAttention and the causal mask),
    narrow and shallow."""
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    ).eval()


@pytest.fixture(scope="module")
def towers(tokenizer):
    model = _tiny_clip()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = tokenizer([f"a photo of a {n}." for n in NAMES])
    out = {"float": model}
    for preset in ("w4a4", "w8a8"):
        out[preset] = quantize(model, preset)
        calibrate(out[preset], images=[images], texts=[texts], progress=False)
    return out


@pytest.fixture()
def spy(monkeypatch):
    """Counts how often the shared prefix is encoded (proves the shared path ran)."""
    calls = {"prefix": 0}
    original = sp.encode_prefix

    def counting(*args, **kwargs):
        calls["prefix"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(sp, "encode_prefix", counting)
    return calls


def _learner(model, tokenizer, **kw) -> PromptLearner:
    tower = TextTower(model)
    torch.manual_seed(3)
    pl = PromptLearner(NAMES, tokenizer, tower.width, n_ctx=kw.pop("n_ctx", 6), **kw)
    pl.set_token_embedding(tower.token_embedding)
    return pl


def _features_and_grad(model, pl, shared, chunk=None, ckpt=False):
    pl.ctx.grad = None
    feats = encode_prompts(
        model, pl(), pl.eot_index, chunk_size=chunk, checkpointing=ckpt, shared_prefix=shared
    )
    weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(7))
    (feats * weights).sum().backward()
    return feats.detach(), pl.ctx.grad.clone()


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5 * want[0].abs().max().item())
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5 * want[1].abs().max().item())


def test_shared_prefix_length_per_class_token_position(tokenizer):
    n_ctx = 6
    for position, expected in (("end", 1 + n_ctx), ("middle", 1 + n_ctx // 2), ("front", 1)):
        pl = PromptLearner(NAMES, tokenizer, 64, n_ctx=n_ctx, class_token_position=position)
        assert pl.shared_prefix_length == expected, position
    csc = PromptLearner(NAMES, tokenizer, 64, n_ctx=n_ctx, class_specific=True)
    assert csc.shared_prefix_length == 1  # only SOS: class-specific context differs per class
    one = PromptLearner(["cat"], tokenizer, 64, n_ctx=n_ctx)
    assert one.shared_prefix_length == int(one.eot_index.min())  # never past the EOT token


@pytest.mark.parametrize("which", ["float", "w4a4", "w8a8"])
@pytest.mark.parametrize("chunk,ckpt", [(None, False), (2, False), (2, True), (None, True)])
def test_shared_prefix_equals_full_path(towers, tokenizer, spy, which, chunk, ckpt):
    model = towers[which]
    pl = _learner(model, tokenizer)
    assert pl.shared_prefix_length == 7
    full = _features_and_grad(model, pl, 0)
    assert spy["prefix"] == 0
    shared = _features_and_grad(model, pl, pl.shared_prefix_length, chunk, ckpt)
    assert spy["prefix"] == 1
    _assert_same(shared, full)


@pytest.mark.parametrize("which", ["float", "w4a4"])
def test_checkpointing_recomputes_each_blocks_mlp_widening_only(towers, tokenizer, which):
    """With a shared prefix, checkpointing recomputes in the backward pass exactly the MLP's
    ``c_fc`` matmuls of the per-class positions (and the elementwise work around them), and
    the features and context gradients are bitwise those without it."""
    from torch.utils.flop_counter import FlopCounterMode

    model = towers[which]
    pl = _learner(model, tokenizer)
    shared = pl.shared_prefix_length
    runs = {}
    for ckpt in (False, True):
        with FlopCounterMode(display=False) as counter:
            got = _features_and_grad(model, pl, shared, chunk=2, ckpt=ckpt)
        runs[ckpt] = counter.get_total_flops(), got
    positions = sum(n * length for n, length in length_pieces(pl.eot_index - shared, 2))
    width, layers = 64, 3
    c_fc = 2 * positions * width * 4 * width * layers
    assert runs[True][0] - runs[False][0] == c_fc
    for a, b in zip(runs[True][1], runs[False][1], strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("which", ["float", "w4a4"])
def test_middle_class_token_shares_the_prefix_up_to_the_name(towers, tokenizer, spy, which):
    model = towers[which]
    pl = _learner(model, tokenizer, class_token_position="middle")
    _assert_same(
        _features_and_grad(model, pl, pl.shared_prefix_length), _features_and_grad(model, pl, 0)
    )
    assert spy["prefix"] == 1


def test_front_and_class_specific_fall_back_to_the_full_path(towers, tokenizer, spy):
    model = towers["w4a4"]
    for kw in ({"class_token_position": "front"}, {"class_specific": True}):
        pl = _learner(model, tokenizer, **kw)
        _features_and_grad(model, pl, pl.shared_prefix_length)
    assert spy["prefix"] == 0


def test_range_tracking_quantizers_fall_back(towers, tokenizer, spy):
    """A quantizer that observes or tracks an EMA reads the whole batch: no split then."""
    model = towers["w8a8"]
    quantizer = model.transformer.resblocks[0].mlp.c_fc.input_quantizer
    assert TextTower(model).shared_prefix_supported()
    quantizer.mode = "ema"
    try:
        assert not TextTower(model).shared_prefix_supported()
    finally:
        quantizer.mode = "quant"


def test_wrong_shared_prefix_is_refused(towers, tokenizer):
    model = towers["float"]
    pl = _learner(model, tokenizer, class_token_position="front")
    with pytest.raises(ValueError, match="differ within their first"):
        encode_prompts(model, pl(), pl.eot_index, shared_prefix=4)
    with pytest.raises(ValueError, match="end-of-text"):
        encode_prompts(model, pl(), pl.eot_index, shared_prefix=40)


def test_int8_leaves_keep_the_shared_prefix_exact(towers, tokenizer, spy):
    """After ``convert_to_int8`` the attention is the same class with int8 ``in_proj`` and
    ``out_proj`` leaves; the attention core calls the leaves, so the shared path runs and stays
    exact (integer GEMMs act per position like the fake-quant layers)."""
    from p4q_lightning.export import Int8Linear, convert_to_int8

    model = convert_to_int8(copy.deepcopy(towers["w8a8"]))
    attn = model.transformer.resblocks[0].attn
    assert isinstance(attn.in_proj, Int8Linear) and isinstance(attn.out_proj, Int8Linear)
    assert TextTower(model).shared_prefix_supported()
    pl = _learner(model, tokenizer)
    with torch.no_grad():
        full = encode_prompts(model, pl(), pl.eot_index, shared_prefix=0)
        shared = encode_prompts(model, pl(), pl.eot_index, shared_prefix=pl.shared_prefix_length)
    assert spy["prefix"] == 1
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())


def test_float_attention_with_separate_qkv_weights_is_not_supported(towers):
    """``in_proj_weight is None`` (separate q/k/v weights) is the public test for it."""
    block = copy.deepcopy(towers["float"].transformer.resblocks[0])
    assert sp._block_supported(block, training=False)
    block.attn = nn.MultiheadAttention(64, 4, kdim=32, vdim=32)
    assert not sp._block_supported(block, training=False)


def test_teacher_prompt_features_use_the_shared_prefix(world, spy):
    module = P4QModule(
        **tiny_world.module_args(world, teacher_text="prompt", classnames=NAMES),
    )
    module.set_classes(NAMES)
    pl = module.classifier.prompt_learner
    got = module.classifier.teacher_text_features()
    assert spy["prefix"] == 1
    fixed = pl.embed_fixed(TextTower(module.classifier.teacher).token_embedding)
    want = encode_prompts(module.classifier.teacher, pl(fixed), pl.eot_index)
    want = torch.nn.functional.normalize(want, dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
