"""The self-contained demo: data, training, calibration, sweep, plot."""

import numpy as np
from PIL import Image

from jaxbar.study import demo


def test_demo_runs_and_shows_the_mapping_effect(tmp_path):
    out = tmp_path / "demo.png"
    rows = demo.run_demo(trials=2, sigmas=(0.0, 0.15), out=out)
    assert Image.open(out).format == "PNG"
    acc = {(r["mapping"], r["sigma"]): r["mean"] for r in rows}
    # Effects small at sigma 0 (8-bit quantization only); offset suffers far more from
    # state-proportional error than differential mapping (PHYSICS §2, §8).
    assert acc[("differential", 0.0)] > 0.9 and acc[("offset", 0.0)] > 0.9
    assert acc[("offset", 0.15)] < acc[("differential", 0.15)] - 0.15
    assert np.isfinite([r["ci95"][0] for r in rows]).all()
