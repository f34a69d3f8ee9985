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
from jaxbar.nn.analogize import analogize, map_batches, program_model
from jaxbar.nn.calibrate import calibrate_model
from jaxbar.study.montecarlo import monte_carlo

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
    "analogize",
    "calibrate_model",
    "drift",
    "map_batches",
    "matmul",
    "monte_carlo",
    "partition_sizes",
    "program",
    "program_at_time",
    "program_model",
]
