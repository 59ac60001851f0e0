"""bf16 mixed precision: quantizer arithmetic (scale, rounding, clamping) stays in float32, so
the codes of a bf16 activation are the float32 path's codes of the same values; and a P4Q
``precision='bf16-mixed'`` fit runs (on CPU autocast here, as it would on a GPU)."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
from lightning.pytorch import Callback

import tiny_world
from p4q_lightning import calibrate, quantize
from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import TextTower, encode_prompts
from p4q_lightning.module import P4QModule
from p4q_lightning.quant.quantizer import ActivationQuantizer

NAMES = ["red circle", "blue square", "green triangle", "cat"]


@pytest.fixture()
def recorded_codes(monkeypatch):
    """Every (input, codes, quantizer) that ActivationQuantizer.centered_codes produced."""
    calls = []
    original = ActivationQuantizer.centered_codes

    def recording(self, x, pre_scale=1.0):
        codes, scale = original(self, x, pre_scale)
        calls.append((self, x.detach(), pre_scale, codes.detach(), scale))
        return codes, scale

    monkeypatch.setattr(ActivationQuantizer, "centered_codes", recording)
    return calls


def test_bf16_autocast_codes_equal_the_float32_codes(recorded_codes):
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    ).eval()
    tok = open_clip.get_tokenizer("ViT-B-32")
    student = quantize(model, "w8a8")
    calibrate(student, images=[torch.randn(2, 3, 32, 32)], texts=[tok(NAMES)], progress=False)
    tower = TextTower(student)
    pl = PromptLearner(NAMES, tok, tower.width, n_ctx=4)
    pl.set_token_embedding(tower.token_embedding)
    recorded_codes.clear()  # calibration's calls observe; only the training pass counts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = encode_prompts(student, pl(), pl.eot_index, shared_prefix=pl.shared_prefix_length)
    feats.float().sum().backward()
    assert torch.isfinite(pl.ctx.grad).all() and pl.ctx.grad.abs().sum() > 0
    bf16_inputs = 0
    assert recorded_codes and all(q.mode == "quant" for q, *_ in recorded_codes)
    for quantizer, x, pre_scale, codes, _ in recorded_codes:
        bf16_inputs += x.dtype == torch.bfloat16
        inv, _, lo, hi = quantizer.float_params()
        want = torch.round(x.float() * (inv * pre_scale)).clamp(lo, hi)  # float32, no autocast
        assert torch.equal(codes.float(), want)
    assert bf16_inputs > 0, "autocast produced no bf16 activation: the test checks nothing"


def test_bf16_mixed_fit_runs_and_trains_the_prompt(world, tmp_path):
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    module = P4QModule(
        **tiny_world.module_args(
            world,
            prompt_lr=0.05,
            adapter_lr=0.01,
            feature_views=1,
            quant_overrides=tiny_world.MINMAX,
        )
    )
    dm = tiny_world.TinyDataModule(str(world["data"]))
    trainer = tiny_world.trainer(
        tmp_path,
        max_steps=3,
        precision="bf16-mixed",
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = StartContext()
    trainer.callbacks.append(start)
    trainer.fit(module, datamodule=dm)
    ctx = module.classifier.prompt_learner.ctx
    assert ctx.dtype == torch.float32 and torch.isfinite(ctx).all()
    assert not torch.equal(ctx.detach(), start.ctx), "the prompt did not train under bf16-mixed"
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


class StartContext(Callback):
    """The learned context as training starts (the prompt learner exists only after setup)."""

    def on_train_start(self, trainer, module) -> None:
        self.ctx = module.classifier.prompt_learner.ctx.detach().clone()
