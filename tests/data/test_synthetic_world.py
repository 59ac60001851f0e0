"""The synthetic world: deterministic rendering, compositional classes, captions, the source."""

from __future__ import annotations

import torch
from data_helpers import label_counts

from p4q_lightning.data.synthetic import (
    CaptionWriter,
    ClassSet,
    WorldConfig,
    generate_split,
    render,
    sample_scenes,
)
from p4q_lightning.data.synthetic.task import stream_generator


def _batch(seed: int, n: int = 16):
    cfg = WorldConfig()
    g = torch.Generator().manual_seed(seed)
    scenes = sample_scenes(n, cfg, g)
    return cfg, scenes, render(scenes, cfg, g)


def test_render_is_deterministic_per_seed_and_differs_across_seeds():
    _, _, a = _batch(0)
    _, _, b = _batch(0)
    _, _, c = _batch(1)
    assert a.dtype == torch.uint8 and a.shape == (16, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.float().std() > 20  # not blank: objects, backgrounds and noise vary


def test_object_colour_is_visible():
    cfg = WorldConfig(distractor_prob=0.0, max_noise=0.0)
    n = 64
    g = torch.Generator().manual_seed(0)
    red, blue = cfg.colours.index("red"), cfg.colours.index("blue")
    colour = torch.tensor([red, blue] * (n // 2))
    zeros = torch.zeros(n, dtype=torch.long)  # plain circles (a ring has a hole in the middle)
    scenes = sample_scenes(
        n, cfg, g, colour=colour, shape=zeros, texture=zeros, size=torch.ones(n, dtype=torch.long)
    )
    img = render(scenes, cfg, g).float()
    # the pixel at each large object's centre carries its colour: red has R >> B, blue the opposite
    centre = img[torch.arange(n), :, scenes.cy.long(), scenes.cx.long()]
    r_minus_b = centre[:, 0] - centre[:, 2]
    assert (r_minus_b[0::2] > 60).all() and (r_minus_b[1::2] < -60).all()


def test_class_names_are_compositional_and_share_words():
    classes = ClassSet()
    names = classes.classnames
    assert len(names) == len(classes) == 48 and len(set(names)) == 48
    assert names[0] == "plain red circle"
    words = [w for n in names for w in n.split()]
    assert all(words.count(w) >= 12 for w in set(words))  # every word appears in many classes


def test_generate_split_labels_and_streams():
    classes = ClassSet()
    train, y_train = generate_split(classes, 2, world_seed=0, stream="train")
    test, y_test = generate_split(classes, 2, world_seed=0, stream="test")
    again, _ = generate_split(classes, 2, world_seed=0, stream="train")
    assert train.shape == (96, 3, 32, 32) and y_train.tolist()[:4] == [0, 0, 1, 1]
    assert torch.equal(train, again) and not torch.equal(train, test)
    assert torch.equal(y_train, y_test)
    g0, g1 = stream_generator(0, "train"), stream_generator(1, "train")
    assert not torch.equal(torch.rand(4, generator=g0), torch.rand(4, generator=g1))


def test_captions_are_varied_deterministic_and_name_the_shape():
    cfg, scenes, _ = _batch(3, n=200)
    caps = CaptionWriter(cfg, seed=5)(scenes)
    assert caps == CaptionWriter(cfg, seed=5)(scenes)
    assert caps != CaptionWriter(cfg, seed=6)(scenes)
    assert len(set(caps)) > 150
    for i, c in enumerate(caps):
        assert cfg.shapes[int(scenes.shape[i])] in c
    colour_named = sum(cfg.colours[int(scenes.colour[i])] in c for i, c in enumerate(caps))
    assert colour_named > 160


def test_synthetic_datamodule_source(dm_factory):
    dm = dm_factory(
        "synthetic:3",
        shots=2,
        seed=1,
        image_size=None,
        synthetic={"train_per_class": 6, "test_per_class": 2},
    )
    dm.setup("fit")
    dm.setup("test")
    assert dm.world_seed == 3 and dm.image_size == 32 and dm.num_classes == 48
    assert dm.classnames == ClassSet().classnames and "a photo of a {}." in dm.templates
    assert label_counts(dm.train_dataset) == {c: 2 for c in range(48)}
    assert len(dm.val_dataset) == 96 and len(dm.test_dataset) == 96
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    expected, _ = generate_split(ClassSet(), 2, world_seed=3, stream="test")
    assert torch.equal(dm.source.images("test"), expected)
