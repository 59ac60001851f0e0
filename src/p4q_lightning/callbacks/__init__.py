"""Lightning callbacks: calibration (and, from other issues, low-bit export and comparisons)."""

from p4q_lightning.callbacks.calibration import CalibrationCallback

__all__ = ["CalibrationCallback"]
