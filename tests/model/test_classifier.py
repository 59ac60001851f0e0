"""``P4QClassifier`` works without Lightning, and ``P4QModule`` only wraps it: the same
arguments give the same logits; the exported file reproduces them through the shared
``adapted_image_features`` path."""

from __future__ import annotations

import torch

import tiny_world
from p4q_lightning.args import AdapterArgs, PromptArgs
from p4q_lightning.export import load_lowbit
from p4q_lightning.export.from_module import export_module
from p4q_lightning.losses import cosine_logits
from p4q_lightning.model.classifier import P4QClassifier
from p4q_lightning.module import P4QModule

NAMES = ["red circle", "blue square", "green triangle"]


def _classifier(world, **kw) -> P4QClassifier:
    args = dict(quant="w4a4", quant_overrides=tiny_world.MINMAX, prompt=PromptArgs(n_ctx=4))
    args.update(kw)
    return P4QClassifier.build(
        tiny_world.MODEL_NAME, None, str(world["config"]), init_seed=0, **args
    )


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_the_classifier_calibrates_and_classifies_without_lightning(world):
    model = _classifier(world)
    model.set_classes(NAMES)
    assert model.needs_calibration
    model.calibrate([_images()], progress=False)
    assert not model.needs_calibration
    model.eval()  # in training the adapter's input ranges follow an EMA on every forward
    images = _images()
    logits = model.student_logits(images)
    assert logits.shape == (6, len(NAMES))
    want = cosine_logits(
        model.adapt(model.student_image_features(images)),
        model.student_text_features(),
        model.logit_scale,
    )
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    assert sorted(model.trainable_parameter_names()) == sorted(
        ["prompt_learner.ctx", *(f"adapter.{n}" for n, _ in model.adapter.named_parameters())]
    )


def test_the_module_is_glue_around_the_same_classifier(world):
    model = _classifier(world, adapter=AdapterArgs(ratio=0.3))
    module = P4QModule(
        **tiny_world.module_args(
            world, quant_overrides=tiny_world.MINMAX, adapter={"ratio": 0.3}, classnames=NAMES
        )
    )
    model.set_classes(NAMES)
    for m in (model, module.classifier):
        m.calibrate([_images()], progress=False)
    torch.testing.assert_close(
        module.classifier.student_logits(_images()), model.student_logits(_images()), rtol=0, atol=0
    )


def test_an_export_of_the_classifier_gives_its_logits(world, tmp_path):
    model = _classifier(world)
    model.set_classes(NAMES)
    model.calibrate([_images()], progress=False)
    model.eval()
    with torch.no_grad():
        want = model.student_logits(_images())
    export_module(model, tmp_path / "m.safetensors")
    got = load_lowbit(tmp_path / "m.safetensors").logits(_images())
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_frozen_towers_stay_in_eval_mode(world):
    model = _classifier(world).train()
    assert not model.teacher.training and not model.student.training
    assert model.adapter.training
