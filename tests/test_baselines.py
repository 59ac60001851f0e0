"""What each few-shot baseline is, pinned on the tiny world: Tip-Adapter, Tip-Adapter-F,
CLIP-LoRA and KgCoOp on the same (PTQ) student as P4Q."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import seed_everything

import tiny_world
from p4q_lightning import cli
from p4q_lightning.export.format import ExportMismatchError
from p4q_lightning.export.from_module import export_module
from p4q_lightning.losses import cosine_logits
from p4q_lightning.model.lora import LoRAInProj, lora_layers
from p4q_lightning.module import P4QModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def module(world, method: str, **kw) -> P4QModule:
    return P4QModule(**tiny_world.module_args(world, method=method, feature_views=2, **kw))


@pytest.fixture(scope="module")
def dm(world):
    data = tiny_world.TinyDataModule(str(world["data"]))
    data.setup()
    return data


def calibrated(world, dm, method: str, **kw) -> P4QModule:
    m = module(world, method, **kw)
    m.set_classes(dm.classnames, dm.templates)
    m.classifier.calibrate(dm.calibration_dataloader(), progress=False)
    return m


def images(dm) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(dm.val_dataloader()))
    return x, y


def fit(world, dm, tmp_path, m: P4QModule, **kw) -> None:
    seed_everything(0)
    tiny_world.trainer(tmp_path, **kw).fit(m, dm)


def test_tip_adapter_with_alpha_zero_is_the_students_zero_shot(world, dm, tmp_path):
    tip = module(world, "tip_adapter", tip={"alpha": 0.0, "search": False})
    fit(world, dm, tmp_path, tip)
    cache = tip.classifier.tip_cache
    assert cache.is_built and float(cache.alpha) == 0.0
    assert cache.keys.shape[0] == len(dm.train_dataset)  # one key per few-shot image
    assert torch.equal(
        cache.values.sum(dim=0), torch.bincount(torch.tensor(dm.train_dataset.targets)).float()
    )
    ptq = calibrated(world, dm, "ptq")
    x, _ = images(dm)
    tip.eval(), ptq.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            tip.classifier.student_logits(x), ptq.classifier.student_logits(x)
        )
        # the cache term itself is not zero: alpha is what switches it off
        assert cache(tip.classifier.student_image_features(x)).abs().sum() > 0


def test_tip_adapter_fit_trains_nothing_and_searches_alpha_beta(world, dm, tmp_path):
    tip = module(world, "tip_adapter", tip={"search_beta_steps": 5, "search_alpha_steps": 4})
    trainer = tiny_world.trainer(tmp_path)
    seed_everything(0)
    trainer.fit(tip, dm)
    assert trainer.global_step == 0  # built its cache, ran no optimiser step
    assert tip.classifier.trainable_parameter_names() == []
    betas = [0.1 + i * (7.0 - 0.1) / 5 for i in range(5)]
    alphas = [0.1 + i * (3.0 - 0.1) / 4 for i in range(4)]
    model = tip.classifier
    chosen = (float(model.tip_cache.alpha), float(model.tip_cache.beta))
    # brute force over the same grid on the validation split: the chosen pair is the best
    feats, labels = [], []
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            feats.append(model.student_image_features(x))
            labels.append(y)
        feats, labels, text = torch.cat(feats), torch.cat(labels), model.student_text_features()

        def accuracy(alpha: float, beta: float) -> float:
            logits = model.logits_from_features(feats, text, (alpha, beta))
            return float((logits.argmax(-1) == labels).float().mean())

        best = max(accuracy(a, b) for a in alphas for b in betas)
    assert any(chosen[0] == pytest.approx(a) for a in alphas)
    assert any(chosen[1] == pytest.approx(b) for b in betas)
    assert accuracy(*chosen) == best


def test_tip_adapter_f_before_training_equals_tip_adapter(world, dm, tmp_path):
    plain = module(world, "tip_adapter", tip={"search": False})
    fit(world, dm, tmp_path / "a", plain)
    tuned = module(world, "tip_adapter_f", tip={"search": False}, optim={"cache_lr": 0.0})
    fit(world, dm, tmp_path / "b", tuned, max_epochs=1)
    # lr 0: the keys are the cache the training-free method built, so every logit is equal
    torch.testing.assert_close(tuned.classifier.tip_cache.keys, plain.classifier.tip_cache.keys)
    x, _ = images(dm)
    plain.eval(), tuned.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain.classifier.student_logits(x), tuned.classifier.student_logits(x)
        )
    assert tuned.classifier.trainable_parameter_names() == ["tip_cache.keys"]


def test_tip_adapter_f_trains_its_keys_only(world, dm, tmp_path):
    tuned = module(world, "tip_adapter_f", tip={"search": False}, optim={"cache_lr": 0.01})
    seed_everything(0)
    trainer = tiny_world.trainer(tmp_path, max_epochs=2)
    plain = module(world, "tip_adapter", tip={"search": False})
    fit(world, dm, tmp_path / "plain", plain)
    trainer.fit(tuned, dm)
    assert trainer.global_step > 0
    assert not torch.allclose(tuned.classifier.tip_cache.keys, plain.classifier.tip_cache.keys)
    assert tuned.classifier.trainable_parameter_names() == ["tip_cache.keys"]
    after = tuned.classifier.student.state_dict()
    for k, v in after.items():  # the frozen student is the calibrated PTQ student still
        torch.testing.assert_close(v, plain.classifier.student.state_dict()[k])


def test_tip_adapter_f_searches_for_its_final_keys_when_the_last_epoch_has_no_validation(
    world, dm, tmp_path, monkeypatch
):
    import p4q_lightning.module as module_file

    tuned = module(
        world,
        "tip_adapter_f",
        tip={"search_beta_steps": 3, "search_alpha_steps": 2},
        optim={"cache_lr": 0.01},
    )
    searched_with: list[torch.Tensor] = []
    search = module_file.search_alpha_beta

    def spy(*args, **kw):
        searched_with.append(tuned.classifier.tip_cache.keys.detach().clone())
        return search(*args, **kw)

    monkeypatch.setattr(module_file, "search_alpha_beta", spy)
    # validation after epoch 2 only: epoch 3 trains the keys further and validates nothing
    fit(world, dm, tmp_path, tuned, max_epochs=3, check_val_every_n_epoch=2)
    assert len(searched_with) == 2  # epoch 2's validation, then the end of the last epoch
    assert not torch.equal(searched_with[0], searched_with[1])
    assert torch.equal(searched_with[-1], tuned.classifier.tip_cache.keys.detach())


def test_clip_lora_at_step_zero_is_the_ptq_student_and_only_lora_has_gradients(world, dm):
    lora = calibrated(world, dm, "clip_lora")
    ptq = calibrated(world, dm, "ptq")
    layers = lora_layers(lora.classifier.student)
    # every attention block of both towers (2 + 2 layers in the tiny model)
    assert len(layers) == 4 and all(isinstance(layer, LoRAInProj) for layer in layers)
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in layers)
    x, y = images(dm)
    lora.eval(), ptq.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            lora.classifier.student_logits(x), ptq.classifier.student_logits(x)
        )
    # one training step's loss: gradients reach the LoRA factors and nothing else
    lora.train()
    model = lora.classifier
    logits = model.logits_from_features(
        model.train_image_features(x), model.student_text_features()
    )
    torch.nn.functional.cross_entropy(logits, y).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith((".lora_A", ".lora_B")) for n in with_grad)
    # every layer's B gets a gradient (from the first block on, through the later blocks'
    # frozen quantized layers by the straight-through estimator), in both towers; A's is zero
    # at step 0 (dL/dA = B^T ... with B = 0)
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in layers)
    assert all(layer.lora_A.grad.abs().sum() == 0 for layer in layers)
    assert any(n.startswith("student.visual.") and n.endswith("lora_B") for n in with_grad)
    assert any(n.startswith("student.transformer.") and n.endswith("lora_B") for n in with_grad)
    assert set(model.trainable_parameter_names()) == {
        n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))
    }


def test_clip_lora_fit_moves_the_factors_and_the_checkpoint_keeps_them(world, dm, tmp_path):
    lora = module(world, "clip_lora", optim={"lora_lr": 1e-2})
    fit(world, dm, tmp_path, lora, max_epochs=1)
    moved = [
        layer for layer in lora_layers(lora.classifier.student) if layer.lora_B.abs().sum() > 0
    ]
    assert moved
    state = lora.state_dict()
    kept = [k for k in state if k.endswith((".lora_A", ".lora_B"))]
    assert len(kept) == 8
    fresh = module(world, "clip_lora")
    fresh.set_classes(dm.classnames, dm.templates)
    fresh.load_state_dict(state)
    x, _ = images(dm)
    lora.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.classifier.student_logits(x), lora.classifier.student_logits(x)
        )


def test_kgcoop_with_lambda_zero_equals_coop_on_the_same_student(world, dm):
    """KgCoOp is CoOp plus one term: with lambda 0 its loss and gradient are CoOp's. CoOp runs on
    the float model, so both run with ``quant: fp`` (the float copy of the teacher)."""
    kg = calibrated(world, dm, "kgcoop", quant="fp", loss={"kg_weight": 0.0})
    coop = calibrated(world, dm, "coop", quant="fp")
    torch.testing.assert_close(kg.classifier.prompt_learner.ctx, coop.classifier.prompt_learner.ctx)
    x, y = images(dm)
    batch = (x, y)
    kg.train(), coop.train()
    for m in (kg, coop):
        m.log = lambda *a, **k: None  # no trainer attached
    loss_kg, loss_coop = kg.training_step(batch, 0), coop.training_step(batch, 0)
    torch.testing.assert_close(loss_kg, loss_coop, rtol=1e-5, atol=1e-5)
    loss_kg.backward(), loss_coop.backward()
    torch.testing.assert_close(
        kg.classifier.prompt_learner.ctx.grad,
        coop.classifier.prompt_learner.ctx.grad,
        rtol=1e-4,
        atol=1e-6,
    )


def test_kgcoop_regulariser_pulls_toward_the_handwritten_prompt(world, dm):
    kg = calibrated(world, dm, "kgcoop", loss={"kg_weight": 8.0})
    plain = calibrated(world, dm, "kgcoop", loss={"kg_weight": 0.0})
    x, y = images(dm)
    for m in (kg, plain):
        m.log = lambda *a, **k: None
        m.train()
    model = kg.classifier
    text = model.student_text_features()
    anchor = model.anchor_text_features()
    expected = 8.0 * (1 - (torch.nn.functional.normalize(text, dim=-1) * anchor).sum(-1)).mean()
    diff = kg.training_step((x, y), 0) - plain.training_step((x, y), 0)
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-5)
    assert float(expected) > 0  # a random context is not the hand-written prompt
    # the anchor is the template classifier of the same (quantized) student text tower
    torch.testing.assert_close(anchor, model.template_text_features(model.student))


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f", "clip_lora"])
def test_methods_without_a_lowbit_form_say_so(world, dm, method, tmp_path):
    m = calibrated(world, dm, method)
    with pytest.raises(
        ExportMismatchError,
        match=f"method='{method}' does not export to the low-bit file: .*checkpoint",
    ):
        export_module(m.classifier, tmp_path / "x.safetensors")


def test_kgcoop_exports_and_loads_back(world, dm, tmp_path):
    from p4q_lightning.export import load_lowbit

    kg = calibrated(world, dm, "kgcoop")
    path = tmp_path / "kg.safetensors"
    export_module(kg.classifier, path)
    loaded = load_lowbit(path)
    x, _ = images(dm)
    kg.eval()
    with torch.no_grad():
        expected = kg.classifier.student_logits(x)
        got = loaded.logits(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_tip_cache_refuses_other_classes(world, dm, tmp_path):
    tip = module(world, "tip_adapter", tip={"search": False})
    fit(world, dm, tmp_path, tip)
    feats = torch.randn(2, 32)
    text = torch.randn(3, 32)
    with pytest.raises(ValueError, match="cache holds 4 classes but 3 are scored"):
        tip.classifier.logits_from_features(feats, text)
    assert cosine_logits(feats, text, 1.0).shape == (2, 3)


DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo_baselines.yaml"


def demo_config(world, tmp_path, method: str) -> Path:
    """The shipped demo_baselines.yaml with the tiny model and data swapped in, 2 epochs, a
    last checkpoint, the comparison after fit kept."""
    config = yaml.safe_load(DEMO.read_text())
    config["model"].update(
        model_name=tiny_world.MODEL_NAME, pretrained=None, model_config=str(world["config"]),
        method=method, quant="w4a4",
    )  # fmt: skip
    config["model"]["features"] = {"views": 2, "cache_dir": None}
    config["model"]["tip"].update(search_beta_steps=4, search_alpha_steps=3)
    config["data"] = {"class_path": "tiny_world.TinyDataModule",
                      "init_args": {"root": str(world["data"])}}  # fmt: skip
    trainer = config["trainer"]
    trainer.update(max_epochs=2, check_val_every_n_epoch=1, logger=False,
                   enable_checkpointing=True, enable_progress_bar=False,
                   default_root_dir=str(tmp_path / "runs"))  # fmt: skip
    trainer["callbacks"].append({
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
    })  # fmt: skip
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f", "clip_lora", "kgcoop"])
def test_fit_then_test_from_the_command_line_on_the_demo_config(
    world, tmp_path, method, monkeypatch, capsys
):
    """fit writes the method's comparison row; test from the last checkpoint (a new module:
    cache, factors, prompt and searched scalars restored) scores the same top-1."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    config = demo_config(world, tmp_path, method)
    cli.cli_main(["fit", "--config", str(config)])
    (csv_path,) = (tmp_path / "runs").glob("**/comparison/comparison.csv")
    rows = {r["method"]: r for r in csv.DictReader(csv_path.open())}
    assert {method, "ptq", "fp32 zero-shot"} <= set(rows)
    test = cli.cli_main(
        ["test", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")]
    )
    assert float(test.trainer.callback_metrics["test/top1"]) == pytest.approx(
        float(rows[method]["top1"])
    )
    # `p4q export`: KgCoOp writes a low-bit file; the others say in one line why they do not
    capsys.readouterr()
    out = tmp_path / "x.safetensors"
    code = cli.main(["export", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(out), "--verify"])
    err = capsys.readouterr().err
    if method == "kgcoop":
        assert code in (0, None) and out.is_file(), err
    else:
        assert code == 1 and not out.exists()
        assert err.startswith(f"error: method='{method}' does not export to the low-bit file: ")
        assert len(err.strip().splitlines()) == 2  # the line and the P4Q_DEBUG hint


def test_kgcoop_trains_from_the_feature_cache_with_its_anchor(world, dm, tmp_path):
    """KgCoOp's anchor (the hand-written prompt through the student) is read on every step,
    after the fit has released the token tables, and again after each validation."""
    kg = module(world, "kgcoop", loss={"kg_weight": 8.0})
    seed_everything(0)
    trainer = tiny_world.trainer(tmp_path, max_epochs=2)
    trainer.fit(kg, dm)
    assert trainer.global_step > 0 and trainer.num_val_batches
    kg_term = trainer.callback_metrics["train/kg"]
    assert torch.isfinite(kg_term) and kg_term > 0
    x, _ = images(dm)
    with torch.no_grad():  # the released towers are back after the fit
        assert torch.isfinite(kg.classifier.student_logits(x)).all()
