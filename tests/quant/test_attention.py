"""The one attention core: both paths run through it, its code products are exact, and a
module in the ``in_proj`` slot (the LoRA-on-q/k/v design) reaches the normal and the
shared-prefix path alike."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

import p4q_lightning
from p4q_lightning import calibrate, quantize
from p4q_lightning.export import Int8Linear, convert_to_int8
from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import TextTower, encode_prompts
from p4q_lightning.quant import QuantLinear
from p4q_lightning.quant.attention import codes_product

NAMES = ["red circle", "blue square", "green triangle", "cat"]
ATTENTION_OPS = {"softmax", "scaled_dot_product_attention", "einsum", "matmul", "bmm"}


def test_no_attention_arithmetic_outside_the_core():
    """Scores, softmax and probability products live in ``quant/attention.py`` only."""
    root = Path(p4q_lightning.__file__).parent
    found = []
    for path in [*(root / "quant").rglob("*.py"), *(root / "model").rglob("*.py")]:
        if path.name == "attention.py" and path.parent.name == "quant":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ATTENTION_OPS:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    assert not found, found


@pytest.mark.parametrize(
    "equation,shape_a,shape_b",
    [
        ("bhrd,bhkd->bhrk", (3, 2, 4, 5), (3, 2, 6, 5)),
        ("bhrd,hpd->bhrp", (3, 2, 4, 5), (2, 7, 5)),
        ("bhrp,hpd->bhrd", (3, 2, 4, 7), (2, 7, 5)),
    ],
)
def test_code_products_save_int8_and_keep_gradients_exact(equation, shape_a, shape_b):
    """Attention operands that are codes are kept as int8 for the backward pass; with integer
    values every sum is exact, so the gradients equal plain einsum's bit for bit."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-15, 16, shape_a, generator=gen).float().requires_grad_()
    b = torch.randint(-15, 16, shape_b, generator=gen).float().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.dtype) or t, lambda t: t
    ):
        out = codes_product(equation, a, b, (torch.int8, torch.int8))
    assert saved == [torch.int8, torch.int8]
    grad = torch.randint(-3, 4, out.shape, generator=gen).float()
    got = torch.autograd.grad(out, (a, b), grad)
    want_out = torch.einsum(equation, a, b)
    want = torch.autograd.grad(want_out, (a, b), grad)
    assert torch.equal(out, want_out)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


class LowRankQKV(nn.Module):
    """A LoRA-style wrapper for the ``in_proj`` slot: ``base(x) + B(A(x))`` (float factors)."""

    def __init__(self, base: nn.Module, width: int, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        gen = torch.Generator().manual_seed(5)
        self.down = nn.Parameter(torch.randn(rank, width, generator=gen) * 0.1)
        self.up = nn.Parameter(torch.randn(3 * width, rank, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.t()) @ self.up.t()


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    ).eval()
    tok = open_clip.get_tokenizer("ViT-B-32")
    student = quantize(model, "w8a8")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calibrate(student, images=[images], texts=[tok(NAMES)], progress=False)
    return student, tok


def _features(model, pl, shared):
    feats = encode_prompts(model, pl(), pl.eot_index, shared_prefix=shared)
    weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(7))
    (feats * weights).sum().backward()
    return feats.detach()


def test_a_wrapper_in_the_in_proj_slot_reaches_both_paths(student):
    """One wrapper per block's ``in_proj`` changes the normal and the shared-prefix path alike;
    both still agree, and the low-rank factors get the same gradient through either."""
    base, tok = student
    tower = TextTower(base)
    pl = PromptLearner(NAMES, tok, tower.width, n_ctx=4)
    pl.set_token_embedding(tower.token_embedding)
    plain = encode_prompts(base, pl(), pl.eot_index).detach()
    model = copy.deepcopy(base)
    wrappers = []
    for block in model.transformer.resblocks:
        block.attn.in_proj = LowRankQKV(block.attn.in_proj, tower.width)
        wrappers.append(block.attn.in_proj)
    grads = {}
    for shared in (0, pl.shared_prefix_length):
        for w in wrappers:
            w.down.grad = w.up.grad = None
        feats = _features(model, pl, shared)
        grads[shared] = (feats, [w.down.grad.clone() for w in wrappers])
    full, shared_path = grads[0], grads[pl.shared_prefix_length]
    assert pl.shared_prefix_length > 1 and not torch.allclose(full[0], plain, atol=1e-3)
    scale = full[0].abs().max().item()
    torch.testing.assert_close(shared_path[0], full[0], rtol=1e-5, atol=1e-5 * scale)
    for got, want in zip(shared_path[1], full[1], strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_int8_conversion_swaps_the_base_inside_a_wrapper(student):
    model = copy.deepcopy(student[0])
    attn = model.transformer.resblocks[0].attn
    attn.in_proj = LowRankQKV(attn.in_proj, 64)
    assert isinstance(attn.in_proj.base, QuantLinear)
    convert_to_int8(model)
    assert isinstance(attn.in_proj, LowRankQKV) and isinstance(attn.in_proj.base, Int8Linear)
