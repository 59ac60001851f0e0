"""``FeatureServing``: a datamodule's training loader is its images unless a source is attached."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from p4q_lightning.data import FeatureServing


class Source:
    """Stands in for the training code's feature source."""

    def __init__(self) -> None:
        self.asked_with: list[DataLoader] = []

    def dataloader(self, images: DataLoader) -> DataLoader:
        self.asked_with.append(images)
        return DataLoader(["features"])


class Data(FeatureServing, LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return self.serve(DataLoader(["image"]))


def test_images_unless_a_source_is_attached():
    dm, source = Data(), Source()
    assert list(dm.train_dataloader()) == [["image"]]
    dm.serve_features(source)
    assert dm.feature_source is source
    assert list(dm.train_dataloader()) == [["features"]]
    assert list(source.asked_with[0]) == [["image"]]  # the image loader is what gets encoded
    dm.serve_features(None)
    assert list(dm.train_dataloader()) == [["image"]]


def test_an_interrupted_fit_leaves_no_source_behind():
    dm = Data()
    dm.serve_features(Source())
    dm.on_exception(RuntimeError("stopped"))
    assert dm.feature_source is None


def test_few_shot_datamodule_serves_features_of_its_training_images(dm_factory, imagenet_folder):
    dm, source = dm_factory(str(imagenet_folder), shots=2), Source()
    dm.setup("fit")
    dm.serve_features(source)
    assert list(dm.train_dataloader()) == [["features"]]
    images = source.asked_with[0]
    assert images.dataset.dataset is dm.train_dataset and images.batch_size == dm.hparams.batch_size
