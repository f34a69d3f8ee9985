"""Sweeps: study parsing, point expansion, the resumable results store, plots and tables.

Everything runs on a tiny random ResNet-8 and a synthetic image folder written here, so
no shared data is needed. Most layers are digital in these studies to keep compiles short.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from jaxbar.config import ConfigError
from jaxbar.nn.network_config import NetworkConfig
from jaxbar.study.results import (
    ResultStore,
    filter_rows,
    lookup,
    parse_filters,
    read_results,
    repair,
    summary_table,
)
from jaxbar.study.sweep import (
    apply_overrides,
    calibration_key,
    config_identity,
    expand_path,
    expand_points,
    load_study,
    plan,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model, a 3-class synthetic image folder and the CIFAR mean file."""
    import flax
    from PIL import Image

    from jaxbar.nn.models import ResNetV1Cifar
    from jaxbar.nn.params_io import save_params

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, n in (("test", 4), ("train", 4)):
        for k, c in enumerate(("a", "b", "c")):
            d = root / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):  # one dominant colour per class, so the images differ
                img = rng.normal(60 + 120 * np.eye(3)[k], 40, (32, 32, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    model = ResNetV1Cifar(8, width=4, num_classes=3, rngs=flax.nnx.Rngs(0))
    # A random ResNet predicts nearly one class for every image: a least-squares head on its
    # features of these images separates the classes, so errors change predictions.
    imgs, labels = [], []
    for k, c in enumerate(("a", "b", "c")):
        for f in sorted((root / "data" / "train" / c).iterdir()):
            imgs.append((np.asarray(Image.open(f), np.float32) - 120.0) / 255.0)
            labels.append(k)
    x = np.stack(imgs)
    feats = np.asarray(model.stage3(model.stage2(model.stage1(model.stem(x)))).mean(axis=(1, 2)))
    target = np.eye(3)[labels] - 1 / 3
    w, *_ = np.linalg.lstsq(feats - feats.mean(0), target, rcond=None)
    model.head.dense.kernel[...] = w.astype(np.float32)
    model.head.dense.bias[...] = (-feats.mean(0) @ w).astype(np.float32)
    save_params(root / "model.npz", model)
    np.save(root / "x_train_mean.npy", np.full((32, 32, 3), 120.0, np.float32))
    return root


def _study(tiny: Path, **changes) -> dict:
    d = {
        "name": "tiny", "root": str(tiny), "model": "resnet14", "params": "model.npz",
        "mean": "x_train_mean.npy", "data": "data", "trials": 2, "seed": 0, "batch_size": 6,
        "cache_dir": str(tiny / "cache"),
        "config": {"crossbar": {"device": {"programming_error": {"model": "independent"}}},
                   "layers": {"stage*": "digital"}},
        "grid": {"weights.bits": [0, 6], "device.programming_error.sigma": [0, 0.3, 1.0]},
    }
    d.update(changes)
    return d


def _write_study(tmp_path: Path, d: dict) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


# ---- points ----------------------------------------------------------------------------------

def test_grid_and_points_expansion():
    grid = {"a": [1, 2], "b": ["x", "y", "z"]}
    pts = expand_points(grid, [])
    assert pts == [{"a": a, "b": b} for a in (1, 2) for b in "xyz"]  # last key fastest
    pts = expand_points(grid, [{"c": 0}, {"c": 1, "d": True}])
    assert len(pts) == 12
    assert pts[0] == {"c": 0, "a": 1, "b": "x"}
    assert pts[6] == {"c": 1, "d": True, "a": 1, "b": "x"}
    assert expand_points({}, [{"c": 0}, {"c": 1}]) == [{"c": 0}, {"c": 1}]
    assert expand_points({}, []) == [{}]
    with pytest.raises(ConfigError, match="both in points and in grid"):
        expand_points(grid, [{"a": 3}])


def test_study_parsing_and_overrides(tiny, tmp_path, monkeypatch):
    d = _study(tiny, grid={"device.programming_error.sigma": ["1e-2", 0.02]},
               points=[{"mapping.scheme": "offset", "calibration.samples": 7},
                       {"config": "digital"}])
    s = load_study(_write_study(tmp_path, d))
    assert s.grid["device.programming_error.sigma"] == [0.01, 0.02]  # YAML's "1e-2" string
    pts = plan(s)
    # The digital point ignores crossbar keys, so its two grid copies collapse into one.
    assert [p.overrides for p in pts] == [
        {"mapping.scheme": "offset", "calibration.samples": 7,
         "device.programming_error.sigma": 0.01},
        {"mapping.scheme": "offset", "calibration.samples": 7,
         "device.programming_error.sigma": 0.02},
        {"config": "digital"}]
    net = pts[1].net
    assert net.crossbar.mapping.scheme == "offset"
    assert net.crossbar.device.programming_error.sigma == 0.02
    assert net.calibration.samples == 7
    assert net.crossbar_for("stage1.block0.conv1") is None  # the base's layer overrides
    assert pts[2].net.crossbar is None
    assert len({p.point_id for p in pts}) == 3
    # Ids depend on the study identity and the overrides, not on the order or the name.
    again = plan(load_study({**d, "name": "renamed", "root": str(tiny)}))
    assert [p.point_id for p in again] == [p.point_id for p in pts]
    more = plan(load_study({**d, "trials": 3, "root": str(tiny)}))
    assert not {p.point_id for p in more} & {p.point_id for p in pts}
    # A config field added later, at a default that keeps the old behaviour, leaves ids and
    # calibration keys as they are: stored results are still found.
    key = calibration_key(s, pts[0].net)
    with monkeypatch.context() as m:
        to_dict = NetworkConfig.to_dict
        m.setattr(NetworkConfig, "to_dict", lambda self: {**to_dict(self), "added_later": 0})
        later = load_study({**d, "root": str(tiny)})
        assert [p.point_id for p in plan(later)] == [p.point_id for p in pts]
        assert calibration_key(later, plan(later)[0].net) == key
    other = {**d["config"], "crossbar": {**d["config"]["crossbar"], "parasitics": {"tol": 1e-4}}}
    changed = plan(load_study({**d, "config": other, "root": str(tiny)}))
    assert not {p.point_id for p in changed} & {p.point_id for p in pts}
    assert config_identity(pts[2].net) == {"crossbar": None}
    with pytest.raises(ConfigError, match="adc.bitz"):
        plan(load_study({**d, "points": [{"adc.bitz": 3}], "root": str(tiny)}))
    with pytest.raises(ConfigError, match="unknown study keys"):
        load_study({**d, "trails": 3})
    with pytest.raises(ConfigError, match="non-empty list"):
        load_study({**d, "grid": {"adc.bits": 4}})
    base = s.base_network()
    assert apply_overrides(base, {"fold_batchnorm": True}).fold_batchnorm
    # Paths: variables with defaults, the shared-folder default, relative to the root.
    monkeypatch.delenv("JAXBAR_SHARED", raising=False)
    assert Path(expand_path("${JAXBAR_SHARED}/data", tmp_path)).resolve() == (
        REPO.parent / "shared" / "data").resolve()  # resolved: ../shared may be a link
    assert expand_path("${NOPE_X:-../sh}/d", tmp_path) == str(tmp_path.parent / "sh/d")
    monkeypatch.setenv("JAXBAR_SHARED", "/somewhere")
    assert expand_path("${JAXBAR_SHARED}/data", tmp_path) == "/somewhere/data"
    with pytest.raises(ConfigError, match="NOPE_Y"):
        expand_path("$NOPE_Y/x", tmp_path)


def test_solver_settings_keep_point_ids_and_calibration_keys(tiny):
    """Solver settings enter ids under their `parasitics.` keys, wherever they are written."""
    net = NetworkConfig().replace(**{"ir_solver.tol": 1e-4, "ir_solver.on_nonconvergence": "warn",
                                     "parasitics.r_row": 1e-5})
    assert config_identity(net) == {"crossbar": {"parasitics": {
        "r_row": 1e-5, "tol": 1e-4, "on_nonconvergence": "warn"}}}
    old = {"parasitics.tol": [1e-4], "parasitics.on_nonconvergence": ["warn"]}
    new = {"ir_solver.tol": [1e-4], "ir_solver.on_nonconvergence": ["warn"]}
    studies = [load_study(_study(tiny, grid={**g, "weights.bits": [0, 6]})) for g in (old, new)]
    a, b = (plan(s) for s in studies)
    assert [p.point_id for p in a] == [p.point_id for p in b]
    assert a[0].net == b[0].net and a[0].net.crossbar.ir_solver.tol == 1e-4
    assert [calibration_key(studies[0], p.net) for p in a] == [
        calibration_key(studies[1], p.net) for p in b]
    base = {**_study(tiny)["config"], "crossbar": {"parasitics": {"tol": 1e-4}}}
    moved = {**_study(tiny)["config"], "crossbar": {"ir_solver": {"tol": 1e-4}}}
    assert ([p.point_id for p in plan(load_study(_study(tiny, config=base)))]
            == [p.point_id for p in plan(load_study(_study(tiny, config=moved)))])
    with pytest.raises(ConfigError, match=r"parasitics\.tol .* ir_solver\.tol"):
        plan(load_study(_study(tiny, points=[{"parasitics.tol": 1e-3}],
                               grid={"ir_solver.tol": [1e-4]})))


def test_committed_parasitics_results_have_no_pending_points():
    """Every point of the parasitic studies, as their YAML files define them, has its result.

    Studies 05 and 05b set solver settings as `parasitics.` keys; study 07 ran in parts.
    """
    for name, n in (("05_parasitics", 11), ("05b_parasitics_fitted_arrays", 11),
                    ("07_parasitics_gated", 69)):
        rows = read_results(REPO / "studies" / "results" / f"{name}.jsonl")
        points = plan(load_study(REPO / "studies" / f"{name}.yaml"))
        assert len(points) == n
        assert {p.point_id for p in points} <= {r["point_id"] for r in rows}, name
        assert {r["n_images"] for r in rows} == {1000}, name


def test_plan_groups_structures():
    s = load_study({"model": "resnet14", "params": "p.npz", "data": "d", "config": "ideal",
                    "grid": {"device.programming_error.sigma": [0.0, 0.1],
                             "weights.bits": [0, 8]},
                    "points": [{"device.programming_error.model": "independent"}]})
    pts = plan(s)
    # Same structure (bits) together; sigma is traced, so each pair compiles once.
    assert [p.net.crossbar.weights.bits for p in pts] == [0, 0, 8, 8]
    assert [p.index for p in pts] == [0, 2, 1, 3]


def test_dry_run_lists_points(tiny, tmp_path, capsys):
    from jaxbar.cli import main

    study = _write_study(tmp_path, _study(tiny))
    out = tmp_path / "r.jsonl"
    assert main(["sweep", str(study), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "6 points (0 done" in text
    assert text.count("todo") == 6
    assert "device.programming_error.sigma=0.3" in text
    assert not out.exists()
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2


# ---- the results store -----------------------------------------------------------------------

def test_store_append_and_repair(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResultStore(p) as store:
        store.append({"point_id": "a", "mean": np.float32(0.5), "acc": np.arange(2)})
        store.append({"point_id": "b", "mean": 0.25})
        assert store.completed == {"a", "b"}
        with pytest.raises(ValueError, match="locked"):
            ResultStore(p).open()
    good = p.read_bytes()
    assert repair(p) == 0
    # Killed mid-write: no final newline.
    p.write_bytes(good + b'{"point_id": "c", "me')
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert repair(p) == len(b'{"point_id": "c", "me')
    assert p.read_bytes() == good
    # A torn line that happens to end in a newline is caught too.
    p.write_bytes(good + b'{"point_id": "c"\n')
    with pytest.warns(UserWarning, match="incomplete last line"):
        with ResultStore(p) as store:
            assert store.completed == {"a", "b"}
            store.append({"point_id": "c", "mean": 1.0})
    rows = read_results(p)
    assert [r["point_id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["acc"] == [0, 1] and rows[0]["mean"] == 0.5
    # A file with only a partial line becomes empty.
    q = tmp_path / "q.jsonl"
    q.write_bytes(b'{"poi')
    with pytest.warns(UserWarning):
        repair(q)
    assert q.read_bytes() == b""


def test_ci_matches_student_t():
    from jaxbar.study.engine import accuracy_stats

    acc = np.array([0.91, 0.88, 0.90, 0.87, 0.93])
    st = accuracy_stats(acc)
    lo, hi = stats.t.interval(0.95, len(acc) - 1, loc=acc.mean(), scale=stats.sem(acc))
    assert st["ci95"][0] == pytest.approx(lo, abs=1e-12)
    assert st["ci95"][1] == pytest.approx(hi, abs=1e-12)
    assert st["std"] == pytest.approx(acc.std(ddof=1))
    assert accuracy_stats([0.5])["ci95"] == (0.5, 0.5)
    # The table reports the half-width.
    row = {"overrides": {"adc.bits": 6}, "mean": st["mean"], "ci95": list(st["ci95"]),
           "trials": 5, "n_images": 100, "seconds": 1.5}
    table = summary_table([row])
    assert f"{100 * (hi - lo) / 2:.2f}" in table and "adc.bits" in table
    assert summary_table([row], fmt="markdown").splitlines()[1].startswith("|")
    assert summary_table([row], fmt="csv").splitlines()[1].startswith("6,")
    assert math.isclose(float(table.splitlines()[2].split()[1]), 100 * st["mean"], abs_tol=6e-3)


def test_lookup_and_filters():
    row = {"overrides": {"mapping.scheme": "offset"}, "n_images": 10,
           "config": {"crossbar": {"device": {"on_off_ratio": None,
                                              "programming_error": {"sigma": 0.02}}},
                      "calibration": {"samples": 5}}}
    assert lookup(row, "mapping.scheme") == "offset"
    assert lookup(row, "device.programming_error.sigma") == 0.02
    assert lookup(row, "calibration.samples") == 5
    assert lookup(row, "n_images") == 10
    assert lookup(row, "adc.bits", "x") == "x"
    f = parse_filters(["device.programming_error.sigma=0.02", "device.on_off_ratio=null"])
    assert filter_rows([row], f) == [row]
    assert filter_rows([row], parse_filters(["mapping.scheme=differential"])) == []
    digital = {"overrides": {"config": "digital"}, "config": {"crossbar": None}}
    f = parse_filters(["mapping.scheme=offset"])
    assert filter_rows([row, digital], f) == [row]
    assert filter_rows([row, digital], f, keep_missing=True) == [row, digital]
    with pytest.raises(ValueError):
        parse_filters(["novalue"])


# ---- plots -----------------------------------------------------------------------------------

def _fake_rows():
    rows = []
    for scheme in ("differential", "offset"):
        for slices in (1, 2):
            for s in (0.0, 0.01, 0.05):
                m = 0.9 - s * (2 if scheme == "offset" else 1) * slices
                rows.append({"point_id": f"{scheme}{slices}{s}", "study": "fake",
                             "overrides": {"mapping.scheme": scheme, "mapping.slices": slices,
                                           "device.programming_error.sigma": s},
                             "mean": m, "ci95": [m - 0.01, m + 0.01], "trials": 5,
                             "n_images": 100, "config": {"crossbar": {}}})
    rows.append({"point_id": "dig", "overrides": {"config": "digital"}, "mean": 0.91,
                 "ci95": [0.91, 0.91], "trials": 1, "n_images": 100,
                 "config": {"crossbar": None}})
    return rows


def test_plot_png_and_svg(tmp_path):
    from PIL import Image

    from jaxbar.cli import main

    p = tmp_path / "r.jsonl"
    with ResultStore(p) as store:
        for r in _fake_rows():
            store.append(r)
    png = tmp_path / "fig.png"
    assert main(["plot", str(p), "--x", "device.programming_error.sigma", "--hue",
                 "mapping.scheme", "--style", "mapping.slices", "--out", str(png),
                 "--logx"]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100
    svg = tmp_path / "fig.svg"
    assert main(["plot", str(p), "--x", "device.programming_error.sigma", "--hue",
                 "mapping.scheme", "--filter", "mapping.slices=1", "--out", str(svg)]) == 0
    assert "<svg" in svg.read_text()[:500]
    # A hidden varying key (slices) splits lines, with a warning.
    from jaxbar.study.plot import plot_results

    with pytest.warns(UserWarning, match="mapping.slices"):
        fig = plot_results(_fake_rows(), "device.programming_error.sigma", "mapping.scheme")
    assert len(fig.axes[0].lines) == 4 + 1  # 4 data lines + the digital reference
    # A key swept together with x (one value per x value) does not split lines.
    joint = [r for r in _fake_rows() if r["overrides"].get("mapping.slices", 1) == 1]
    for r in joint:
        if "device.programming_error.sigma" in r["overrides"]:
            r["overrides"]["device.read_noise.sigma"] = r["overrides"][
                "device.programming_error.sigma"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_results(joint, "device.programming_error.sigma", "mapping.scheme")
    assert len(fig.axes[0].lines) == 2 + 1
    assert main(["plot", str(p), "--x", "adc.bits", "--out", str(png)]) == 2
    assert main(["table", str(p), "--filter", "mapping.scheme=offset"]) == 0


# ---- a real sweep: calibration cache, resume after SIGKILL -----------------------------------

def test_sweep_calibrates_once_and_records(tiny, tmp_path):
    from jaxbar.study.sweep import run_sweep

    d = _study(tiny, trials=2, per_class=True, grid={
        "device.programming_error.sigma": [0.0, 0.5], "adc.bits": [4, 6]})
    d["config"]["crossbar"].update({"inputs": {"bits": 6},
                                    "adc": {"bits": 6, "range": "calibrated"}})
    d["config"]["calibration"] = {"samples": 6}
    d["config"]["layers"] = {"stage*": "digital", "stem.conv": "digital"}  # faster compiles
    out = tmp_path / "r.jsonl"
    s = run_sweep(load_study(d), out, progress=False, log=lambda *_: None)
    assert (s.total, s.done, s.skipped) == (4, 4, 0)
    rows = read_results(out)
    sources = [r["calibration"]["source"] for r in rows]
    assert sources.count("computed") == 1 and sources.count("cached") == 3  # sigma, bits free
    assert len({r["calibration"]["key"] for r in rows}) == 1
    assert len(list((tmp_path / "r.jsonl.calibrations").glob("*.json"))) == 1
    r = rows[0]
    for key in ("point_id", "overrides", "config", "accuracies", "mean", "std", "ci95",
                "n_images", "versions", "seconds", "trial_keys", "seed", "per_class"):
        assert key in r, key
    assert r["n_images"] == 12 and len(r["accuracies"]) == 2
    assert np.array(r["per_class"]).shape == (2, 3)
    assert r["versions"]["jax"] and r["config"]["crossbar"]["adc"]["bits"] in (4, 6)
    assert r["calibration"]["layers"]["head.dense"]["adc_range"] is not None
    # Nothing left to do on a second run.
    s = run_sweep(load_study(d), out, progress=False, log=lambda *_: None)
    assert (s.done, s.skipped) == (0, 4)


def _sweep_cmd(study: Path, out: Path) -> list[str]:
    code = "import sys; from jaxbar.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, "sweep", str(study), "--out", str(out), "--quiet"]


def test_resume_after_kill_equals_uninterrupted_run(tiny, tmp_path):
    from jaxbar.study.sweep import run_sweep

    study_dict = _study(tiny)
    study = _write_study(tmp_path, study_dict)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "killed.jsonl"
    log = tmp_path / "killed.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(_sweep_cmd(study, out), env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no row written in time"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # the second structure is compiling now
    finally:
        proc.wait()
    n_killed = out.read_bytes().count(b"\n")
    assert 1 <= n_killed < 6, n_killed
    with out.open("ab") as f:  # and as if killed in the middle of writing a row
        f.write(b'{"point_id": "0123", "accuracies": [0.3')
    res = subprocess.run(_sweep_cmd(study, out), env=env, cwd=REPO, capture_output=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert b"incomplete last line" in res.stderr

    ref = tmp_path / "ref.jsonl"
    run_sweep(load_study(study), ref, progress=False, log=lambda *_: None)
    got, want = read_results(out, dedupe=False), read_results(ref, dedupe=False)
    assert [r["point_id"] for r in got] == [r["point_id"] for r in want]
    assert len(want) == 6
    for g, w in zip(got, want, strict=True):
        assert g["overrides"] == w["overrides"]
        assert g["accuracies"] == w["accuracies"]
        assert g["config"] == w["config"]
    assert len({tuple(r["accuracies"]) for r in want}) > 1  # the errors do something
    # Every line is a whole JSON row.
    assert all(json.loads(line) for line in out.read_text().splitlines())
