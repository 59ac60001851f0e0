"""Lightning callbacks: calibration of the PTQ student, low-bit export, FP/PTQ/P4Q comparison."""

from p4q_lightning.callbacks.calibration import CalibrationCallback
from p4q_lightning.callbacks.compare import ComparisonCallback
from p4q_lightning.callbacks.export import LowBitExportCallback

__all__ = ["CalibrationCallback", "ComparisonCallback", "LowBitExportCallback"]
