"""Calibration of input and ADC ranges."""

import numpy as np
import pytest

import jaxbar
from jaxbar import CrossbarConfig
from jaxbar.calibration import calibrate, calibrated_adc_ranges, input_range, percentile_range


def test_percentile_range_covers_inner_fraction():
    v = np.random.default_rng(0).normal(size=200_000)
    lo, hi = percentile_range(v, 99.0)
    inside = np.mean((v >= lo) & (v <= hi))
    assert abs(inside - 0.99) < 1e-3
    assert percentile_range(np.zeros(10), 99.9)[0] < percentile_range(np.zeros(10), 99.9)[1]


def test_input_range_sign_and_percentile():
    x = np.abs(np.random.default_rng(1).normal(size=10_000))
    lo, hi = input_range(x, 100.0)
    assert lo == 0.0 and hi == pytest.approx(x.max())
    lo, hi = input_range(-x, 99.0)
    assert lo == -hi and np.mean(x <= hi) == pytest.approx(0.99, abs=1e-3)


@pytest.mark.parametrize("scheme", ["differential", "offset"])
def test_adc_ranges_cover_pre_adc_values(scheme):
    rng = np.random.default_rng(2)
    W = rng.laplace(size=(64, 16))
    x = np.maximum(rng.normal(size=(2000, 64)), 0)
    cfg = CrossbarConfig.from_dict({"mapping": {"scheme": scheme, "slices": 2},
                                    "weights": {"bits": 8}, "device": {"on_off_ratio": 50},
                                    "inputs": {"bits": 8, "range": [0, 3]},
                                    "adc": {"bits": 8, "range": "calibrated"}})
    ranges = calibrated_adc_ranges(x, W, cfg, percentile=99.0)
    assert len(ranges) == 2
    # Pre-ADC outputs computed independently: conductances × DAC outputs, per slice.
    prog = jaxbar.program(W, cfg)
    xq = np.round(np.clip(x / 3, 0, 1) * 255) / 255
    g = np.asarray(prog.g)[0]  # (rows, S, P, M)
    for s, (lo, hi) in enumerate(ranges):
        gs = g[:, s, 0] - g[:, s, 1] if scheme == "differential" else g[:, s, 0]
        y = xq @ gs
        inside = np.mean((y >= lo) & (y <= hi))
        assert inside == pytest.approx(0.99, abs=2e-3)
    if scheme == "offset":
        assert all(lo > 0 for lo, _ in ranges)  # the offset-containing currents are positive


def test_calibrated_beats_max_range():
    rng = np.random.default_rng(3)
    W = rng.laplace(size=(576, 32))
    x = np.maximum(rng.normal(size=(512, 576)), 0)
    base = CrossbarConfig.paper_baseline()
    cal = calibrate(x[:256], W, base)
    assert cal.inputs.range[0] == 0.0 and cal.adc.range != "calibrated"
    err = {}
    for name, cfg in (("cal", cal), ("max", cal.replace(**{"adc.range": "max"}))):
        y = np.asarray(jaxbar.analog_matmul(x[256:], W, cfg))
        err[name] = np.linalg.norm(y - x[256:] @ W) / np.linalg.norm(x[256:] @ W)
    assert err["cal"] < 0.05 < err["max"]


def test_power_of_two_slices():
    rng = np.random.default_rng(4)
    W, x = rng.normal(size=(32, 8)), rng.normal(size=(300, 32))
    cfg = CrossbarConfig.from_dict({"weights": {"bits": 8}, "mapping": {"slices": 4},
                                    "adc": {"bits": 8, "range": "calibrated"}})
    for lo, hi in calibrated_adc_ranges(x, W, cfg, power_of_two=True):
        assert lo == -hi and np.log2(hi) == np.round(np.log2(hi))
