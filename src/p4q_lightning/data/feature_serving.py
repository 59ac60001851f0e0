"""Datamodules that can serve cached image features instead of images for training.

The training step of P4Q needs only the frozen image towers' features of each augmented image,
so a module may cache them once (``model.features.views > 0``) and have the datamodule's
``train_dataloader`` return a loader over the cache. The module attaches its source in
``setup("fit")`` and detaches it at the end of the fit; the datamodule keeps building its image
loader as usual (it is what gets encoded) and passes it through :meth:`FeatureServing.serve`.

Any ``LightningDataModule`` can opt in with the mixin::

    class MyData(FeatureServing, LightningDataModule):
        def train_dataloader(self):
            return self.serve(DataLoader(self.train_set, batch_size=32, shuffle=True))

This package does not import the training code: the source is anything with a ``dataloader``
method (:class:`FeatureSource`).

The mixin also keeps the position of the training loader it served in the checkpoint (the
datamodule's ``state_dict``), so a fit resumed from a mid-epoch checkpoint skips the batches it
already trained on (:class:`~p4q_lightning.data.seeded.ResumableLoader`). Lightning would do this
itself for a loader with ``state_dict``, but it sets up the training loader before restoring
the checkpoint when ``configure_optimizers`` asks for ``estimated_stepping_batches``, and then
never hands the loader its state.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch.utils.data import DataLoader


class FeatureSource(Protocol):
    """What a module attaches: turns the datamodule's image loader into a feature loader."""

    def dataloader(self, images: DataLoader) -> DataLoader: ...


class FeatureServing:
    """Mixin for a ``LightningDataModule`` whose training images a module may replace by their
    cached features (put it before ``LightningDataModule`` in the bases)."""

    feature_source: FeatureSource | None = None
    _served: Any = None  # the last training loader served
    _resume: dict[str, Any] | None = None  # its position from a checkpoint, not yet applied

    def serve_features(self, source: FeatureSource | None) -> None:
        """Serve ``source``'s feature loader from :meth:`serve` (None: the images again)."""
        self.feature_source = source

    def serve(self, images: DataLoader) -> Any:
        """The training loader: ``images``, or the attached source's loader over their
        cached features."""
        loader = images if self.feature_source is None else self.feature_source.dataloader(images)
        self._served = loader
        self._apply_resume()
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The datamodule's state in a checkpoint, with the served training loader's position
        (when the loader has one: :class:`~p4q_lightning.data.seeded.ResumableLoader`)."""
        parent = getattr(super(), "state_dict", None)
        state = dict(parent()) if parent is not None else {}
        position = getattr(self._served, "state_dict", None)
        if callable(position):
            state["train_loader"] = position()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training loader's position (applied to the loader served now or next)."""
        self._resume = state_dict.get("train_loader")
        self._apply_resume()
        parent = getattr(super(), "load_state_dict", None)
        if parent is not None:
            parent({k: v for k, v in state_dict.items() if k != "train_loader"})

    def _apply_resume(self) -> None:
        resume = getattr(self._served, "load_state_dict", None)
        if self._resume is not None and callable(resume):
            resume(self._resume)
            self._resume = None

    def on_exception(self, exception: BaseException) -> None:
        """An interrupted fit leaves no source behind for the next fit of this datamodule."""
        self.serve_features(None)
        parent = getattr(super(), "on_exception", None)
        if parent is not None:
            parent(exception)
