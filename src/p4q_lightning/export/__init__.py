"""Low-bit export: real integer weights on disk, a loadable classifier, and int8 CPU inference."""

from p4q_lightning.export.format import (
    ExportMismatchError,
    ExportWriteError,
    LowBitFormatError,
    read_container,
    write_container,
)
from p4q_lightning.export.int8 import (
    Int8Linear,
    convert_to_int8,
    cpu_int8_report,
    fbgemm_exact,
    int8_backend,
    int8_convertible,
)
from p4q_lightning.export.loader import LowBitCLIP, load_lowbit
from p4q_lightning.export.packing import pack_codes, packed_nbytes, storage_bits, unpack_codes
from p4q_lightning.export.writer import (
    ExportReport,
    estimate_lowbit_nbytes,
    export_lowbit,
    float32_nbytes,
    lowbit_state,
)

__all__ = [
    "ExportMismatchError",
    "ExportReport",
    "ExportWriteError",
    "Int8Linear",
    "LowBitCLIP",
    "LowBitFormatError",
    "convert_to_int8",
    "cpu_int8_report",
    "estimate_lowbit_nbytes",
    "export_lowbit",
    "fbgemm_exact",
    "float32_nbytes",
    "int8_backend",
    "int8_convertible",
    "load_lowbit",
    "lowbit_state",
    "pack_codes",
    "packed_nbytes",
    "read_container",
    "storage_bits",
    "unpack_codes",
    "write_container",
]
