"""CoOp's few-shot benchmark suite (11 datasets plus 4 domain-generalisation test sets) read
from one ``$DATA`` root: the catalogue, the readers of each layout and the image source."""

from p4q_lightning.data.suite.catalog import SUITE, SuiteDataset, suite_dataset, suite_names

__all__ = ["SUITE", "SuiteDataset", "suite_dataset", "suite_names"]
