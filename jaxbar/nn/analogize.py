"""Any Flax NNX model on simulated crossbars: `analogize` and `program_model`.

`analogize` clones a model and replaces the contraction hook of every covered layer by an
analog op, the way AQT and Qwix inject quantization into stock layers:

- `nnx.Linear`, `nnx.LinearGeneral`: `dot_general`;
- `nnx.Einsum`: `einsum_op` (the kernel is the weight operand);
- `nnx.Conv` (1-D and 2-D): `conv_general_dilated`.

Each analog layer holds its weights as one or more (K, N) matrices: a grouped convolution's
groups, and the batch axes an einsum or `LinearGeneral` kernel shares with its inputs, are
separate matrices on separate arrays. Everything else (activations, norms, pooling, biases,
products of two activations such as attention's QKᵀ) stays digital (PHYSICS §7).

A trial is a PRNG key: `program_model(analog, key)` splits it into a programming and a read
key, programs every layer from `fold_in(programming key, layer_id(path))` and seeds the
layer's read-noise stream, which advances by one draw per forward call. Programmed
conductances live in the model's state (`Conductances` variables), so `nnx.split` /
`nnx.merge`, `jit` and the trial engine carry them like parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbar import calibration as cal
from jaxbar.config import ConfigError, CrossbarConfig
from jaxbar.core import ir, mapping, mvm
from jaxbar.core.conv2d import conv2d
from jaxbar.nn.graph import modules
from jaxbar.nn.network_config import CalibrationSettings, NetworkConfig
from jaxbar.nn.ranges import LearnedRanges, host_ranges, init_ranges, learned_product, range_spec

__all__ = [
    "ANALOG_STATE",
    "AnalogOp",
    "Conductances",
    "LayerConfig",
    "analog_layers",
    "analogize",
    "attach_learned_ranges",
    "clear_programming",
    "commit_learned_ranges",
    "digital_model",
    "is_programmed",
    "layer_id",
    "learned_ranges",
    "map_batches",
    "network_config",
    "program_model",
    "stack_batches",
    "update_configs",
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
    """A layer's crossbar config.

    It is in the model's state, so its swept numbers (σ, on/off ratio, wire resistances, ...)
    are traced and a sweep over them compiles once.
    """


class ReadCount(nnx.Variable):
    """How many forward calls have drawn from a layer's read-noise stream."""


#: The variables `analogize` adds to a model: configs and a trial's programming (not parameters).
ANALOG_STATE = (LayerConfig, Conductances, AnalogKey, ReadCount)


class Samples:
    """Calibration samples collected by an op while `calibrate_model` runs.

    Attributes:
      config: the layer's config, concrete (inside a transform the variable's is traced),
        with the input range to profile pre-ADC outputs with.
      items: the samples, one entry per call.
    """

    def __init__(self, config: CrossbarConfig):
        self.config = config
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


def layer_id(path: str) -> int:
    """A stable integer per layer path, folded into the trial key."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def _needs_key(config: CrossbarConfig) -> bool:
    d = config.device
    return (d.programming_error.active or d.read_noise.active or d.drift.active
            or config.adc.random or config.adc.stochastic_rounding)


class AnalogOp(nnx.Module):
    """The analog replacement of one layer's contraction hook.

    Attributes:
      path: the layer's NNX graph path, dotted (`"blocks.0.attn.query"`).
      crossbar: the layer's crossbar config (a `LayerConfig` variable; `config` reads it).
      kernel: how the layer's kernel maps to weight matrices.
      settings: how `jaxbar.calibrate_model` calibrates this layer.
      conductances: the programmed crossbars of the current trial, or None.
      read_key, read_count: the read-noise stream and its position.
      live_key: when set, the layer programs itself from its current kernel on every call
        (training: gradients reach the weights).
      mode: "analog", or "inputs" / "adc" while `calibrate_model` profiles the layer.
      ranges: learnable input and ADC ranges (`LearnedRanges`), or None: the config's.
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
        self.ranges = nnx.data(None)
        self.mode = "analog"

    @property
    def config(self) -> CrossbarConfig:
        """The layer's crossbar config (concrete array numbers read back as Python numbers)."""
        return _python_numbers(self.crossbar.get_value())

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
        if not (self.config.device.read_noise.active or self.config.adc.stochastic_rounding):
            return None
        stream = self.read_key.get_value()
        if stream is None:
            raise ConfigError(f"layer {self.path!r} has read noise or stochastic ADC rounding "
                              "but no read-noise stream: call jaxbar.program_model(analog, "
                              "key) first")
        n = self.read_count.get_value()
        self.read_count.set_value(n + 1)
        return jax.random.fold_in(stream, n)

    def solving(self):
        """A context naming this layer in IR-drop non-convergence errors."""
        if self.config.parasitics.topology == "none":
            return contextlib.nullcontext()
        return ir.solving(f"layer {self.path!r}")

    # ---- the analog product of (G, ..., K) inputs ----------------------------------------
    def product(self, x: jax.Array, kernel: jax.Array, make_op, core) -> jax.Array:
        """Each group's inputs through its crossbars, stacked over the leading group axis.

        Args:
          x: (G, ...) inputs.
          kernel: the layer's kernel (programmed from when the layer is live).
          make_op: `layout -> mvm.ArrayOp` of one group.
          core: `(x_g, programmed_g, key_g) -> y_g`, the product with the config's ranges.
        """
        with self.solving():
            prog, key = self._programmed(kernel), self._read_key()
            if self.ranges is None:
                return _per_group(core, x, prog, key)
            cfg, params = self.config, self.ranges.get_value()
            f = lambda xg, pg, kg: learned_product(  # noqa: E731
                xg, pg, cfg, params, kg, make_op(mapping.layout(*pg.shape, cfg)))
            return _per_group(f, x, prog, key)

    def matmul(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """`(G, ..., K) -> (G, ..., N)`: each group's inputs through its crossbars."""
        if self.mode != "analog":
            return self._profile(x, kernel, None)
        return self.product(x, kernel, mvm.dense_op,
                            lambda xg, pg, kg: mvm.matmul(xg, pg, self.config, kg))

    # ---- calibration -----------------------------------------------------------------------
    def _profile(self, x, kernel, conv_args):
        """Records calibration samples and returns the digital product (`None` for a conv).

        The samples reach the host through `jax.debug.callback`, so layers that run inside
        a transform (an `nnx.RNN`'s scan, a jitted block) are profiled too.
        """
        W = self.kernel.matrices(kernel)
        samples, cfg = self.samples.items, self.samples.config
        if self.mode == "inputs":
            _host(lambda v: samples.append(cal.subsample(v)), x)
        elif self.mode == "adc":
            # The outputs are computed here (traced when the forward is compiled); the host
            # callback only thins them, since JAX called from a callback can deadlock.
            lay = mapping.layout(*W.shape[1:], cfg)
            op = mvm.dense_op(lay) if conv_args is None else mvm.conv_op(lay, *conv_args)
            ys = [cal.pre_adc_outputs(x[g], W[g], cfg, op) for g in range(W.shape[0])]

            def record(*yv):
                per_group = [cal.slice_samples(v) for v in yv]
                samples.append([np.concatenate(s) for s in zip(*per_group, strict=True)])

            _host(record, *ys)
        if conv_args is not None:
            return None
        return jnp.einsum("g...k,gkn->g...n", x, W.astype(x.dtype),
                          precision=jax.lax.Precision.HIGHEST)


def _python_numbers(config: CrossbarConfig) -> CrossbarConfig:
    """`config` with its concrete scalar array leaves as Python numbers.

    A compiled call (`nnx.jit`) hands the model's state back as arrays, config numbers
    included; as Python numbers they validate again when the config is replaced. Traced
    leaves stay as they are.
    """
    def number(v):
        if isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer) and v.ndim == 0:
            return v.item()
        return v

    return jax.tree.map(number, config)


def _host(f, *args):
    """`f(*args)` on concrete arrays: now if they are, else when the traced program runs."""
    if any(isinstance(a, jax.core.Tracer) for a in args):
        jax.debug.callback(f, *args)
    else:
        f(*args)


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
            y = conv2d(lhs, rhs, strides, pads, dilation=dil, feature_group_count=G,
                       precision=jax.lax.Precision.HIGHEST)
        else:
            y = self.product(  # (G, N, H', W', cout/G)
                x, rhs, lambda lay: mvm.conv_op(lay, *conv_args),
                lambda xg, pg, kg: mvm.conv(xg, pg, self.config, shape, strides, pads, key=kg,
                                            dilation=dil))
            y = jnp.moveaxis(y, 0, -2).reshape(*y.shape[1:-1], -1)
        y = y.astype(jnp.result_type(lhs.dtype, rhs.dtype))
        return y[:, 0] if nd == 1 else y


# ---- graph traversal ---------------------------------------------------------------------------
def analog_layers(model: nnx.Module) -> dict[str, tuple[nnx.Module, AnalogOp]]:
    """The analog layers of an analogized model: path → (layer, its `AnalogOp`)."""
    out = {}
    for path, node in modules(model).items():
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
    mods = modules(analog)
    covered = {p: m for p, m in mods.items() if type(m) in HOOKS}
    for pattern, text in net.layers:
        hits = [p for p in mods if fnmatch.fnmatchcase(p, pattern)]
        if not hits:
            raise ConfigError(f"layers pattern {pattern!r} matches no layer; analog layers: "
                              f"{', '.join(covered) or '(none)'}")
        if text != "digital" and not any(p in covered for p in hits):
            kinds = ", ".join(f"{p} ({type(mods[p]).__name__})" for p in hits[:5])
            raise ConfigError(f"layers pattern {pattern!r} names only layers that cannot be "
                              f"analog: {kinds}; supported types: "
                              f"{', '.join(t.__name__ for t in HOOKS)}")
    for path, layer in covered.items():
        cfg = net.crossbar_for(path)
        if cfg is None:
            continue
        hook = HOOKS[type(layer)]
        op = _OPS[hook](path, cfg, _kernel_of(path, layer), net.calibration)
        op.original = (getattr(layer, hook), getattr(layer, "dot_general_cls", None))
        setattr(layer, hook, nnx.data(op))
        if op.original[1] is not None:
            layer.dot_general_cls = None
    return analog


def digital_model(analog: nnx.Module) -> nnx.Module:
    """A copy of an analogized model with its layers' original contraction hooks back."""
    out = nnx.clone(analog)
    for layer, op in analog_layers(out).values():
        hook, cls = op.original
        setattr(layer, HOOKS[type(layer)], nnx.static(hook) if hook is not None else None)
        if cls is not None:
            layer.dot_general_cls = cls
    return out


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
        with op.solving():
            op.conductances.set_value(None if live else op.program(kernel, k_prog))


def clear_programming(analog: nnx.Module) -> None:
    """Forgets the current trial, in place: conductances, read-noise streams, live keys."""
    for _, op in analog_layers(analog).values():
        op.conductances.set_value(None)
        op.live_key.set_value(None)
        op.read_key.set_value(None)
        op.read_count.set_value(jnp.zeros((), jnp.uint32))


def update_configs(analog: nnx.Module, **changes: Any) -> None:
    """Applies `CrossbarConfig.replace(**changes)` to every analog layer's config, in place.

    Calibrated ranges stay; the current trial is forgotten. Between sweep points that change
    only numbers (σ, the on/off ratio, ...), compiled functions are reused.
    """
    clear_programming(analog)
    for _, op in analog_layers(analog).values():
        op.crossbar.set_value(op.config.replace(**changes))


def is_programmed(analog: nnx.Module) -> bool:
    """Whether every analog layer holds conductances (or programs itself live)."""
    return all(op.conductances.get_value() is not None or op.live_key.get_value() is not None
               for _, op in analog_layers(analog).values())


# ---- learned ranges ----------------------------------------------------------------------------
def attach_learned_ranges(analog: nnx.Module) -> None:
    """Gives every analog layer learnable input and ADC ranges, in place (`LearnedRanges`).

    They start at the configured ranges (calibrate first), are `nnx.Param`s (so `nnx.grad` and
    optax reach them; filter `LearnedRanges` to give them an optimizer of their own), and the
    layers compute with them until `commit_learned_ranges`.
    """
    for path, (layer, op) in analog_layers(analog).items():
        cfg = op.config
        if cfg.adc.range == "calibrated" and cfg.adc.bits > 0:
            raise ConfigError(f"layer {path!r} needs a calibrated ADC range before its ranges "
                              "can be learned: call jaxbar.calibrate_model first")
        K, N = op.kernel.matrices(_layer_kernel(layer)).shape[1:]
        op.ranges = LearnedRanges(init_ranges(cfg, K, N))


def learned_ranges(analog: nnx.Module) -> dict[str, tuple[tuple[float, float], Any]]:
    """Each layer's learned `(input range, ADC ranges or None)` as floats."""
    out = {}
    for path, (layer, op) in analog_layers(analog).items():
        if op.ranges is not None:
            K, N = op.kernel.matrices(_layer_kernel(layer)).shape[1:]
            params = jax.tree.map(np.asarray, op.ranges.get_value())
            out[path] = host_ranges(params, range_spec(op.config, K, N))
    return out


def commit_learned_ranges(analog: nnx.Module) -> None:
    """Writes the learned ranges into the layers' configs and drops the parameters, in place."""
    ranges = learned_ranges(analog)
    for path, (_, op) in analog_layers(analog).items():
        if path in ranges:
            inp, adc = ranges[path]
            changes = {"inputs.range": inp}
            if adc is not None:
                changes["adc.range"] = adc if len(adc) > 1 else adc[0]
            op.crossbar.set_value(op.config.replace(**changes))
            op.ranges = nnx.data(None)


# ---- batches under jit ---------------------------------------------------------------------
def stack_batches(batches: Iterable[Any]) -> Any:
    """A finite iterable of equally shaped batches as one pytree with a leading batch axis.

    Feed the result to `map_batches` inside a jitted or `monte_carlo` function, so any data
    source (a data loader, a generator of token batches) runs without Python loops in the
    trace.

    Args:
      batches: batches that are pytrees of arrays of one structure and shape.

    Returns:
      The stacked pytree (NumPy arrays).

    Raises:
      ConfigError: no batch, or a batch whose structure or shapes differ from the first's.
    """
    items = list(batches)
    if not items:
        raise ConfigError("stack_batches: no batch")
    first = jax.tree.structure(items[0])
    shapes = [np.shape(a) for a in jax.tree.leaves(items[0])]
    for i, b in enumerate(items[1:], 1):
        if jax.tree.structure(b) != first or [np.shape(a) for a in jax.tree.leaves(b)] != shapes:
            raise ConfigError(f"stack_batches: batch {i} differs from batch 0 in structure or "
                              f"shapes ({[np.shape(a) for a in jax.tree.leaves(b)]} vs "
                              f"{shapes}); pad or drop the last batch")
    return jax.tree.map(lambda *a: np.stack([np.asarray(v) for v in a]), *items)


def map_batches(model: nnx.Module, step: Callable[[nnx.Module, Any], Any], batches: Any, *,
                carried: Any = ...) -> Any:
    """`step(model, batch)` over stacked batches as one `lax.scan`, carrying model state.

    Use it inside a jitted or Monte Carlo function: the read-noise streams advance from batch
    to batch as they would in a Python loop, and the batches are not unrolled.

    Args:
      model: an NNX model (analog or not).
      step: `(model, batch) -> pytree`.
      batches: a pytree whose leaves have a leading batch-index axis.
      carried: an NNX filter of the state that `step` may change (default: all of it);
        the rest (parameters, conductances) is constant across batches. `ReadCount` suffices
        for inference.

    Returns:
      The stacked outputs of `step`.
    """
    graphdef, state, rest = nnx.split(model, carried, ...)

    def body(state, batch):
        m = nnx.merge(graphdef, state, rest, copy=True)
        out = step(m, batch)
        return nnx.state(m, carried), out

    state, out = jax.lax.scan(body, state, batches)
    nnx.update(model, state)
    return out
