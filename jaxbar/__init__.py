"""jaxbar: a JAX simulator of analog in-memory-computing inference accelerators."""

from jaxbar.config import (
    ADCConfig,
    ArrayConfig,
    ConfigError,
    CrossbarConfig,
    DeviceConfig,
    DriftConfig,
    InputsConfig,
    IRSolverConfig,
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
from jaxbar.nn.analogize import (
    analog_layers,
    analogize,
    digital_model,
    map_batches,
    program_model,
    stack_batches,
    update_configs,
)
from jaxbar.nn.calibrate import apply_calibration, calibrate_model
from jaxbar.nn.cost import cost
from jaxbar.study.montecarlo import monte_carlo
from jaxbar.version import __version__ as __version__

__all__ = [
    "ADCConfig",
    "ArrayConfig",
    "ConfigError",
    "CrossbarConfig",
    "DeviceConfig",
    "DriftConfig",
    "IRSolverConfig",
    "InputsConfig",
    "MappingConfig",
    "NoiseConfig",
    "ParasiticsConfig",
    "Programmed",
    "WeightsConfig",
    "analog_layers",
    "analog_matmul",
    "analogize",
    "apply_calibration",
    "calibrate_model",
    "cost",
    "digital_model",
    "drift",
    "map_batches",
    "matmul",
    "monte_carlo",
    "partition_sizes",
    "program",
    "program_at_time",
    "program_model",
    "stack_batches",
    "update_configs",
]
