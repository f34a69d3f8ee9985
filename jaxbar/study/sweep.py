"""Parameter sweeps of a network on simulated crossbars, resumable, one JSON row per point.

A study (YAML) names a model, its weights, the data, the Monte Carlo settings, a base
network config and the points to evaluate::

    name: prog-error                      # optional (default: the file name)
    root: ..                              # relative paths resolve against this folder,
                                          # itself relative to the study file (default: CWD)
    model: resnet20
    weights: ${JAXBAR_SHARED:-../shared}/models/cifar10-resnet-v1/resnet20v1_cifar10.h5
    data: ${JAXBAR_SHARED:-../shared}/data/cifar10-jpeg
    split: test                           # default test
    limit: 1000                           # class-balanced evaluation subset (default: all)
    trials: 5
    seed: 0
    batch_size: 250
    per_class: false                      # also store per-class accuracy
    config: paper_baseline                # preset, file, or an inline network config
    calibration: null                     # a calibration file (default: calibrate on the fly)
    grid:                                 # Cartesian product, the last key varying fastest
      mapping.scheme: [differential, offset]
      device.programming_error.sigma: [0.0, 0.01, 0.02]
    points:                               # each point is combined with every grid point
      - {device.programming_error.model: independent}
      - {device.programming_error.model: proportional}

Override keys are dotted crossbar fields (`adc.bits`, `device.on_off_ratio`, ...), plus
`config` (replace the base config: a preset such as `digital`, a file or a mapping),
`fold_batchnorm`, `layers` (per-layer overrides) and `calibration.<setting>`. A point
whose network is digital ignores crossbar overrides, so a grid over
`config: [digital, paper_baseline]` gives a single digital reference point.

Paths expand `~`, `$VAR`, `${VAR}` and `${VAR:-default}`; `JAXBAR_SHARED`, when unset,
is the `shared` folder beside the repository (as in the tests).

All trials of all points use the same trial keys (`split(key(seed), trials)`, as
`jaxbar evaluate`), so neighbouring points are compared with common random numbers.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import platform
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxbar.config import SOLVER_KEYS, ConfigError, load_yaml
from jaxbar.nn.network_config import CalibrationSettings, NetworkConfig

__all__ = [
    "Point",
    "Study",
    "SweepSummary",
    "apply_overrides",
    "calibration_key",
    "config_identity",
    "expand_path",
    "expand_points",
    "load_study",
    "plan",
    "run_sweep",
]

_STUDY_KEYS = {
    "name", "description", "root", "model", "weights", "params", "mean", "data", "split",
    "limit", "trials", "seed", "batch_size", "per_class", "config", "calibration", "grid",
    "points", "strategy", "cache_dir",
}
_TOP_LEVEL = {"config", "fold_batchnorm", "layers"}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_VAR = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")


# ---- study files ---------------------------------------------------------------------------

def _default_shared() -> str:
    return str(Path(__file__).resolve().parents[2].parent / "shared")


def expand_path(value: str | None, root: Path) -> str | None:
    """Expands variables and `~` in a study path and makes it absolute against `root`.

    Args:
      value: the path as written (None passes through).
      root: the folder relative paths are relative to.

    Returns:
      The absolute path as a string.

    Raises:
      ConfigError: a variable is unset and has no default.
    """
    if value is None:
        return None

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        if name in os.environ:
            return os.environ[name]
        if m.group(2) is not None:
            return m.group(2)
        if name == "JAXBAR_SHARED":
            return _default_shared()
        raise ConfigError(f"path {value!r}: environment variable {name} is not set")

    p = Path(os.path.expanduser(_VAR.sub(sub, str(value))))
    return str(p if p.is_absolute() else (root / p).resolve())


def _coerce(v: Any) -> Any:
    """Number-like strings of a study given as a mapping become numbers.

    This is how `load_yaml` reads them from a file.
    """
    if isinstance(v, str) and _NUMBER.match(v.strip()):
        return float(v)
    if isinstance(v, list):
        return [_coerce(x) for x in v]
    if isinstance(v, dict):
        return {k: _coerce(x) for k, x in v.items()}
    return v


@dataclasses.dataclass(frozen=True)
class Study:
    """A parsed study file. Paths are as written; `resolve` makes them absolute.

    Attributes:
      name: the study's name (reports only; not part of its identity).
      model: a model name of `jaxbar.study.pipeline.MODELS`.
      weights: Keras .h5 weights (or None with `params`).
      params: a jaxbar parameter file (or None with `weights`).
      mean: the CIFAR training mean file (default: beside the weights).
      data: the image-folder root.
      split: the evaluation split.
      limit: class-balanced number of evaluation images (None: the whole split).
      trials: Monte Carlo trials per point.
      seed: the trial keys are `split(key(seed), trials)`.
      batch_size: images per forward pass.
      per_class: store per-class accuracies.
      config: the base network config: preset name, file path or mapping.
      calibration: a calibration file for every point (None: calibrate on the fly).
      grid: dotted key → list of values (Cartesian product).
      points: list of dotted-key mappings, each combined with the grid.
      strategy: the engine's trial strategy ("auto", "map", "vmap").
      cache_dir: decoded-image cache (None: the default).
      root: the folder relative paths resolve against.
      description: free text.
    """

    model: str
    data: str
    weights: str | None = None
    params: str | None = None
    mean: str | None = None
    name: str = "study"
    split: str = "test"
    limit: int | None = None
    trials: int = 1
    seed: int = 0
    batch_size: int = 250
    per_class: bool = False
    config: Any = "paper_baseline"
    calibration: str | None = None
    grid: Mapping[str, list] = dataclasses.field(default_factory=dict)
    points: Sequence[Mapping[str, Any]] = ()
    strategy: str = "auto"
    cache_dir: str | None = None
    root: Path = Path(".")
    description: str = ""

    def path(self, field: str) -> str | None:
        """A path field expanded and made absolute."""
        return expand_path(getattr(self, field), self.root)

    def base_network(self) -> NetworkConfig:
        """The base network config."""
        return load_network(self.config, self.root)

    def identity(self) -> dict:
        """What a point's results depend on besides its overrides (hashed into point ids).

        Paths enter as written (before expansion), so moving the shared folder keeps ids;
        the calibration file enters by content.
        """
        cal = None
        if self.calibration is not None:
            p = Path(self.path("calibration"))
            if not p.is_file():
                raise FileNotFoundError(f"calibration file not found: {p}")
            cal = hashlib.sha256(p.read_bytes()).hexdigest()
        return {
            "model": self.model, "weights": self.weights, "params": self.params,
            "mean": self.mean, "data": self.data, "split": self.split, "limit": self.limit,
            "trials": self.trials, "seed": self.seed, "batch_size": self.batch_size,
            "config": config_identity(self.base_network()), "calibration": cal,
        }


def load_study(source: str | os.PathLike | Mapping[str, Any],
               root: str | os.PathLike | None = None) -> Study:
    """Reads and validates a study.

    Args:
      source: a YAML/JSON study file, or the study as a mapping.
      root: overrides the study's `root` (the folder relative paths resolve against).

    Returns:
      The `Study`.

    Raises:
      ConfigError: unknown keys or invalid values, naming the key.
      FileNotFoundError: the study file does not exist.
    """
    if isinstance(source, Mapping):
        d, name, base = dict(source), "study", Path.cwd()
    else:
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"study file not found: {p}")
        try:
            d = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse study {p}: {' '.join(str(e).split())}") from e
        if not isinstance(d, Mapping):
            raise ConfigError(f"study {p} must be a mapping of settings")
        name, base = p.stem, p.resolve().parent
    unknown = set(d) - _STUDY_KEYS
    if unknown:
        raise ConfigError(f"unknown study keys {sorted(unknown)}; allowed: {sorted(_STUDY_KEYS)}")
    for key in ("model", "data"):
        if not d.get(key):
            raise ConfigError(f"the study needs `{key}`")
    if (d.get("weights") is None) == (d.get("params") is None):
        raise ConfigError("the study needs exactly one of `weights` (Keras .h5) or `params`")
    if root is not None:
        root_path = Path(root).resolve()
    elif d.get("root") is not None:
        root_path = (base / str(d["root"])).resolve() if not isinstance(source, Mapping) \
            else Path(str(d["root"])).resolve()
    else:
        root_path = Path.cwd()

    def integer(key, default, lo, allow_none=False):
        v = d.get(key, default)
        if v is None and allow_none:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"study {key} = {v!r} is invalid: expected an integer >= {lo}")
        return v

    grid = d.get("grid") or {}
    if not isinstance(grid, Mapping):
        raise ConfigError("study grid must map dotted keys to lists of values")
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"grid[{k!r}] = {vals!r} is invalid: expected a non-empty list "
                              "(write a list-valued setting as a list of lists)")
    points = d.get("points") or []
    if not isinstance(points, list) or not all(isinstance(p, Mapping) for p in points):
        raise ConfigError("study points must be a list of mappings of dotted keys to values")
    strategy = d.get("strategy", "auto")
    if strategy not in ("auto", "map", "vmap"):
        raise ConfigError(f"study strategy = {strategy!r} is invalid: expected auto, map, vmap")
    config = d.get("config", "paper_baseline")
    if not isinstance(config, str | Mapping):
        raise ConfigError("study config must be a preset name, a file or a mapping")
    return Study(
        name=str(d.get("name") or name), description=str(d.get("description") or ""),
        model=str(d["model"]), data=str(d["data"]),
        weights=None if d.get("weights") is None else str(d["weights"]),
        params=None if d.get("params") is None else str(d["params"]),
        mean=None if d.get("mean") is None else str(d["mean"]),
        split=str(d.get("split", "test")),
        limit=integer("limit", None, 1, allow_none=True),
        trials=integer("trials", 1, 1), seed=integer("seed", 0, 0),
        batch_size=integer("batch_size", 250, 1), per_class=bool(d.get("per_class", False)),
        config=_coerce(config) if isinstance(config, Mapping) else config,
        calibration=None if d.get("calibration") is None else str(d["calibration"]),
        grid={str(k): _coerce(list(v)) for k, v in grid.items()},
        points=tuple({str(k): _coerce(v) for k, v in p.items()} for p in points),
        strategy=strategy, cache_dir=d.get("cache_dir"), root=root_path,
    )


# ---- points --------------------------------------------------------------------------------

def load_network(spec: Any, root: Path) -> NetworkConfig:
    """A network config from a preset name, a file (relative to `root`) or a mapping."""
    if isinstance(spec, NetworkConfig):
        return spec
    if isinstance(spec, Mapping):
        return NetworkConfig.from_dict(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"config {spec!r} is invalid: expected a preset, file or mapping")
    from jaxbar.nn.network_config import NETWORK_PRESETS

    return NetworkConfig.load(spec if spec in NETWORK_PRESETS else expand_path(spec, root))


def _is_crossbar_key(key: str) -> bool:
    return key not in _TOP_LEVEL and not key.startswith("calibration.") and key != "calibration"


def apply_overrides(base: NetworkConfig, overrides: Mapping[str, Any],
                    root: Path = Path(".")) -> NetworkConfig:
    """Applies a point's overrides to a network config.

    Args:
      base: the study's base network config.
      overrides: dotted crossbar keys, `config`, `fold_batchnorm`, `layers`,
        `calibration` (a mapping) or `calibration.<setting>`.
      root: the folder a `config` file path is relative to.

    Returns:
      The validated network config. On a digital network, crossbar keys are ignored.

    Raises:
      ConfigError: an unknown key or invalid value, naming it.
    """
    net = load_network(overrides["config"], root) if "config" in overrides else base
    if "fold_batchnorm" in overrides:
        net = dataclasses.replace(net, fold_batchnorm=bool(overrides["fold_batchnorm"]))
    if "layers" in overrides:
        d = net.to_dict()
        d["layers"] = overrides["layers"] or {}
        net = NetworkConfig.from_dict(d)
    cal = dataclasses.asdict(net.calibration)
    for k, v in overrides.items():
        if k == "calibration":
            if not isinstance(v, Mapping):
                raise ConfigError("calibration must be a mapping of calibration settings")
            cal.update(v)
        elif k.startswith("calibration."):
            cal[k.split(".", 1)[1]] = v
    if cal != dataclasses.asdict(net.calibration):
        try:
            net = dataclasses.replace(net, calibration=CalibrationSettings(**cal))
        except TypeError as e:
            raise ConfigError(f"calibration: {e}") from e
    cross = {k: v for k, v in overrides.items() if _is_crossbar_key(k)}
    if cross and net.crossbar is not None:
        net = net.replace(**cross)
    return net


def expand_points(grid: Mapping[str, Sequence], points: Sequence[Mapping[str, Any]]
                  ) -> list[dict[str, Any]]:
    """The override mappings of a study: each point combined with each grid point.

    Args:
      grid: dotted key → values; the Cartesian product, the last key varying fastest.
      points: explicit override mappings (empty: one empty point).

    Returns:
      Override dicts, points outermost, in order.

    Raises:
      ConfigError: a key set both by a point and by the grid.
    """
    keys = list(grid)
    combos = [dict(zip(keys, vals, strict=True))
              for vals in itertools.product(*(grid[k] for k in keys))]
    out = []
    for p in points or [{}]:
        clash = set(p) & set(keys)
        if clash:
            raise ConfigError(f"keys {sorted(clash)} are set both in points and in grid")
        out.extend({**p, **c} for c in combos)
    return out


def _canonical(v: Any) -> Any:
    """Hash form: integral floats as ints, so `0` and `0.0` name the same point."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, Mapping):
        return {str(k): _canonical(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_canonical(x) for x in v]
    return v


def _digest(obj: Any, n: int = 16) -> str:
    text = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of a sweep.

    Attributes:
      index: position in the study's order of points.
      overrides: the point's effective overrides.
      point_id: hash of the study identity and the overrides.
      net: the resolved network config.
    """

    index: int
    overrides: dict[str, Any]
    point_id: str
    net: NetworkConfig

    def label(self, width: int = 60) -> str:
        """A short description of the overrides."""
        text = ", ".join(f"{k.rsplit('.', 1)[-1] if len(k) > 24 else k}={v}"
                         for k, v in self.overrides.items()) or "(base config)"
        return text if len(text) <= width else text[: width - 1] + "…"


def _structure(net: NetworkConfig):
    """What the engine compiles per: everything but the traced numbers (sigma, ratios, r)."""
    import jax

    if net.crossbar is None:
        return ("digital", net.fold_batchnorm)
    return (jax.tree_util.tree_structure(net.crossbar), net.layers, net.fold_batchnorm)


def plan(study: Study) -> list[Point]:
    """Expands, validates, deduplicates and orders a study's points.

    Points of the same compiled structure run consecutively (first-appearance order of
    structures, study order within one), so a sigma sweep compiles once.

    Returns:
      The points in run order.

    Raises:
      ConfigError: an invalid point, naming it.
    """
    base = study.base_network()
    sid = _digest(study.identity(), 32)
    seen: set[str] = set()
    points = []
    for i, over in enumerate(expand_points(study.grid, study.points)):
        try:
            net = apply_overrides(base, over, study.root)
        except ConfigError as e:
            raise ConfigError(f"point {i} {over}: {e}") from e
        if net.crossbar is None:  # a digital point: crossbar settings mean nothing
            over = {k: v for k, v in over.items() if not _is_crossbar_key(k)}
        ident = {_identity_key(k): v for k, v in over.items()}
        pid = _digest({"study": sid, "overrides": ident})
        if pid in seen:
            continue
        seen.add(pid)
        points.append(Point(i, over, pid, net))
    groups: dict[Any, list[Point]] = {}
    for p in points:
        groups.setdefault(_structure(p.net), []).append(p)
    return [p for g in groups.values() for p in g]


def _without_defaults(d: Mapping[str, Any], default: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `d` that differ from `default`, recursively (empty sections dropped)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and isinstance(default.get(k), Mapping):
            sub = _without_defaults(v, default[k])
            if sub:
                out[k] = sub
        elif k not in default or v != default[k]:
            out[k] = v
    return out


def config_identity(net: NetworkConfig) -> dict[str, Any]:
    """A network config as it enters point ids and calibration keys.

    Only what differs from the defaults enters, so a new config field, whose default keeps
    the behaviour, leaves the ids of existing results (and their resumption) intact. The
    solver settings (`ir_solver`) enter under their `parasitics.` keys (`SOLVER_KEYS`), so
    ids do not depend on the section a setting is written in.
    """
    d = _without_defaults(net.to_dict(), NetworkConfig().to_dict())
    xbar = d.get("crossbar")
    if isinstance(xbar, dict) and "ir_solver" in xbar:
        xbar["parasitics"] = {**xbar.get("parasitics", {}), **xbar.pop("ir_solver")}
    return d


def _identity_key(key: str) -> str:
    """An override key as it enters point ids: `ir_solver.tol` as `parasitics.tol`."""
    section, _, leaf = key.partition(".")
    return f"parasitics.{leaf}" if section == "ir_solver" and leaf in SOLVER_KEYS else key


# ---- calibration cache ---------------------------------------------------------------------

def calibration_key(study: Study, net: NetworkConfig) -> str:
    """Identifies a calibration.

    The study's model and data, and the network config without what profiling ignores:
    device errors, drift (profiling sees the arrays at t0) and the ADC converter (its bits and
    circuit) are off while profiling.
    """
    d = config_identity(net)
    xbar = d.get("crossbar")
    if isinstance(xbar, dict):
        device = xbar.get("device", {})
        for k in ("programming_error", "read_noise", "drift", "time", "preset"):
            device.pop(k, None)
        adc = xbar.get("adc", {})
        for k in [k for k in adc if k not in ("range", "per_input_slice")]:
            del adc[k]
        for section in ("device", "adc"):
            if not xbar.get(section, True):
                del xbar[section]
    ident = {k: getattr(study, k) for k in ("model", "weights", "params", "mean", "data")}
    return _digest({"study": ident, "net": d}, 24)


class _CalibrationCache:
    """Calibrations by key, in memory and as JSON files in a folder beside the results."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.mem: dict[str, Any] = {}

    def get(self, key: str):
        from jaxbar.nn.calibrate import Calibration

        if key in self.mem:
            return self.mem[key]
        if self.folder is not None and (self.folder / f"{key}.json").is_file():
            try:
                self.mem[key] = Calibration.load(self.folder / f"{key}.json")
                return self.mem[key]
            except ConfigError as e:
                warnings.warn(f"ignoring a damaged cached calibration: {e}", stacklevel=2)
        return None

    def put(self, key: str, cal) -> None:
        self.mem[key] = cal
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{key}.{os.getpid()}.tmp"
            cal.save(tmp)
            os.replace(tmp, self.folder / f"{key}.json")  # atomic: a kill leaves no torn file


# ---- running -------------------------------------------------------------------------------

@dataclasses.dataclass
class SweepSummary:
    """What a sweep did.

    Attributes:
      total: points in the study.
      skipped: points already in the results file.
      done: points computed by this run.
      seconds: wall time of this run.
    """

    total: int
    skipped: int
    done: int
    seconds: float


def _versions() -> dict[str, str]:
    import flax
    import jax
    import jaxlib
    import numpy as np

    from jaxbar.version import __version__

    return {"jaxbar": __version__, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _print_plan(study: Study, points: list[Point], done: frozenset[str], out: Path,
                log: Callable[[str], None]) -> None:
    n_done = sum(p.point_id in done for p in points)
    log(f"study {study.name}: {len(points)} points ({n_done} done in {out}), "
        f"{study.trials} trials each, {study.limit or 'all'} {study.split} images")
    keys = list(dict.fromkeys(k for p in points for k in p.overrides))
    analog = [p for p in points if p.net.crossbar is not None]
    common = {k: analog[0].overrides[k] for k in keys
              if all(k in p.overrides and p.overrides[k] == analog[0].overrides[k]
                     for p in analog)} if len(analog) > 1 else {}
    if common:
        log("  common: " + "  ".join(f"{k}={json.dumps(v)}" for k, v in common.items()))
        keys = [k for k in keys if k not in common]
    for p in points:
        status = "done" if p.point_id in done else "todo"
        vals = "  ".join(f"{k}={json.dumps(p.overrides[k])}" for k in keys if k in p.overrides)
        log(f"  {p.index:4d}  {p.point_id}  {status}  {vals or '(base config)'}")


def run_sweep(study: Study, out: str | os.PathLike, *, dry_run: bool = False,
              progress: bool = True, cache_dir: str | None = None,
              strategy: str | None = None, only: Sequence[tuple[str, Any]] = (),
              log: Callable[[str], None] = print,
              skip_unreadable: bool = False) -> SweepSummary:
    """Runs (or resumes) a study, appending one row per point to a JSON-lines file.

    Args:
      study: the study.
      out: the results file; points whose id is already there are skipped.
      dry_run: list the points and their status without evaluating anything.
      progress: show progress bars (points, and trials within a point).
      cache_dir: decoded-image cache (default: the study's, else `$JAXBAR_CACHE`).
      strategy: overrides the study's trial strategy.
      only: (dotted key, value) filters: run only matching points.
      log: where messages go.
      skip_unreadable: leave out image files that cannot be decoded (with a warning)
        instead of failing.

    Returns:
      A `SweepSummary`.
    """
    from jaxbar.study.results import ResultStore, filter_rows, read_results

    t_start = time.perf_counter()
    out = Path(out)
    points = plan(study)
    if only:
        keep = {r["point_id"] for r in filter_rows(
            [{"point_id": p.point_id, "overrides": p.overrides, "config": p.net.to_dict()}
             for p in points], only)}
        points = [p for p in points if p.point_id in keep]
    if dry_run:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn last line is repaired by the real run
            done = frozenset(r.get("point_id") for r in read_results(out)) \
                if out.is_file() else frozenset()
        _print_plan(study, points, done, out, log)
        return SweepSummary(len(points), sum(p.point_id in done for p in points), 0,
                            time.perf_counter() - t_start)

    with ResultStore(out) as store:
        todo = [p for p in points if p.point_id not in store.completed]
        skipped = len(points) - len(todo)
        if not todo:
            log(f"study {study.name}: all {len(points)} points are in {out}")
            return SweepSummary(len(points), skipped, 0, time.perf_counter() - t_start)
        log(f"study {study.name}: {len(todo)} of {len(points)} points to run "
            f"({skipped} already in {out})")
        done = _run_points(study, todo, store, out, progress,
                           cache_dir or study.cache_dir, strategy or study.strategy,
                           skip_unreadable)
    return SweepSummary(len(points), skipped, done, time.perf_counter() - t_start)


def _run_points(study: Study, todo: list[Point], store, out: Path, progress: bool,
                cache_dir: str | None, strategy: str, skip_unreadable: bool = False) -> int:
    import jax
    from tqdm.auto import tqdm

    from jaxbar.nn.calibrate import Calibration
    from jaxbar.study.engine import accuracy_stats, evaluate
    from jaxbar.study.pipeline import load_task, prepare_model

    task = load_task(study.model, study.path("weights"), study.path("data"),
                     study.path("params"), study.path("mean"), skip_unreadable)
    images, labels = task.images(study.split, study.limit, cache_dir)
    num_classes = None
    if study.per_class:
        num_classes = int(getattr(task.model, "num_classes", int(labels.max()) + 1))
    fixed_cal = Calibration.load(study.path("calibration")) if study.calibration else None
    cals = _CalibrationCache(out.with_name(out.name + ".calibrations"))
    keys = jax.random.split(jax.random.key(study.seed), study.trials)
    base = {
        "study": study.name, "model": study.model, "weights": study.weights,
        "params": study.params, "data": study.data, "split": study.split,
        "limit": study.limit, "batch_size": study.batch_size, "seed": study.seed,
        "versions": _versions(), "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }
    bar = tqdm(todo, desc=f"sweep {study.name}", unit="point", disable=not progress,
               dynamic_ncols=True)
    n = 0
    for p in bar:
        bar.set_postfix_str(p.label(), refresh=True)
        started, t0 = _now(), time.perf_counter()
        cal, cal_source, cal_key, cal_s = fixed_cal, "file" if fixed_cal else None, None, 0.0
        if fixed_cal is None and p.net.crossbar is not None:
            cal_key = calibration_key(study, p.net)
            cal = cals.get(cal_key)
            cal_source = "cached" if cal is not None else None
        model, cal = prepare_model(task, p.net, cal, cache_dir)
        if cal is not None and cal_source is None:  # calibrated just now
            cal_s, cal_source = time.perf_counter() - t0, "computed"
            cals.put(cal_key, cal)
        analog = p.net.crossbar is not None
        res = evaluate(model, images, labels, keys if analog else None,
                       batch_size=study.batch_size, strategy=strategy,
                       num_classes=num_classes, progress=progress)
        st = accuracy_stats(res.accuracies)
        row = {
            "point_id": p.point_id, "index": p.index, "overrides": p.overrides, **base,
            "config": p.net.to_dict(),
            "trials": len(res.accuracies),
            "trial_keys": jax.random.key_data(keys).tolist() if analog else None,
            "accuracies": [float(a) for a in res.accuracies],
            "mean": st["mean"], "std": st["std"], "ci95": list(st["ci95"]),
            "ci95_method": st["ci95_method"],
            "n_images": res.n_images,
            "calibration": None if cal is None else {
                "source": cal_source, "key": cal_key, "seconds": cal_s,
                "file": study.calibration,
                "layers": {name: {"input_range": c.input_range, "adc_range": c.adc_range}
                           for name, c in cal.layers.items()}},
            "eval_seconds": res.seconds, "seconds": time.perf_counter() - t0,
            "started": started, "finished": _now(),
        }
        if res.per_class is not None:
            row["per_class"] = res.per_class.tolist()
            row["per_class_mean"] = res.per_class.mean(0).tolist()
        store.append(row)
        n += 1
        bar.set_postfix_str(f"{p.label(40)} → {100 * st['mean']:.2f}%", refresh=False)
    bar.close()
    return n

