"""``scoring_classes``: a test set scored by rows of the training classifier, or by the learned
prompt re-targeted to its own class names, with the training classes restored afterwards."""

from __future__ import annotations

import pytest
import torch

import tiny_world
from p4q_lightning.data.test_sets import EvalSet
from p4q_lightning.module import P4QModule
from p4q_lightning.test_classes import scoring_classes

TRAIN = ["red circle", "blue square", "green triangle"]
OTHER = ("yellow cross", "purple star", "orange ring", "grey dot")


@pytest.fixture(scope="module")
def classifier(world):
    module = P4QModule(**tiny_world.module_args(world, method="coop"))
    module.set_classes(TRAIN, ["a photo of a {}."])
    with torch.no_grad():
        module.classifier.prompt_learner.ctx.normal_(generator=torch.Generator().manual_seed(1))
    return module.classifier


def text(classifier) -> torch.Tensor:
    with torch.no_grad():
        return classifier.student_text_features().clone()


def test_a_restricted_set_takes_rows_of_the_training_classifier(classifier):
    full = text(classifier)
    restricted = EvalSet("dg", (TRAIN[2], TRAIN[0]), ("a photo of a {}.",), (2, 0))
    with scoring_classes(classifier, restricted) as rows:
        assert torch.equal(rows(text(classifier)), full[[2, 0]])
        assert classifier.classnames == TRAIN  # nothing re-targeted


def test_a_retargeted_set_uses_its_names_and_template_then_restores(classifier):
    before = text(classifier)
    other = EvalSet("other", OTHER, ("a {} texture.",), None, retarget=True)
    with scoring_classes(classifier, other) as rows:
        inside = rows(text(classifier))
        assert classifier.classnames == list(OTHER) and classifier.templates == ["a {} texture."]
    assert inside.shape[0] == 4
    assert classifier.classnames == TRAIN and classifier.templates == ["a photo of a {}."]
    assert torch.equal(text(classifier), before)
    # the same learned context with the new names: what the prompt gives for them directly
    classifier.set_classes(list(OTHER))
    try:
        assert torch.allclose(text(classifier), inside)
    finally:
        classifier.set_classes(TRAIN)


def test_a_class_specific_prompt_refuses_other_classes(world):
    args = tiny_world.module_args(world, method="coop", prompt={"n_ctx": 2, "class_specific": True})
    module = P4QModule(**args)
    module.set_classes(TRAIN)
    other = EvalSet("other", OTHER[:3], ("{}",), None, retarget=True)
    with pytest.raises(ValueError, match="class-specific"):
        with scoring_classes(module.classifier, other):
            pass
