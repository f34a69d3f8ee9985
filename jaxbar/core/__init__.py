"""The physics: pure functions over arrays and a static `CrossbarConfig`."""

from jaxbar.core.mapping import partition_sizes
from jaxbar.core.mvm import (
    ArrayOp,
    Programmed,
    analog_matmul,
    array_outputs,
    conv,
    conv_op,
    dense_op,
    drift,
    matmul,
    program,
    program_at_time,
)

__all__ = [
    "ArrayOp",
    "Programmed",
    "analog_matmul",
    "array_outputs",
    "conv",
    "conv_op",
    "dense_op",
    "drift",
    "matmul",
    "partition_sizes",
    "program",
    "program_at_time",
]
