"""The frozen-work store: computed once under a lock, loaded bit for bit by later users."""

from __future__ import annotations

import threading
import time

import torch

from p4q_lightning.training import frozen_store


def _store(directory, calls: list[int], name: str = "x.pt"):
    def compute() -> torch.Tensor:
        calls.append(1)
        time.sleep(0.3)  # long enough for the other user to arrive while it is computed
        return torch.randn(4, 3, generator=torch.Generator().manual_seed(len(calls)))

    return frozen_store.load_or_compute(directory, name, compute, lambda v: v, lambda p: p)


def test_concurrent_users_compute_once_and_get_the_same_tensor(tmp_path) -> None:
    calls: list[int] = []
    results: list[tuple[torch.Tensor, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(_store(tmp_path, calls))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # the others waited on the lock, then loaded
    assert sorted(loaded for _, loaded in results) == [False, True, True]
    first = results[0][0]
    assert all(torch.equal(value, first) for value, _ in results)
    assert not list(tmp_path.glob("*.partial"))  # written atomically: no leftovers


def test_without_a_directory_it_computes_every_time(tmp_path) -> None:
    calls: list[int] = []
    _store(None, calls)
    _store(None, calls)
    assert len(calls) == 2 and not any(tmp_path.iterdir())


def test_an_unreadable_entry_is_recomputed(tmp_path) -> None:
    (tmp_path / "x.pt").write_bytes(b"not a tensor file")
    calls: list[int] = []
    value, loaded = _store(tmp_path, calls)
    assert not loaded and len(calls) == 1
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True), value)


def test_spent_time_is_counted_per_kind(tmp_path) -> None:
    frozen_store.SPENT.pop("probe", None)
    frozen_store.load_or_compute(
        tmp_path, "y.pt", lambda: time.sleep(0.05) or torch.zeros(1), lambda v: v, lambda p: p,
        kind="probe",
    )  # fmt: skip
    assert frozen_store.spent()["probe"] >= 0.05
