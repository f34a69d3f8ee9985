"""Studies built on the core: Monte Carlo error studies and sweeps."""
