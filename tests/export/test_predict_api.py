"""The low-bit classifier's predict API takes PIL images, paths and tensors alike, and loading
it does not warn that the model was "initialized randomly" (its weights come from the file)."""

from __future__ import annotations

import logging

import pytest
import torch
from export_helpers import CLASSNAMES, export_head, make_student
from PIL import Image

from p4q_lightning.export import load_lowbit


@pytest.fixture(scope="module")
def lowbit_file(tiny_float, tiny_name, tmp_path_factory):
    model, text = make_student(tiny_float, "w8a8")
    return export_head(tmp_path_factory.mktemp("predict") / "m.safetensors", model, tiny_name, text)


def test_load_lowbit_does_not_warn_about_random_weights(lowbit_file, caplog):
    with caplog.at_level(logging.WARNING):
        load_lowbit(lowbit_file)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # the filter is gone afterwards
        logging.warning("Model initialized randomly.")
    assert any("initialized randomly" in r.getMessage() for r in caplog.records)


def test_pil_images_paths_and_tensors_give_the_same_predictions(lowbit_file, tmp_path):
    clf = load_lowbit(lowbit_file)
    generator = torch.Generator().manual_seed(0)
    pils = [
        Image.fromarray(
            torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8).numpy()
        )
        for _ in range(3)
    ]
    paths = []
    for i, img in enumerate(pils):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    tensors = torch.stack([clf.preprocess(img) for img in pils])
    expected = clf.predict_names(tensors)
    assert expected and all(name in CLASSNAMES for name in expected)
    assert clf.predict_names(pils) == expected
    assert clf.predict_names([str(p) for p in paths]) == expected
    assert clf.predict_names(paths[0]) == expected[:1]
    assert clf.predict_names(pils[1]) == expected[1:2]
    assert clf.predict_names(tensors[2]) == expected[2:]  # one [3, H, W] image
    assert torch.equal(clf.predict(pils), clf.predict(tensors))
    top = clf.topk(pils, k=3)
    assert [row[0][0] for row in top] == expected
    assert all(len(row) == 3 and row[0][1] >= row[1][1] >= row[2][1] for row in top)
    assert sum(p for _, p in clf.topk(pils[0], k=len(CLASSNAMES))[0]) == pytest.approx(1.0)


def test_bad_image_input_is_one_clear_error(lowbit_file):
    clf = load_lowbit(lowbit_file)
    with pytest.raises(ValueError, match="no images"):
        clf.predict([])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        clf.predict(torch.zeros(32, 32))
