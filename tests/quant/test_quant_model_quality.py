"""Calibrated ViT-S-32 students: prompt gradients through the low-bit text tower, fidelity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import calibrated
from torch import nn


@pytest.fixture(scope="module")
def calib_images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10)
    return [torch.randn(4, 3, 224, 224, generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def s32_w4a4(
    vit_s32: nn.Module, calib_images: list[torch.Tensor], prompts: torch.Tensor
) -> nn.Module:
    return calibrated(vit_s32, "w4a4", torch.cat(calib_images), prompts)


def _coop_text_features(model: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Text features from token embeddings the way CoOp feeds its prompt (EOT pooling)."""
    h = model.transformer(x, attn_mask=model.attn_mask)
    h = model.ln_final(h)
    return h[torch.arange(h.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def test_w4a4_text_tower_passes_gradients_to_every_position_up_to_eot(
    s32_w4a4: nn.Module, prompts: torch.Tensor
) -> None:
    """Guards against the official code's defect (fake-quant without STE: zero gradients)."""
    x = (s32_w4a4.token_embedding(prompts) + s32_w4a4.positional_embedding).detach()
    x.requires_grad_(True)
    features = _coop_text_features(s32_w4a4, x, prompts)
    # a CoOp-like loss: cross-entropy of image-text logits
    image_feats = F.normalize(
        torch.randn(5, features.shape[1], generator=torch.Generator().manual_seed(2)), dim=-1
    )
    logits = 100 * F.normalize(features, dim=-1) @ image_feats.T
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert x.grad is not None
    norms = x.grad.norm(dim=-1)  # [prompts, 77]
    for i, eot in enumerate(prompts.argmax(dim=-1).tolist()):
        zero = norms[i, : eot + 1].eq(0).nonzero().flatten().tolist()
        assert zero == [], f"prompt {i}: zero gradient before EOT at positions {zero}"
        assert (norms[i, eot + 1 :] == 0).all(), "causal mask: positions after EOT cannot matter"
    # the gradient and no-gradient computations are one and the same
    with torch.no_grad():
        assert torch.equal(features.detach(), s32_w4a4.encode_text(prompts))


def test_w8a8_keeps_image_features_and_w4a4_loses_more(
    vit_s32: nn.Module, s32_w4a4: nn.Module, calib_images: list[torch.Tensor], prompts: torch.Tensor
) -> None:
    w8a8 = calibrated(vit_s32, "w8a8", torch.cat(calib_images), prompts)
    test_images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = vit_s32.encode_image(test_images)
        cos8 = F.cosine_similarity(w8a8.encode_image(test_images), ref).mean().item()
        cos4 = F.cosine_similarity(s32_w4a4.encode_image(test_images), ref).mean().item()
        text8 = (
            F.cosine_similarity(w8a8.encode_text(prompts), vit_s32.encode_text(prompts))
            .mean()
            .item()
        )
    assert cos8 >= 0.99, cos8
    assert text8 >= 0.99, text8
    assert cos4 < cos8, (cos4, cos8)
