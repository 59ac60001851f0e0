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

    def serve_features(self, source: FeatureSource | None) -> None:
        """Serve ``source``'s feature loader from :meth:`serve` (None: the images again)."""
        self.feature_source = source

    def serve(self, images: DataLoader) -> Any:
        """The training loader: ``images``, or the attached source's loader over their
        cached features."""
        if self.feature_source is None:
            return images
        return self.feature_source.dataloader(images)

    def on_exception(self, exception: BaseException) -> None:
        """An interrupted fit leaves no source behind for the next fit of this datamodule."""
        self.serve_features(None)
        parent = getattr(super(), "on_exception", None)
        if parent is not None:
            parent(exception)
