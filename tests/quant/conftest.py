"""Fixtures for the PTQ-engine tests.

``tiny_clip`` (see :mod:`quant_helpers`) keeps structural tests at milliseconds; ViT-S-32 /
ViT-B-32 appear only where a real-size model is the point of the test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import open_clip
import pytest
import torch
from quant_helpers import TINY_IMAGE, build_tiny_clip
from torch import nn

from p4q_lightning import load_clip


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Run these tests on one intra-op thread, restoring the setting after each module.

    On a shared 2-core machine every multi-threaded op waits for a possibly descheduled
    second thread (measured: a tiny calibration 0.1 s on one thread, 1-3.5 s on two under
    load); the tests check numerics, not threading. Module scope, so that it is in force
    before the module-scoped calibrated models are built.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer() -> Callable[..., torch.Tensor]:
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="session")
def prompts(tokenizer: Callable[..., torch.Tensor]) -> torch.Tensor:
    return tokenizer(
        ["a photo of a cat.", "a small dog on the grass.", "a red car parked next to a tree."]
    )


@pytest.fixture()
def tiny_clip() -> nn.Module:
    return build_tiny_clip()


@pytest.fixture()
def tiny_images() -> torch.Tensor:
    return torch.randn(4, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def vit_s32() -> nn.Module:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no weights are loaded
    model, _, _ = load_clip("ViT-S-32", pretrained=None)
    return model
