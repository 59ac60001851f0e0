"""Lightning callbacks: PTQ calibration, low-bit export, FP/PTQ/P4Q comparison, predictions."""

from p4q_lightning.callbacks.calibration import CalibrationCallback
from p4q_lightning.callbacks.compare import ComparisonCallback
from p4q_lightning.callbacks.export import LowBitExportCallback
from p4q_lightning.callbacks.predictions import PredictionWriter

__all__ = ["CalibrationCallback", "ComparisonCallback", "LowBitExportCallback", "PredictionWriter"]
