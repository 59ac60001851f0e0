"""The PTQ engine: bit specs by layer group, observers, fake-quant modules, conversion,
calibration. Knows torch and open_clip, nothing of Lightning."""

from p4q_lightning.quant.calibrate import calibrate, group_statistics
from p4q_lightning.quant.convert import (
    is_calibrated,
    quant_modules,
    quant_spec_of,
    quantize,
    quantizers,
    text_tower_parts,
    vision_tower,
)
from p4q_lightning.quant.modules import (
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    QuantMultiheadAttention,
)
from p4q_lightning.quant.quantizer import (
    ActivationQuantizer,
    Log2Quantizer,
    NotCalibratedError,
    WeightQuantizer,
)
from p4q_lightning.quant.spec import ALL_GROUPS, PRESETS, GroupSpec, QuantSpec, get_spec

__all__ = [
    "ALL_GROUPS",
    "PRESETS",
    "ActivationQuantizer",
    "GroupSpec",
    "Log2Quantizer",
    "NotCalibratedError",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantMultiheadAttention",
    "QuantSpec",
    "WeightQuantizer",
    "calibrate",
    "get_spec",
    "group_statistics",
    "is_calibrated",
    "quant_modules",
    "quant_spec_of",
    "quantize",
    "quantizers",
    "text_tower_parts",
    "vision_tower",
]
