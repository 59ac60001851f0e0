"""``p4q export`` through the CLI entry point: a checkpoint (also of the earlier layout)
becomes a low-bit file with the module's logits."""

import pytest
import torch

import tiny_world
from p4q_lightning.args import GROUPS
from p4q_lightning.cli import main as cli_main
from p4q_lightning.export import load_lowbit
from p4q_lightning.legacy import FLAT_NAMES
from p4q_lightning.module import P4QModule


def test_export_command_from_checkpoint(world, tmp_path, capsys) -> None:
    module = P4QModule(
        **tiny_world.module_args(
            world, quant="w8a8", quant_overrides=tiny_world.MINMAX, features={"views": 1}
        )
    )
    dm = tiny_world.TinyDataModule(str(world["data"]))
    trainer = tiny_world.trainer(
        tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=2,
    )
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "p4q.ckpt"
    trainer.save_checkpoint(ckpt)
    assert cli_main(["export", str(ckpt), "--verify"]) == 0
    out = tmp_path / "p4q-lowbit.safetensors"
    assert "verified: 4 classes" in capsys.readouterr().out
    images = torch.stack([dm.val_dataset[i][0] for i in range(8)])
    module.eval()
    with torch.no_grad():
        ref = module.classifier.student_logits(images)
    got = load_lowbit(out).logits(images)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    assert ((got - ref).abs().max() / ref.abs().max()) <= 1e-4
    with pytest.raises(SystemExit):
        cli_main(["export", str(tmp_path / "missing.ckpt")])

    # A checkpoint of the earlier layout (flat hyperparameters, no ``classifier.`` prefix)
    # exports the same model.
    old = torch.load(ckpt, map_location="cpu", weights_only=True)
    old["hyper_parameters"] = _flat(old["hyper_parameters"])
    old["state_dict"] = {k.removeprefix("classifier."): v for k, v in old["state_dict"].items()}
    assert "n_ctx" in old["hyper_parameters"] and "prompt_learner.ctx" in old["state_dict"]
    torch.save(old, tmp_path / "old.ckpt")
    assert cli_main(["export", str(tmp_path / "old.ckpt")]) == 0
    assert torch.equal(load_lowbit(tmp_path / "old-lowbit.safetensors").logits(images), got)


def _flat(hparams: dict) -> dict:
    """Hyperparameters as versions before the option groups wrote them."""
    flat = {k: v for k, v in hparams.items() if k not in GROUPS}
    for old, (group, field) in FLAT_NAMES.items():
        flat[old] = hparams[group][field]
    flat["adapter"] = hparams["adapter"]["enabled"]
    return flat
