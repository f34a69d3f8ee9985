"""jaxbar: a JAX simulator of analog in-memory-computing inference accelerators."""

from jaxbar.config import (
    ADCConfig,
    ArrayConfig,
    ConfigError,
    CrossbarConfig,
    DeviceConfig,
    DriftConfig,
    InputsConfig,
    MappingConfig,
    NoiseConfig,
    ParasiticsConfig,
    WeightsConfig,
)
from jaxbar.core import (
    Programmed,
    analog_matmul,
    drift,
    matmul,
    partition_sizes,
    program,
    program_at_time,
)

__version__ = "0.1.0"

__all__ = [
    "ADCConfig",
    "ArrayConfig",
    "ConfigError",
    "CrossbarConfig",
    "DeviceConfig",
    "DriftConfig",
    "InputsConfig",
    "MappingConfig",
    "NoiseConfig",
    "ParasiticsConfig",
    "Programmed",
    "WeightsConfig",
    "analog_matmul",
    "drift",
    "matmul",
    "partition_sizes",
    "program",
    "program_at_time",
]
