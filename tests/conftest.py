"""Shared test fixtures: where the shared data/models live, and skipping when they are absent.

The shared folder is ``$JAXBAR_SHARED`` if set, else ``shared`` beside the repository root.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so a suite that passes once passes
# again (a failure found by `--hypothesis-seed` exploration is then a new fixed example).
settings.register_profile("jaxbar", derandomize=True)
settings.load_profile("jaxbar")

# Most of the suite's time on a small CPU is XLA compiling many small programs; a lower LLVM
# optimization level halves that and computes the same operations. Set before JAX is imported
# (pytest loads this file first); subprocesses inherit it.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA}".strip()

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_DEPTHS = (14, 20, 32, 56)


def host_devices_env(devices: int) -> dict[str, str]:
    """The environment of a subprocess that sees `devices` virtual CPU devices.

    The test's own XLA flags (the fast compilation above) are kept.
    """
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")


# Compiles the CPU kernel of one pair layout (argv[1]: 1 or 2) into numba's on-disk cache.
_KERNEL_WARMUP = """
import sys
import numpy as np
from jaxbar.core import ir
from jaxbar.core.ir import cpu_kernel
if cpu_kernel.available():
    rng = np.random.default_rng(0)
    g = rng.uniform(0.01, 1, (64, 16)).astype(np.float32)
    v = rng.uniform(0, 1, (64, 64)).astype(np.float32)
    g_neg = g[:, ::-1].copy() if sys.argv[1] == "2" else None
    ir.solve_input_source(g, v, 1e-4, 1e-4, g_neg=g_neg)[0].block_until_ready()
"""


def pytest_configure(config):
    """With several workers, compiles the CPU kernels once before they start.

    Each lane kernel takes about half a minute to compile, and every worker that solves a
    circuit would compile it again; two processes fill numba's cache in parallel instead.
    """
    if hasattr(config, "workerinput") or getattr(config.option, "numprocesses", 0) in (0, None):
        return
    procs = [subprocess.Popen([sys.executable, "-c", _KERNEL_WARMUP, p], cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p in ("1", "2")]
    for p in procs:
        p.wait()


def shared_dir() -> Path:
    """The shared folder (may not exist)."""
    env = os.environ.get("JAXBAR_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def require_shared(*parts: str) -> Path:
    """``shared_dir() / parts``, or skip the test with the reason if it is absent."""
    p = shared_dir().joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared resource not found: {p} (set JAXBAR_SHARED to the shared folder)")
    return p


def cifar_weights_path(depth: int) -> Path:
    """Path of the Keras CIFAR-10 ResNet-v1 file of a depth, or skip."""
    return require_shared("models", "cifar10-resnet-v1", f"resnet{depth}v1_cifar10.h5")


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared folder; skips if absent."""
    return require_shared()


@pytest.fixture(scope="session")
def cifar_models_dir() -> Path:
    """``shared/models/cifar10-resnet-v1``; skips if absent."""
    return require_shared("models", "cifar10-resnet-v1")


@pytest.fixture(scope="session")
def cifar_data_dir() -> Path:
    """``shared/data/cifar10-jpeg``; skips if absent."""
    return require_shared("data", "cifar10-jpeg")


@pytest.fixture(scope="session")
def cifar_mean(cifar_models_dir):
    """The CIFAR-10 training-set mean the ResNet models expect."""
    from jaxbar.data.preprocess import load_cifar_mean

    return load_cifar_mean(cifar_models_dir)


@pytest.fixture(scope="session")
def cifar_test_batch(cifar_data_dir, cifar_mean, tmp_path_factory):
    """``(x float32 preprocessed, labels)``: the first 2 test images of each class."""
    from jaxbar.data.image_folder import load_image_folder
    from jaxbar.data.preprocess import cifar_resnet_preprocess

    images, labels, _ = load_image_folder(cifar_data_dir, "test", limit=20,
                                          cache_dir=tmp_path_factory.mktemp("cache"))
    return cifar_resnet_preprocess(images, cifar_mean), labels
