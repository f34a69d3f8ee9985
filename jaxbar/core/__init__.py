"""The physics: pure functions over arrays and a static `CrossbarConfig`."""

from jaxbar.core.mapping import partition_sizes
from jaxbar.core.mvm import Programmed, analog_matmul, array_outputs, matmul, program

__all__ = ["Programmed", "analog_matmul", "array_outputs", "matmul", "partition_sizes", "program"]
