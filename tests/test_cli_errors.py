"""Bad input gives one `jaxbar <command>: error:` line naming it (exit 2), never a traceback
or a silently wrong number; the same checks in the Python API."""

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxbar.cli import main
from jaxbar.config import ConfigError, load_yaml, parse_override
from jaxbar.nn.analogize import analogize
from jaxbar.nn.models import ResNetV1Cifar
from jaxbar.nn.network_config import NetworkConfig
from jaxbar.nn.params_io import ParamsError, load_params, named_variables, save_params
from jaxbar.study.engine import accuracy_stats, evaluate

from .conftest import REPO_ROOT


def _model():
    return ResNetV1Cifar(8, width=4, num_classes=3, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model's parameter file with its mean, and a 3-class image folder of 32x32 JPEGs."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(3):
            d = root / "data" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(3):
                img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.jpg")
    save_params(root / "w" / "p.npz", _model())
    np.save(root / "w" / "x_train_mean.npy", np.full((32, 32, 3), 120, np.float32))
    return root


def _args(root, *extra, data=None):
    return ["evaluate", "--model", "resnet14", "--params", str(root / "w" / "p.npz"),
            "--data", str(data or root / "data"), "--cache-dir", str(root / "cache"),
            "--config", "ideal", *extra]


def _error(capsys, argv, *needles):
    """Runs the CLI, expecting exit 2 and one error line holding every needle."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"jaxbar {argv[0]}: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _copy_data(setup, tmp_path):
    import shutil

    shutil.copytree(setup / "data", tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.parametrize("how", ["random", "truncated"])
def test_unreadable_image_named_or_skipped(setup, tmp_path, capsys, how):
    data = _copy_data(setup, tmp_path)
    bad = data / "test" / "c1" / "0001.jpg"
    raw = bad.read_bytes()
    bad.write_bytes(np.random.default_rng(1).bytes(700) if how == "random"
                    else raw[: len(raw) // 2])
    _error(capsys, _args(setup, data=data), str(bad), "--skip-unreadable")
    assert main(_args(setup, "--skip-unreadable", "--json", str(tmp_path / "r.json"),
                      data=data)) == 0
    err = capsys.readouterr().err
    assert "warning: skipped 1 unreadable image" in err and str(bad) in err
    assert json.loads((tmp_path / "r.json").read_text())["n_images"] == 8
    # From the cache the skipped count is reported again.
    assert main(_args(setup, "--skip-unreadable", data=data)) == 0
    assert "skipped 1 unreadable image" in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [("--trials", "0"), ("--trials", "-1"),
                                          ("--batch-size", "0"), ("--batch-size", "-3"),
                                          ("--limit", "0"), ("--seed", "-2")])
def test_numeric_options_range_checked(setup, capsys, option, value):
    with pytest.raises(SystemExit) as e:
        main(_args(setup, option, value))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected an integer >= " in err and "Traceback" not in err


def test_api_checks_batch_size_and_keys():
    x, y = np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(_model(), x, y, batch_size=0)
    import jax

    with pytest.raises(ValueError, match="T >= 1"):
        evaluate(analogize(_model(), "ideal"), x, y, jax.random.split(jax.random.key(0), 0))
    with pytest.raises(ValueError, match="labels"):
        evaluate(_model(), x, y[:1])


def test_set_needs_key_value(setup, capsys):
    _error(capsys, _args(setup, "--set", "adc.bits"), "--set needs KEY=VALUE", "'adc.bits'")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("=3")


def test_numbers_as_people_write_them(setup, tmp_path, capsys):
    assert load_yaml("1e-5") == 1e-5 and load_yaml("[2E3, .5, 1_000]") == [2000.0, 0.5, 1000]
    assert load_yaml("'1e-5'") == "1e-5" and load_yaml("1.2.3") == "1.2.3"
    out = tmp_path / "r.json"
    assert main(_args(setup, "--set", "parasitics.r_row=1e-5", "--json", str(out))) == 0
    assert json.loads(out.read_text())["config"]["crossbar"]["parasitics"]["r_row"] == 1e-5
    cfg = tmp_path / "net.yaml"
    cfg.write_text("crossbar:\n  parasitics: {r_row: 2e-5, r_col: 1e-5}\n")
    assert NetworkConfig.load(str(cfg)).crossbar.parasitics.r_row == 2e-5


def test_overrides_validated_together(setup, capsys):
    net = NetworkConfig.load("paper_baseline").replace(**{"adc.range": None, "adc.bits": 0,
                                                          "calibration.samples": 6})
    assert net.crossbar.adc.bits == 0 and net.calibration.samples == 6
    assert main(_args(setup, "--config", "paper_baseline", "--set", "adc.range=null",
                      "--set", "adc.bits=0", "--set", "inputs.bits=0")) == 0
    _error(capsys, _args(setup, "--set", "calibration.sample=3"), "calibration.sample")
    with pytest.raises(ConfigError, match="calibration"):
        NetworkConfig.from_dict({"calibration": {"sample": 3}})


def test_layer_pattern_must_match(setup, tmp_path, capsys):
    cfg = tmp_path / "net.yaml"
    cfg.write_text("crossbar: {}\nlayers:\n  stem.cnv: digital\n")
    line = _error(capsys, _args(setup, "--config", str(cfg)), "'stem.cnv'", "stem.conv",
                  "head.dense")
    assert "matches no layer" in line
    net = NetworkConfig.from_dict({"crossbar": {}, "layers": {"stage*.block0.conv1": "digital",
                                                              "nope*": "digital"}})
    with pytest.raises(ConfigError, match="nope"):
        analogize(_model(), net)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights(setup, tmp_path, capsys, value):
    model = _model()
    named_variables(model)["stage2.block0.conv1/kernel"][...] = \
        named_variables(model)["stage2.block0.conv1/kernel"][...].at[0, 0, 0, 0].set(value)
    path = tmp_path / "bad.npz"
    np.save(tmp_path / "x_train_mean.npy", np.zeros(3, np.float32))
    save_params(path, model)
    for config in ("digital", "ideal"):
        _error(capsys, _args(setup, "--config", config)[:-2] + [] if False else
               ["evaluate", "--model", "resnet14", "--params", str(path), "--data",
                str(setup / "data"), "--config", config], str(path),
               "'stage2.block0.conv1'", "non-finite")
    with pytest.raises(ParamsError, match="stage2.block0.conv1"):
        load_params(path)
    with pytest.raises(ParamsError, match="stage2.block0.conv1"):
        evaluate(model, np.zeros((1, 32, 32, 3)), np.zeros(1, np.int32))


def test_mean_file_is_the_file_given(setup, tmp_path, capsys):
    other = tmp_path / "my_mean.npy"
    np.save(other, np.full((32, 32, 3), 255.0, np.float32))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(_args(setup, "--json", str(a))) == 0
    assert main(_args(setup, "--mean", str(other), "--json", str(b))) == 0
    from jaxbar.study.pipeline import load_task

    task = load_task("resnet14", None, str(setup / "data"), str(setup / "w" / "p.npz"),
                     str(other))
    assert float(task.mean.mean()) == 255.0
    corrupt = tmp_path / "x_train_mean.npy"
    corrupt.write_bytes(b"\x93NUMPY")
    _error(capsys, _args(setup, "--mean", str(corrupt)), str(corrupt))
    _error(capsys, _args(setup, "--mean", str(tmp_path / "absent.npy")),
           str(tmp_path / "absent.npy"))
    np.save(other, np.zeros((5, 5), np.float32))
    _error(capsys, _args(setup, "--mean", str(other)), str(other), "(5, 5)")


def test_ir_nonconvergence_one_line(setup, tmp_path, capsys):
    # Parasitics on the first layer only: the error comes from there, and the other layers
    # need no circuit solves compiled.
    cfg = tmp_path / "net.yaml"
    cfg.write_text("crossbar: {}\nlayers:\n  stem.conv: {parasitics: {topology: input_source,"
                   " r_row: 1.0, r_col: 1.0}, ir_solver: {max_iters: 3}}\n")
    line = _error(capsys, _args(setup, "--config", str(cfg), "--limit", "3"), "did not converge",
                  "layer 'stem.conv'", "parasitics.r_row = 1,", "3 iterations", "relative error")
    assert "JaxRuntimeError" not in line and "CpuCallback" not in line


def test_ci_clipped_to_unit_interval():
    st = accuracy_stats([0.4, 1.0])
    assert st["ci95"] == (0.0, 1.0) and "clipped" in st["ci95_method"]
    assert accuracy_stats([0.0, 0.0])["ci95"] == (0.0, 0.0)


def test_sweep_warns_on_corrupt_middle_row(tmp_path):
    from jaxbar.study.results import ResultStore

    p = tmp_path / "r.jsonl"
    p.write_text('{"point_id": "a"}\n{"point_id": "b", "me\n{"point_id": "c"}\n')
    with pytest.warns(UserWarning, match=r"r.jsonl:2: skipping a line"):
        with ResultStore(p) as store:
            assert store.completed == {"a", "c"}


def test_sweep_plot_table_options(setup, tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(f"model: resnet14\nparams: {setup / 'w' / 'p.npz'}\n"
                     f"data: {setup / 'data'}\nconfig: ideal\n"
                     "grid: {parasitics.r_row: [1e-5]}\n")
    for bad in (["--trials", "0"], ["--limit", "-1"], ["--seed", "-1"]):
        with pytest.raises(SystemExit):
            main(["sweep", str(study), *bad])
    capsys.readouterr()
    _error(capsys, ["sweep", str(study), "--only", "adc.bits", "--dry-run"], "--only")
    _error(capsys, ["sweep", str(tmp_path / "absent.yaml")], "absent.yaml")
    results = tmp_path / "r.jsonl"
    results.write_text('{"point_id": "a", "mean": 0.5, "overrides": {"adc.bits": 4}}\n')
    _error(capsys, ["table", str(results), "--filter", "adc.bits"], "--filter")
    _error(capsys, ["plot", str(results), "--x", "adc.bits", "--ylim", "50", "10"], "--ylim")
    for bad in (["--ylim", "0", "nan"], ["--out", str(tmp_path / "f.pdf")]):
        with pytest.raises(SystemExit):
            main(["plot", str(results), "--x", "adc.bits", *bad])
    capsys.readouterr()
    _error(capsys, ["table", str(tmp_path / "none.jsonl")], "none.jsonl")


def test_finetune_demo_options(setup, capsys):
    base = ["finetune", "--model", "resnet14", "--params", str(setup / "w" / "p.npz"),
            "--data", str(setup / "data"), "--out", str(setup / "run")]
    for bad in (["--epochs", "0"], ["--epochs", "1", "--lr", "-1"],
                ["--epochs", "1", "--batch-size", "0"], ["--epochs", "1", "--momentum", "1"],
                ["--epochs", "1", "--label-smoothing", "nan"]):
        with pytest.raises(SystemExit):
            main([*base, *bad])
        assert "Traceback" not in capsys.readouterr().err
    for bad in (["--trials", "0"], ["--out", "x.txt"]):
        with pytest.raises(SystemExit):
            main(["demo", *bad])


def test_subprocess_one_line_and_debug(setup, tmp_path):
    cmd = [sys.executable, "-m", "jaxbar.cli", *_args(setup, "--set", "adc.bits")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "jaxbar evaluate: error: --set needs KEY=VALUE (e.g. --set adc.bits=6), got 'adc.bits'"]
    res = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError" in res.stderr
