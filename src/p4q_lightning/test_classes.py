"""Scoring a test set whose classes are not the training classes (DG, cross-dataset, new).

A test set (:class:`~p4q_lightning.data.test_sets.EvalSet`) is scored either by rows of the
training classifier (``class_index``: ImageNet-A/-R's 200 classes among ImageNet's 1,000) or,
``retarget``, by the learned prompt with the set's own class names and template (CoCoOp's new
classes, cross-dataset transfer). :func:`scoring_classes` sets the classifier up for one set and
restores the training classes afterwards; the module and the comparison both use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

Rows = Callable[[torch.Tensor], torch.Tensor]


def check_scorable(classifier: Any, test_set: Any) -> None:
    """A class-specific context is learned per training class: it cannot score other names."""
    prompt = getattr(classifier, "prompt_args", None)
    if getattr(test_set, "retarget", False) and getattr(prompt, "class_specific", False):
        if getattr(classifier, "prompt_learner", None) is not None:
            raise ValueError(
                f"test set {test_set.name!r} has its own classes, but the prompt is class-specific "
                "(one context per training class): set model.prompt.class_specific false to "
                "evaluate on other classes"
            )


@contextlib.contextmanager
def scoring_classes(
    classifier: Any, test_set: Any | None, templates: list[str] | None = None
) -> Iterator[Rows]:
    """Within the block the classifier scores ``test_set`` (None: its own split). Yields the
    function that takes the classifier's class embeddings [n_cls, D] to the set's rows.

    ``templates`` overrides the set's own templates (the model's explicit ``templates``)."""
    index = getattr(test_set, "class_index", None)
    if test_set is None or not getattr(test_set, "retarget", False):
        if index is None:
            yield lambda text: text
        else:
            rows = torch.as_tensor(list(index), dtype=torch.long)
            yield lambda text: text[rows.to(text.device)]
        return
    check_scorable(classifier, test_set)
    names, saved_templates = list(classifier.classnames), list(classifier.templates)
    classifier.set_classes(list(test_set.classnames), templates or list(test_set.templates))
    classifier.invalidate_text()
    try:
        yield lambda text: text
    finally:
        classifier.set_classes(names, saved_templates)
        classifier.invalidate_text()
