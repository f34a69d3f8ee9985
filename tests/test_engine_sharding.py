"""Sharded Monte Carlo evaluation: trials and images over several devices and processes.

Multi-device runs happen in subprocesses with virtual CPU devices
(`--xla_force_host_platform_device_count`); the multi-process ones call
`jax.distributed.initialize` on localhost (CPU collectives: gloo, jax's default). Every run
must reproduce the per-trial (and per-class) accuracies of one device exactly. The problem
is the demo's small CNN with random parameters, whose accuracy reacts to every noise draw:
read noise is on so that a data-axis split that repeated or reshuffled draws would show.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxbar.study import engine, montecarlo
from tests import test_sweep
from tests.conftest import host_devices_env

REPO_ROOT = Path(__file__).resolve().parents[1]
TRIALS = 6
BATCH = 10  # not a multiple of 4 devices: data-sharded batches get padded
tiny = test_sweep.tiny  # fixture: a tiny random ResNet, its parameter file and an image folder


def _problem(sigma: float = 0.05):
    """(analog model, images, labels, keys): 50 random 8×8 images, labels the digital
    predictions, programming error (`sigma`) and read noise on. No JAX op runs at import."""
    import jax
    from flax import nnx

    from jaxbar import CrossbarConfig
    from jaxbar.nn.analogize import analogize
    from jaxbar.nn.network_config import NetworkConfig
    from jaxbar.study.demo import DigitsCNN

    model = DigitsCNN(nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(50, 8, 8, 1)).astype(np.float32)
    labels = np.asarray(model(x).argmax(-1))
    net = NetworkConfig(crossbar=CrossbarConfig.from_dict({"device": {
        "programming_error": {"model": "independent", "sigma": sigma},
        "read_noise": {"model": "independent", "sigma": 0.1}}}))
    keys = jax.random.split(jax.random.key(0), TRIALS)
    return analogize(model, net), x, labels, keys


def _evaluate(problem, n_trials: int, **kw) -> dict:
    model, x, labels, keys = problem
    r = engine.evaluate(model, x, labels, keys[:n_trials], batch_size=BATCH,
                        num_classes=10, progress=False, **kw)
    return {"acc": r.accuracies.tolist(), "per_class": r.per_class.tolist()}


# Runs in a subprocess; argv: process id (-1: no jax.distributed), coordinator port, JSON
# trial counts, repository root.
WORKER = """
import json, sys
pid, port, counts = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
import jax
if pid >= 0:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=60)
sys.path.insert(0, sys.argv[4])
from tests.test_engine_sharding import _evaluate, _problem
problem = _problem()
out = {"devices": jax.device_count(), "local": jax.local_device_count(),
       "runs": {n: _evaluate(problem, n) for n in counts}}
if pid >= 0:  # inputs differing between processes are refused, by both
    model, x, labels, keys = problem
    try:
        _evaluate((model, x, (labels + pid) % 10, keys), 1)
        out["mismatch"] = "accepted"
    except ValueError as e:
        out["mismatch"] = str(e)
print("RESULT", json.dumps(out), flush=True)
"""


def _env(devices: int) -> dict:
    return host_devices_env(devices)


def _result(stdout: str) -> dict:
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    """Per-trial results of one device in this process, all `TRIALS` trials."""
    return _evaluate(_problem(), TRIALS, shard=False)


def _prefix(ref: dict, n: int) -> dict:
    return {k: v[:n] for k, v in ref.items()}


@pytest.mark.parametrize("chunk,devices,expected", [
    (4, 4, (4, 4, 1)), (6, 4, (8, 4, 1)), (8, 1, (8, 1, 1)),  # trials only, rounded up
    (1, 4, (1, 1, 4)), (2, 4, (2, 2, 2)), (3, 4, (3, 1, 4)), (4, 8, (4, 4, 2)),
    (3, 6, (3, 3, 2)),  # fewer trials than devices: the rest split batches, no trial padded
])
def test_shards(chunk, devices, expected):
    assert montecarlo.shard_layout(chunk, devices) == expected
    got, t, d = expected
    assert t * d == devices and got % t == 0


def test_batches_pad_every_batch_at_its_end():
    x = np.arange(1, 8, dtype=np.float32)[:, None]  # 7 images of one pixel
    y = np.arange(7, dtype=np.int32)
    xs, ys = engine._batches(x, y, 3, 2)  # batches of 3 → 4 for 2 data shards
    assert xs.shape == (3, 4, 1) and ys.shape == (3, 4)
    np.testing.assert_array_equal(ys, [[0, 1, 2, -1], [3, 4, 5, -1], [6, -1, -1, -1]])
    np.testing.assert_array_equal(xs[..., 0], [[1, 2, 3, 0], [4, 5, 6, 0], [7, 0, 0, 0]])
    xs1, ys1 = engine._batches(x, y, 3)
    np.testing.assert_array_equal(ys1, ys[:, :3])  # one device: unchanged layout
    np.testing.assert_array_equal(xs1, xs[:, :3])


SPLIT_CHECKS = """
from flax import nnx
from jaxbar.study import engine, montecarlo
from tests import test_sweep
model, x, labels, keys = problem
graphdef, state = nnx.split(model)
count = engine.hit_counter(10)

def flops(t, d):  # per device, of the compiled runner for one chunk of t trials
    xs, ys = engine._batches(x, labels, 16, d)
    run = montecarlo.trial_runner(graphdef, count, "map", True, False, t, d)
    return run.lower(state, keys[:t], (xs, ys), ()).compile().cost_analysis()["flops"]

run = montecarlo.trial_runner(graphdef, count, engine.default_strategy(), True, False, 1, 4)
before = run._cache_size()
for sigma in (0.0, 0.2):  # a swept number is traced: the 1-trial run above compiled it
    _evaluate(_problem(sigma), 1)
out["compiles"] = run._cache_size() - before
out["flops_ratio"] = flops(1, 4) / flops(1, 1)
print("RESULT", json.dumps(out), flush=True)
"""


def test_trial_and_data_sharding_match_one_device(reference):
    """4 devices, one process: trials only (6 trials, chunks of 4, the last padded), both
    axes (2 trials: 2×2), and images only (1 trial: 1×4)."""
    counts = [TRIALS, 2, 1]
    script = WORKER + SPLIT_CHECKS
    p = subprocess.run([sys.executable, "-c", script, "-1", "0", json.dumps(counts),
                        str(REPO_ROOT)], env=_env(4), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = _result(p.stdout)
    assert out["devices"] == 4
    for n in counts:
        assert out["runs"][str(n)] == _prefix(reference, n), n
    assert out["compiles"] == 0
    # Each device evaluates only its share of every batch (programming stays replicated).
    assert out["flops_ratio"] < 0.6


def test_two_processes_match_one_device(reference):
    """2 processes × 2 CPU devices = 4 global devices; trials over processes (6 trials) and
    a single trial whose images split over both processes; both processes get all results."""
    counts = [TRIALS, 1]
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port, json.dumps(counts),
                               str(REPO_ROOT)], env=_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:  # a lone survivor would wait for its peer forever
            if p.poll() is None:
                p.kill()
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    for out in (_result(stdout) for stdout, _ in outs):
        assert (out["devices"], out["local"]) == (4, 2)
        for n in counts:
            assert out["runs"][str(n)] == _prefix(reference, n), n
        assert "processes passed different" in out["mismatch"]



def test_cli_evaluate_distributed(tiny, tmp_path):
    """`jaxbar evaluate --distributed` in 2 processes × 2 devices reports what one process
    reports (3 trials, so images split over both processes); only process 0 writes JSON."""
    cfg = tmp_path / "net.json"
    cfg.write_text(json.dumps({
        "crossbar": {"device": {"programming_error": {"model": "independent", "sigma": 0.1}},
                     "inputs": {"bits": 0}, "adc": {"bits": 0}},
        "layers": {"stage*": "digital"}}))

    def cmd(name, *extra):
        return [sys.executable, "-c", "import sys; from jaxbar.cli import main; "
                "sys.exit(main(sys.argv[1:]))", "evaluate", "--model", "resnet14",
                "--params", str(tiny / "model.npz"), "--mean", str(tiny / "x_train_mean.npy"),
                "--data", str(tiny / "data"), "--config", str(cfg), "--trials", "3",
                "--batch-size", "5", "--json", str(tmp_path / f"{name}.json"), *extra]

    port = str(_free_port())
    procs = [subprocess.Popen(cmd(f"p{i}", "--distributed", "--coordinator", f"localhost:{port}",
                                  "--num-processes", "2", "--process-id", str(i)),
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        single = subprocess.run(cmd("single"), env=_env(1), capture_output=True, text=True,
                                timeout=300)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert single.returncode == 0, single.stderr[-3000:]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    assert not (tmp_path / "p1.json").exists()
    dist, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("p0", "single"))
    assert dist["accuracies"] == ref["accuracies"] and len(set(ref["accuracies"])) > 1
    assert "top-1" in outs[0][0] and "top-1" not in outs[1][0]
