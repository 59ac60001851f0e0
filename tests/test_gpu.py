"""What only a CUDA GPU can show: the P4Q paths on CUDA agree with the CPU.

Every test here is marked ``gpu`` and skips without CUDA (conftest); ``benchmarks/gpu_check.py``
runs them and reports the verdict in its JSON.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

import tiny_world
from p4q_lightning import calibrate, quantize
from p4q_lightning.export import convert_to_int8
from p4q_lightning.model.build import build_teacher
from p4q_lightning.model.prompt_learner import PromptLearner
from p4q_lightning.model.text_encoder import TextTower, encode_prompts
from p4q_lightning.module import P4QModule

pytestmark = pytest.mark.gpu
warnings.filterwarnings("ignore", ".*does not have many workers.*")
NAMES = ["red circle", "blue square", "big green striped triangle", "cat", "ox"]


@pytest.fixture(autouse=True)
def _exact_float32():
    """No TF32 in matmuls or convolutions: CUDA float32 must match the CPU to float rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    cfg = tiny_world.write_model_config(tmp_path_factory.mktemp("cfg"))
    model, tok = build_teacher(tiny_world.MODEL_NAME, None, str(cfg))
    s = quantize(model, "w4a4", tiny_world.MINMAX)
    calibrate(s, [tiny_world.random_images(8)], [tok([f"a {n}." for n in NAMES])], progress=False)
    return s, tok


@pytest.mark.parametrize("chunk, ckpt", [(None, False), (2, True)])
def test_prompt_features_and_gradients_on_cuda_equal_the_cpu(student, chunk, ckpt):
    model, tok = student
    results = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        tower = TextTower(m)
        pl = PromptLearner(
            NAMES, tok, tower.width, n_ctx=2, generator=torch.Generator().manual_seed(0)
        ).to(device)
        pl.set_token_embedding(tower.token_embedding)
        feats = encode_prompts(
            m, pl(), pl.eot_index, chunk, ckpt, shared_prefix=pl.shared_prefix_length
        )
        feats.sum().backward()
        results.append((feats.detach().cpu(), pl.ctx.grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-4)


def test_int8_image_tower_on_cuda_equals_the_cpu(student):
    model, _ = student
    int8 = convert_to_int8(copy.deepcopy(model), backend="int_mm")
    x = tiny_world.random_images(32, seed=3)
    with torch.inference_mode():
        cpu = int8.encode_image(x)
        cuda = copy.deepcopy(int8).cuda().encode_image(x.cuda()).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def _fit(world, tmp_path, accelerator: str, precision: str) -> tuple[list[float], torch.Tensor]:
    seed_everything(0)
    dm = tiny_world.TinyDataModule(str(world["data"]))
    dm.setup()
    module = P4QModule(**tiny_world.module_args(world, feature_views=1))
    module.set_classes(dm.classnames, dm.templates)
    module.classifier.calibrate(dm.calibration_dataloader(), progress=False)
    losses = Losses()
    tiny_world.trainer(
        tmp_path / accelerator, accelerator=accelerator, precision=precision, callbacks=[losses]
    ).fit(module, dm)
    return losses.losses, module.classifier.prompt_learner.ctx.detach().cpu()


def test_p4q_fit_on_cuda_follows_the_cpu_fit(world, tmp_path):
    cpu_losses, cpu_ctx = _fit(world, tmp_path, "cpu", "32-true")
    cuda_losses, cuda_ctx = _fit(world, tmp_path, "cuda", "32-true")
    assert len(cuda_losses) == len(cpu_losses) > 1
    # float summation order differs between the devices, so a w4a4 code at a rounding tie can
    # flip: the runs agree to about 1 %, not bitwise
    torch.testing.assert_close(
        torch.tensor(cuda_losses), torch.tensor(cpu_losses), rtol=1e-2, atol=1e-3
    )
    torch.testing.assert_close(cuda_ctx, cpu_ctx, rtol=1e-2, atol=1e-3)


def test_bf16_mixed_fit_on_cuda_trains(world, tmp_path):
    losses, ctx = _fit(world, tmp_path, "cuda", "bf16-mixed")
    _, ctx_fp32 = _fit(world, tmp_path / "fp32", "cuda", "32-true")
    assert all(torch.isfinite(torch.tensor(losses)))
    # bf16 rounds differently, but the prompt must move the same way as in float32
    moved_bf16, moved_fp32 = ctx - _initial_ctx(world), ctx_fp32 - _initial_ctx(world)
    cos = torch.nn.functional.cosine_similarity(moved_bf16.flatten(), moved_fp32.flatten(), dim=0)
    assert cos > 0.9, float(cos)


def _initial_ctx(world) -> torch.Tensor:
    module = P4QModule(**tiny_world.module_args(world, feature_views=1))
    dm = tiny_world.TinyDataModule(str(world["data"]))
    dm.setup()
    module.set_classes(dm.classnames, dm.templates)
    return module.classifier.prompt_learner.ctx.detach().cpu()
