"""Any Flax NNX model on simulated crossbars: `analogize`, `calibrate_model`, `program_model`.

`analogize` clones a model and replaces the contraction hook of every covered layer by an
analog op, the way AQT and Qwix inject quantization into stock layers:

- `nnx.Linear`, `nnx.LinearGeneral`: `dot_general`;
- `nnx.Einsum`: `einsum_op` (the kernel is the weight operand);
- `nnx.Conv` (1-D and 2-D): `conv_general_dilated`.

Each analog layer holds its weights as one or more (K, N) matrices: a grouped convolution's
groups, and the batch axes an einsum or `LinearGeneral` kernel shares with its inputs, are
separate matrices on separate arrays. Everything else (activations, norms, pooling, biases,
products of two activations such as attention's QKᵀ) stays digital (PHYSICS §7).

A trial is a PRNG key: `program_model(analog, key)` programs every layer from
`fold_in(key, layer_id(path))` and seeds the layer's read-noise stream, which advances by
one draw per forward call. Programmed conductances live in the model's state
(`Conductances` variables), so `nnx.split` / `nnx.merge`, `jit` and the trial engine carry
them like parameters.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbar import calibration as cal
from jaxbar.config import ConfigError, CrossbarConfig
from jaxbar.core import mapping, mvm
from jaxbar.nn.analog import layer_id
from jaxbar.nn.calibrate import Calibration, LayerCalibration
from jaxbar.nn.network_config import CalibrationSettings, NetworkConfig

__all__ = [
    "ANALOG_STATE",
    "AnalogOp",
    "Conductances",
    "LayerConfig",
    "analog_layers",
    "analogize",
    "calibrate_model",
    "clear_programming",
    "is_programmed",
    "map_batches",
    "network_config",
    "program_model",
]

#: Layer types `analogize` covers, and the hook attribute each computes through.
HOOKS: dict[type, str] = {
    nnx.Linear: "dot_general",
    nnx.LinearGeneral: "dot_general",
    nnx.Einsum: "einsum_op",
    nnx.Conv: "conv_general_dilated",
}

#: Layer types with weights that always stay digital (a pattern naming them is an error).
_DIGITAL_ONLY = (nnx.ConvTranspose, nnx.Embed)


class Conductances(nnx.Variable):
    """A layer's programmed crossbars for one trial (`mvm.Programmed`, stacked over groups)."""


class AnalogKey(nnx.Variable):
    """A PRNG key of an analog layer (its read-noise stream, or its live programming key)."""


class LayerConfig(nnx.Variable):
    """A layer's crossbar config. In the model's state, so its swept numbers (σ, on/off ratio,
    wire resistances, ...) are traced and a sweep over them compiles once."""


class ReadCount(nnx.Variable):
    """How many forward calls have drawn from a layer's read-noise stream."""


#: The variables `analogize` adds to a model: configs and a trial's programming (not parameters).
ANALOG_STATE = (LayerConfig, Conductances, AnalogKey, ReadCount)


class Samples:
    """Calibration samples collected by an op while `calibrate_model` runs (eager only)."""

    def __init__(self):
        self.items: list = []


@dataclasses.dataclass(frozen=True)
class Kernel:
    """How a layer's kernel becomes weight matrices.

    Attributes:
      roles: per kernel axis, "g" (a group: one matrix each), "c" (contracted: rows) or
        "n" (output features: columns); None for a convolution.
      groups: feature groups of a convolution (its kernel is (*window, c_in/G, c_out)).
    """

    roles: tuple[str, ...] | None = None
    groups: int = 1

    def matrices(self, kernel: jax.Array) -> jax.Array:
        """The (G, K, N) weight matrices of `kernel`."""
        if self.roles is None:  # convolution: rows (*window, c_in/G), columns per group
            cout = kernel.shape[-1]
            k = kernel.reshape(-1, self.groups, cout // self.groups)
            return jnp.moveaxis(k, 1, 0)
        order = [i for r in "gcn" for i, role in enumerate(self.roles) if role == r]
        size = lambda r: math.prod(  # noqa: E731
            kernel.shape[i] for i, role in enumerate(self.roles) if role == r)
        return jnp.transpose(kernel, order).reshape(size("g"), size("c"), size("n"))


def _needs_key(config: CrossbarConfig) -> bool:
    d = config.device
    return d.programming_error.active or d.read_noise.active or d.drift.active


class AnalogOp(nnx.Module):
    """The analog replacement of one layer's contraction hook.

    Attributes:
      path: the layer's NNX graph path, dotted (`"blocks.0.attn.query"`).
      crossbar: the layer's crossbar config (a `LayerConfig` variable; `config` reads it).
      kernel: how the layer's kernel maps to weight matrices.
      settings: how `calibrate_model` calibrates this layer.
      conductances: the programmed crossbars of the current trial, or None.
      read_key, read_count: the read-noise stream and its position.
      live_key: when set, the layer programs itself from its current kernel on every call
        (training: gradients reach the weights).
      mode: "analog", or "inputs" / "adc" while `calibrate_model` profiles the layer.
    """

    def __init__(self, path: str, config: CrossbarConfig, kernel: Kernel,
                 settings: CalibrationSettings):
        self.path = path
        self.crossbar = LayerConfig(config)
        self.kernel = kernel
        self.settings = settings
        self.conductances = Conductances(None)
        self.read_key = AnalogKey(None)
        self.read_count = ReadCount(jnp.zeros((), jnp.uint32))
        self.live_key = AnalogKey(None)
        self.mode = "analog"

    @property
    def config(self) -> CrossbarConfig:
        """The layer's crossbar config."""
        return self.crossbar.get_value()

    # ---- programming ---------------------------------------------------------------------
    def program(self, kernel: jax.Array, key: jax.Array | None) -> mvm.Programmed:
        """Programs the layer's matrices (stacked over groups) for the trial `key`."""
        W = self.kernel.matrices(kernel)
        k = None if key is None else jax.random.fold_in(key, layer_id(self.path))
        if W.shape[0] == 1:
            return jax.tree.map(lambda a: a[None], mvm.program_at_time(W[0], self.config, k))
        if k is None:
            return jax.vmap(lambda w: mvm.program_at_time(w, self.config, None))(W)
        keys = jax.vmap(lambda g: jax.random.fold_in(k, g))(jnp.arange(W.shape[0]))
        return jax.vmap(lambda w, kg: mvm.program_at_time(w, self.config, kg))(W, keys)

    def _programmed(self, kernel: jax.Array) -> mvm.Programmed:
        prog = self.conductances.get_value()
        if prog is not None:
            return prog
        live = self.live_key.get_value()
        if live is None and _needs_key(self.config):
            raise ConfigError(f"layer {self.path!r} is not programmed: its config draws random "
                              "errors, so call jaxbar.program_model(analog, key) first")
        return self.program(kernel, live)

    def _read_key(self) -> jax.Array | None:
        if not self.config.device.read_noise.active:
            return None
        stream = self.read_key.get_value()
        if stream is None:
            raise ConfigError(f"layer {self.path!r} has read noise but no read-noise stream: "
                              "call jaxbar.program_model(analog, key) first")
        n = self.read_count.get_value()
        self.read_count.set_value(n + 1)
        return jax.random.fold_in(stream, n)

    # ---- the analog product of (G, ..., K) inputs ----------------------------------------
    def matmul(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """`(G, ..., K) -> (G, ..., N)`: each group's inputs through its crossbars."""
        if self.mode != "analog":
            return self._profile(x, kernel, None)
        prog, key = self._programmed(kernel), self._read_key()
        f = lambda xg, pg, kg: mvm.matmul(xg, pg, self.config, kg)  # noqa: E731
        return _per_group(f, x, prog, key)

    # ---- calibration -----------------------------------------------------------------------
    def _profile(self, x, kernel, conv_args):
        """Records calibration samples (eagerly) and returns the digital result."""
        W = self.kernel.matrices(kernel)
        samples = self.samples.items
        if self.mode == "inputs":
            samples.append(cal._sample(x))
        else:
            cfg = self.config.replace(**{"inputs.range": self.input_range})
            per_group = []
            for g in range(W.shape[0]):
                if conv_args is None:
                    op = mvm.dense_op(mapping.layout(*W.shape[1:], cfg))
                else:
                    op = mvm.conv_op(mapping.layout(*W.shape[1:], cfg), *conv_args)
                per_group.append(cal.pre_adc_samples(x[g], W[g], cfg, op))
            samples.append([np.concatenate(s) for s in zip(*per_group, strict=True)])
        if conv_args is not None:
            return None
        return jnp.einsum("g...k,gkn->g...n", x, W.astype(x.dtype),
                          precision=jax.lax.Precision.HIGHEST)


def _per_group(f, x, prog, key):
    """Applies `f(x_g, programmed_g, key_g)` over the leading group axis."""
    G = x.shape[0]
    if G == 1:
        return f(x[0], jax.tree.map(lambda a: a[0], prog), key)[None]
    if key is None:
        return jax.vmap(lambda xg, pg: f(xg, pg, None))(x, prog)
    keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(G))
    return jax.vmap(f)(x, prog, keys)


class AnalogDot(AnalogOp):
    """Replaces `dot_general` of `nnx.Linear` and `nnx.LinearGeneral`."""

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 **kwargs):
        del precision, preferred_element_type, kwargs
        (lc, rc), (lb, rb) = dimension_numbers
        return _dot(self, lhs, rhs, tuple(lc), tuple(rc), tuple(lb), tuple(rb))


def _dot(op: AnalogOp, lhs, rhs, lc, rc, lb, rb):
    """`lax.dot_general(lhs, rhs, ((lc, rc), (lb, rb)))` with `rhs` on crossbars."""
    roles = op.kernel.roles
    if sorted(rc) != [i for i, r in enumerate(roles) if r == "c"] or sorted(rb) != [
            i for i, r in enumerate(roles) if r == "g"]:
        raise ConfigError(f"layer {op.path!r}: the contraction {((lc, rc), (lb, rb))} does not "
                          f"match the kernel's roles {roles} fixed by analogize")
    c_pairs, g_pairs = sorted(zip(rc, lc, strict=True)), sorted(zip(rb, lb, strict=True))
    free = [i for i in range(lhs.ndim) if i not in lc and i not in lb]
    x = jnp.transpose(lhs, [a for _, a in g_pairs] + free + [a for _, a in c_pairs])
    g_shape = [lhs.shape[a] for _, a in g_pairs]
    free_shape = [lhs.shape[a] for a in free]
    x = x.reshape(math.prod(g_shape), *free_shape, -1)
    y = op.matmul(x, rhs)
    n_shape = [rhs.shape[i] for i, r in enumerate(roles) if r == "n"]
    y = y.reshape(*g_shape, *free_shape, *n_shape)
    # dot_general orders batch axes as the pairs were given; ours are sorted by kernel axis.
    given = [sorted(rb).index(b) for b in rb]
    y = jnp.transpose(y, given + list(range(len(g_shape), y.ndim)))
    return y.astype(jnp.result_type(lhs.dtype, rhs.dtype))


class AnalogEinsum(AnalogOp):
    """Replaces `einsum_op` of `nnx.Einsum` (the kernel is the second operand)."""

    def __call__(self, subscripts, lhs, rhs, precision=None, preferred_element_type=None,
                 **kwargs):
        del precision, preferred_element_type, kwargs
        ins, out = _expand_ellipsis(subscripts, lhs.ndim)
        a, b = ins
        lc = tuple(a.index(c) for c in a if c in b and c not in out)
        rc = tuple(b.index(c) for c in a if c in b and c not in out)
        lb = tuple(a.index(c) for c in a if c in b and c in out)
        rb = tuple(b.index(c) for c in a if c in b and c in out)
        y = _dot(self, lhs, rhs, lc, rc, lb, rb)
        # dot_general's output order: shared letters, lhs-only letters, kernel-only letters.
        dg = ("".join(c for c in a if c in b and c in out) + "".join(c for c in a if c not in b)
              + "".join(c for c in b if c not in a))
        return jnp.einsum(f"{dg}->{out}", y)


def _expand_ellipsis(subscripts: str, lhs_ndim: int) -> tuple[tuple[str, str], str]:
    spec = subscripts.replace(" ", "")
    ins, out = spec.split("->")
    a, b = ins.split(",")
    if "..." in a:
        used = set(spec)
        fresh = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
        n = lhs_ndim - (len(a) - 3)
        a = a.replace("...", "".join(fresh[:n]))
        out = out.replace("...", "".join(fresh[:n]))
    return (a, b), out


def einsum_roles(subscripts: str | None, path: str) -> tuple[str, ...]:
    """The kernel-axis roles of an einsum whose second operand is the kernel.

    Raises:
      ConfigError: naming the layer, when the equation cannot map onto crossbars.
    """
    if subscripts is None:
        raise ConfigError(f"layer {path!r} (Einsum) has no einsum_str at construction; "
                          "analog Einsum layers need it fixed")
    spec = subscripts.replace(" ", "")
    try:
        ins, out = spec.split("->")
        a, b = ins.split(",")
    except ValueError:
        raise ConfigError(f"layer {path!r}: einsum {subscripts!r} needs the form "
                          "'lhs,kernel->out'") from None
    if "..." in b or len(set(b)) != len(b) or len(set(a.replace("...", ""))) != len(
            a.replace("...", "")):
        raise ConfigError(f"layer {path!r}: einsum {subscripts!r} repeats an index or puts an "
                          "ellipsis on the kernel; crossbars need plain matrices")
    roles = []
    for c in b:
        if c in a:
            roles.append("g" if c in out else "c")
        elif c in out:
            roles.append("n")
        else:
            raise ConfigError(f"layer {path!r}: einsum {subscripts!r} sums the kernel over "
                              f"{c!r} alone; crossbars need every kernel axis in the input "
                              "or the output")
    for c in a.replace("...", ""):
        if c not in b and c not in out:
            raise ConfigError(f"layer {path!r}: einsum {subscripts!r} sums the input over "
                              f"{c!r} alone, which is not a crossbar product")
    if "c" not in roles:
        raise ConfigError(f"layer {path!r}: einsum {subscripts!r} contracts no kernel axis")
    return tuple(roles)


class AnalogConv(AnalogOp):
    """Replaces `conv_general_dilated` of `nnx.Conv` (1-D and 2-D, channels last)."""

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                 precision=None, preferred_element_type=None, **kwargs):
        del dimension_numbers, precision, preferred_element_type, kwargs
        nd = rhs.ndim - 2
        ones = (1,) * nd
        if tuple(lhs_dilation or ones) != ones or batch_group_count != 1:
            raise ConfigError(f"layer {self.path!r}: input dilation (transposed convolution) "
                              "and batch groups are not supported on crossbars")
        strides, dil = tuple(window_strides), tuple(rhs_dilation or ones)
        window = rhs.shape[:nd]
        if isinstance(padding, str):
            eff = [(k - 1) * d + 1 for k, d in zip(window, dil, strict=True)]
            pads = jax.lax.padtype_to_pads(lhs.shape[1:1 + nd], eff, strides, padding)
        else:
            pads = [tuple(p) for p in padding]
        if nd == 1:  # a 1-D convolution is a 2-D one over a single row
            lhs, rhs = lhs[:, None], rhs[None]
            strides, dil, pads = (1, *strides), (1, *dil), [(0, 0), *pads]
        pads = tuple(tuple(int(v) for v in p) for p in pads)
        G = feature_group_count
        cin = lhs.shape[-1] // G
        x = jnp.moveaxis(lhs.reshape(*lhs.shape[:-1], G, cin), -2, 0)  # (G, N, H, W, cin)
        shape = (*rhs.shape[:2], cin, rhs.shape[-1] // G)
        conv_args = (shape, strides, pads, dil)
        if self.mode != "analog":
            self._profile(x, rhs, conv_args)
            y = jax.lax.conv_general_dilated(
                lhs, rhs, strides, pads, rhs_dilation=dil, feature_group_count=G,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
        else:
            prog, key = self._programmed(rhs), self._read_key()
            f = lambda xg, pg, kg: mvm.conv(xg, pg, self.config, shape, strides, pads,  # noqa: E731
                                            key=kg, dilation=dil)
            y = _per_group(f, x, prog, key)  # (G, N, H', W', cout/G)
            y = jnp.moveaxis(y, 0, -2).reshape(*y.shape[1:-1], -1)
        y = y.astype(jnp.result_type(lhs.dtype, rhs.dtype))
        return y[:, 0] if nd == 1 else y


# ---- graph traversal ---------------------------------------------------------------------------
def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every submodule by dotted graph path (the root is absent)."""
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module) and path}


def analog_layers(model: nnx.Module) -> dict[str, tuple[nnx.Module, AnalogOp]]:
    """The analog layers of an analogized model: path → (layer, its `AnalogOp`)."""
    out = {}
    for path, node in _modules(model).items():
        hook = HOOKS.get(type(node))
        op = getattr(node, hook, None) if hook else None
        if isinstance(op, AnalogOp):
            out[path] = (node, op)
    return out


def network_config(config: Any) -> NetworkConfig:
    """A `NetworkConfig` from a preset name, a path, a dict, a `CrossbarConfig` or itself."""
    if isinstance(config, NetworkConfig):
        return config
    if isinstance(config, CrossbarConfig):
        return NetworkConfig(crossbar=config)
    if isinstance(config, Mapping):
        return NetworkConfig.from_dict(config)
    if isinstance(config, str | Path):
        return NetworkConfig.load(str(config))
    raise ConfigError(f"config must be a preset name, a JSON/YAML path, a dict, a CrossbarConfig "
                      f"or a NetworkConfig, got {type(config).__name__}")


def _kernel_of(path: str, layer: nnx.Module) -> Kernel:
    if isinstance(layer, nnx.Conv):
        if len(layer.kernel_size) not in (1, 2):
            raise ConfigError(f"layer {path!r}: only 1-D and 2-D convolutions map onto "
                              f"crossbars, got kernel_size {layer.kernel_size}")
        return Kernel(groups=int(layer.feature_group_count))
    if isinstance(layer, nnx.Einsum):
        return Kernel(einsum_roles(layer.einsum_str, path))
    if isinstance(layer, nnx.LinearGeneral):
        nb, na = len(layer.batch_axis), len(layer.axis)
        n_out = len(layer.out_features)
        return Kernel(("g",) * nb + ("c",) * na + ("n",) * n_out)
    return Kernel(("c", "n"))


_OPS = {"dot_general": AnalogDot, "einsum_op": AnalogEinsum,
        "conv_general_dilated": AnalogConv}


def analogize(model: nnx.Module, config: Any) -> nnx.Module:
    """A copy of `model` whose covered layers compute on simulated crossbars.

    Args:
      model: any Flax NNX model built from stock layers (left unchanged).
      config: a preset name (`digital`, `ideal`, `paper_baseline`), a JSON/YAML path, a
        dict, a `CrossbarConfig` or a `NetworkConfig`. `NetworkConfig.layers` patterns
        (fnmatch) match the layers' dotted graph paths.

    Returns:
      The analog model: call `calibrate_model` if its config has calibrated ranges, then
      `program_model` for each trial.

    Raises:
      ConfigError: a pattern that matches no layer (the message lists the paths), a pattern
        that makes an unsupported layer analog, or weights that cannot be mapped.
    """
    net = network_config(config)
    if net.fold_batchnorm:
        raise ConfigError("fold_batchnorm: analogize maps the model as given; fold batch "
                          "norm into the weights before analogizing")
    analog = nnx.clone(model)
    modules = _modules(analog)
    covered = {p: m for p, m in modules.items() if type(m) in HOOKS}
    for pattern, text in net.layers:
        hits = [p for p in modules if fnmatch.fnmatchcase(p, pattern)]
        if not hits:
            raise ConfigError(f"layers pattern {pattern!r} matches no layer; analog layers: "
                              f"{', '.join(covered) or '(none)'}")
        if text != "digital" and not any(p in covered for p in hits):
            kinds = ", ".join(f"{p} ({type(modules[p]).__name__})" for p in hits[:5])
            raise ConfigError(f"layers pattern {pattern!r} names only layers that cannot be "
                              f"analog: {kinds}; supported types: "
                              f"{', '.join(t.__name__ for t in HOOKS)}")
    for path, layer in covered.items():
        cfg = net.crossbar_for(path)
        if cfg is None:
            continue
        hook = HOOKS[type(layer)]
        op = _OPS[hook](path, cfg, _kernel_of(path, layer), net.calibration)
        setattr(layer, hook, nnx.data(op))
        if hook == "dot_general" and getattr(layer, "dot_general_cls", None) is not None:
            layer.dot_general_cls = None
    return analog


# ---- programming -------------------------------------------------------------------------------
def _layer_kernel(layer: nnx.Module) -> jax.Array:
    kernel = layer.kernel[...]
    mask = getattr(layer, "mask", None)
    return kernel if mask is None else kernel * mask


def _check_finite(path: str, kernel: jax.Array) -> None:
    if isinstance(kernel, jax.core.Tracer):
        return
    if not bool(jnp.all(jnp.isfinite(kernel))):
        raise ConfigError(f"layer {path!r}: its weights are not all finite (NaN or inf)")


def program_model(analog: nnx.Module, key: jax.Array | None, *, live: bool = False) -> None:
    """Programs every analog layer for one Monte Carlo trial, in place.

    Each layer's conductances (programming error, drift to `device.time`) come from
    `fold_in(program_key, layer_id(path))` and its read-noise stream from the read key, where
    `program_key, read_key = split(key)`. The same key gives the same model.

    Args:
      analog: from `analogize` (calibrated first when its ranges are "calibrated").
      key: the trial's PRNG key; None only when no layer draws anything random.
      live: do not store conductances: program from the current kernels on every forward
        call (the same draws for the same kernels), so gradients reach the weights.

    Raises:
      ConfigError: naming the layer, when `key` is None but the layer draws random errors,
        its ADC range awaits calibration, or its weights are not finite.
    """
    layers = analog_layers(analog)
    k_prog = k_read = None
    if key is not None:
        k_prog, k_read = jax.random.split(key)
    for path, (layer, op) in layers.items():
        cfg = op.config
        if key is None and _needs_key(cfg):
            raise ConfigError(f"layer {path!r} draws random errors: program_model needs a key")
        if cfg.adc.range == "calibrated" and cfg.adc.bits > 0:
            raise ConfigError(f"layer {path!r} needs a calibrated ADC range: call "
                              "jaxbar.calibrate_model(analog, x_cal) first")
        kernel = _layer_kernel(layer)
        _check_finite(path, kernel)
        op.read_count.set_value(jnp.zeros((), jnp.uint32))
        op.read_key.set_value(None if k_read is None else
                              jax.random.fold_in(k_read, layer_id(path)))
        op.live_key.set_value(k_prog if live else None)
        op.conductances.set_value(None if live else op.program(kernel, k_prog))


def clear_programming(analog: nnx.Module) -> None:
    """Forgets the current trial, in place: conductances, read-noise streams, live keys."""
    for _, op in analog_layers(analog).values():
        op.conductances.set_value(None)
        op.live_key.set_value(None)
        op.read_key.set_value(None)
        op.read_count.set_value(jnp.zeros((), jnp.uint32))


def is_programmed(analog: nnx.Module) -> bool:
    """Whether every analog layer holds conductances (or programs itself live)."""
    return all(op.conductances.get_value() is not None or op.live_key.get_value() is not None
               for _, op in analog_layers(analog).values())


# ---- calibration -------------------------------------------------------------------------------
def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, np.ndarray | jax.Array):
        return (data[i:i + batch_size] for i in range(0, len(data), batch_size))
    return data


def calibrate_model(analog: nnx.Module, data: Any, *, batch_size: int = 100,
                    forward: Callable[[nnx.Module, Any], Any] | None = None):
    """Calibrates each analog layer's DAC and ADC ranges from data, in place (PHYSICS §7).

    Two digital passes: the first sets each layer's input range from a percentile of its
    |inputs| (signed when it sees negative inputs), the second each weight slice's ADC range
    from the inner percentage of its pre-ADC outputs (with the ADC and device errors off).
    Percentiles come from the config's `calibration` settings. Stored conductances are
    cleared, since the configs change: program the model afterwards.

    Args:
      analog: from `analogize`.
      data: an array of inputs (split into batches of `batch_size`) or an iterable of batches.
      batch_size: inputs per forward pass when `data` is an array.
      forward: `forward(model, batch)` runs one batch (default `model(batch)`).

    Returns:
      The calibrated ranges (`jaxbar.nn.calibrate.Calibration`, saved as JSON by `.save`).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size!r} is invalid: expected an integer >= 1")
    forward = forward or (lambda m, b: m(b))
    layers = analog_layers(analog)
    if not layers:
        return Calibration({}, {})

    def run(mode):
        for _, op in layers.values():
            op.mode = mode
            op.samples = Samples()
        try:
            n = 0
            for batch in _batches(data, batch_size):
                forward(analog, batch)
                n += 1
            if n == 0:
                raise ConfigError("calibrate_model: the calibration data is empty")
            return {p: op.samples.items for p, (_, op) in layers.items()}
        finally:
            for _, op in layers.values():
                op.mode = "analog"
                del op.samples

    clear_programming(analog)  # profiling runs the digital product
    inputs = {p: cal.input_range(np.concatenate(v), layers[p][1].settings.input_percentile)
              for p, v in run("inputs").items()}
    for p, (_, op) in layers.items():
        op.input_range = inputs[p]
    adc_samples = run("adc") if any(op.config.adc.range == "calibrated"
                                    for _, op in layers.values()) else {}
    result = {}
    for p, (_, op) in layers.items():
        del op.input_range
        s, adc = op.settings, None
        if op.config.adc.range == "calibrated":
            per_slice = [np.concatenate(v) for v in zip(*adc_samples[p], strict=True)]
            adc = cal.ranges_from_samples(per_slice, s.adc_percentile, s.symmetric,
                                          s.power_of_two)
        op.crossbar.set_value(cal.with_ranges(op.config, inputs[p], adc))
        result[p] = LayerCalibration(inputs[p], adc)
    return Calibration(result, {})


# ---- batches under jit -------------------------------------------------------------------------
def map_batches(model: nnx.Module, step: Callable[[nnx.Module, Any], Any], batches: Any) -> Any:
    """`step(model, batch)` over stacked batches as one `lax.scan`, carrying model state.

    Use it inside a jitted or Monte Carlo function: the read-noise streams advance from batch
    to batch as they would in a Python loop, and the batches are not unrolled.

    Args:
      model: an NNX model (analog or not).
      step: `(model, batch) -> pytree`.
      batches: a pytree whose leaves have a leading batch-index axis.

    Returns:
      The stacked outputs of `step`.
    """
    graphdef, state = nnx.split(model)

    def body(state, batch):
        m = nnx.merge(graphdef, state, copy=True)
        out = step(m, batch)
        return nnx.state(m), out

    state, out = jax.lax.scan(body, state, batches)
    nnx.update(model, state)
    return out
