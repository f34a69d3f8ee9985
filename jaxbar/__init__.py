"""jaxbar: a JAX simulator of analog in-memory-computing inference accelerators."""

from jaxbar.config import (
    ADCConfig,
    ArrayConfig,
    ConfigError,
    CrossbarConfig,
    DeviceConfig,
    InputsConfig,
    MappingConfig,
    NoiseConfig,
    ParasiticsConfig,
    WeightsConfig,
)
from jaxbar.core import Programmed, analog_matmul, matmul, partition_sizes, program

__version__ = "0.1.0"

__all__ = [
    "ADCConfig",
    "ArrayConfig",
    "ConfigError",
    "CrossbarConfig",
    "DeviceConfig",
    "InputsConfig",
    "MappingConfig",
    "NoiseConfig",
    "ParasiticsConfig",
    "Programmed",
    "WeightsConfig",
    "analog_matmul",
    "matmul",
    "partition_sizes",
    "program",
]
