"""Weights → integers → conductances, bit slicing and array partitioning.

PHYSICS §1 and §5. Functions here are pure and shape-static: the partition
layout is computed from (K, N, config) in Python and used as constant indices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxbar.config import CrossbarConfig
from jaxbar.core.converters import round_ste

__all__ = [
    "Layout",
    "clip_and_scale",
    "conductances",
    "layout",
    "output_scale",
    "partition_sizes",
    "quantize_cells",
    "slice_weights",
    "slice_recombination",
    "weight_levels",
    "zero_weight_conductances",
]


def partition_sizes(n: int, max_size: int | None) -> tuple[int, ...]:
    """Near-equal partition of n rows (or columns) into arrays of at most max_size.

    With `p = ceil(n/max_size)` and `r = n mod p`, the first `p - r` parts get
    `n // p` and the last `r` get one more (1152 at 512 → 384×3; 100 at 48 → 33, 33, 34).
    """
    if max_size is None or n <= max_size:
        return (n,)
    p = -(-n // max_size)
    q, r = divmod(n, p)
    return (q,) * (p - r) + (q + 1,) * r


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static placement of a K×N matrix onto padded array tiles.

    Attributes:
      K, N: matrix shape.
      row_sizes, col_sizes: partition sizes.
      rows, cols: padded tile size (largest partition).
      row_index: (pr, rows) indices into K; K marks padding.
      col_index: (pc·cols,) indices into N; N marks padding.
      out_index: (N,) positions of the real columns among pc·cols.
    """

    K: int
    N: int
    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]

    @property
    def rows(self) -> int:
        """Rows of each array (the largest row partition)."""
        return max(self.row_sizes)

    @property
    def cols(self) -> int:
        """Columns of each array (the largest column partition)."""
        return max(self.col_sizes)

    @property
    def trivial_rows(self) -> bool:
        """Whether the matrix rows fill one partition exactly (no padding)."""
        return len(self.row_sizes) == 1

    @property
    def trivial_cols(self) -> bool:
        """Whether the matrix columns fill one partition exactly (no padding)."""
        return len(self.col_sizes) == 1

    @functools.cached_property
    def row_index(self) -> np.ndarray:
        """(pr, rows) matrix row of each array row (K for padding)."""
        return _tile_index(self.row_sizes, self.K)

    @functools.cached_property
    def col_index(self) -> np.ndarray:
        """Matrix column of each padded column (N for padding)."""
        return _tile_index(self.col_sizes, self.N).reshape(-1)

    @functools.cached_property
    def out_index(self) -> np.ndarray:
        """Padded column of each matrix column."""
        return np.flatnonzero(self.col_index < self.N).astype(np.int32)

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """(pr, rows, pc·cols) True where a real cell sits."""
        return (self.row_index < self.K)[:, :, None] & (self.col_index < self.N)[None, None, :]


def _tile_index(sizes: tuple[int, ...], n: int) -> np.ndarray:
    width = max(sizes)
    idx = np.full((len(sizes), width), n, dtype=np.int32)
    start = 0
    for i, s in enumerate(sizes):
        idx[i, :s] = np.arange(start, start + s)
        start += s
    return idx


@functools.lru_cache(maxsize=512)
def _layout(K: int, N: int, rows: int | None, cols: int | None) -> Layout:
    return Layout(K, N, partition_sizes(K, rows), partition_sizes(N, cols))


def layout(K: int, N: int, config: CrossbarConfig) -> Layout:
    """The partition layout of a K×N matrix under `config.array`."""
    return _layout(K, N, config.array.rows, config.array.cols)


def clip_and_scale(W: jax.Array, percentile: float) -> tuple[jax.Array, jax.Array]:
    """Clips W at w_max and scales it to [-1, 1] (PHYSICS §1.1).

    Returns:
      (w, w_max): `w = clip(W, -w_max, w_max)/w_max`; an all-zero W uses w_max = 1.
    """
    if percentile >= 100.0:
        w_max = jnp.max(jnp.abs(W))
    else:
        hi = jnp.percentile(W, percentile)
        lo = jnp.percentile(W, 100.0 - percentile)
        w_max = jnp.maximum(jnp.abs(hi), jnp.abs(lo))
    w_max = jnp.where(w_max > 0, w_max, jnp.ones_like(w_max))
    return jnp.clip(W, -w_max, w_max) / w_max, w_max


def weight_levels(bits: int) -> int:
    """Magnitude steps `2^(B-1) - 1` of signed B-bit weights."""
    return 2 ** (bits - 1) - 1


def _digits_ste(value: jax.Array, base_bits: int, count: int) -> list[jax.Array]:
    """Base-2^b digits of a non-negative integer array, LSB first, straight-through.

    The gradient of `value` is spread so that `Σ_i 2^(i·b)·digit_i` has derivative 1.
    """
    v = jax.lax.stop_gradient(value)
    base = 2**base_bits
    digits = [jnp.floor(v / base**i) % base for i in range(count)]
    ste = (value - v) / sum(base**i for i in range(count))
    return [d + ste for d in digits]


def slice_weights(w: jax.Array, config: CrossbarConfig) -> jax.Array:
    """Per-slice cell targets (PHYSICS §1.2–1.3).

    Args:
      w: clipped, scaled weights in [-1, 1], shape (K, N).
      config: weight bits, scheme and slices.

    Returns:
      Shape (S, K, N). Differential: signed targets `v ∈ [-1, 1]` of each pair
      (`sign·digit/(2^b-1)`; unsliced: `w_q` or `w`). Offset: cell targets in
      [0, 1] (`level/(2^B-1)` or `(w+1)/2`; sliced: `digit/(2^b-1)`).
    """
    bits, S = config.weights.bits, config.mapping.slices
    differential = config.mapping.scheme == "differential"
    if bits == 0:
        return (w if differential else (w + 1.0) / 2.0)[None]
    L = weight_levels(bits)
    w_int = round_ste(w * L)
    if S == 1:
        return (w_int / L if differential else (w_int + 2 ** (bits - 1)) / (2**bits - 1))[None]
    b = config.slice_bits
    if differential:
        sign = jnp.sign(jax.lax.stop_gradient(w_int))
        mag = jnp.abs(w_int)
        return jnp.stack([sign * d / (2**b - 1) for d in _digits_ste(mag, b, S)])
    return jnp.stack([d / (2**b - 1) for d in _digits_ste(w_int + 2 ** (bits - 1), b, S)])


def slice_recombination(config: CrossbarConfig) -> tuple[float, ...]:
    """Digital weights `(2^b-1)·2^(i·b)` of the S slices (1 when unsliced)."""
    S = config.mapping.slices
    if S == 1:
        return (1.0,)
    b = config.slice_bits
    return tuple((2**b - 1) * 2 ** (i * b) for i in range(S))


def output_scale(config: CrossbarConfig) -> float:
    """`1/(g_range·c)`: array output units → normalized product (PHYSICS §1, 'back to output')."""
    bits, S = config.weights.bits, config.mapping.slices
    g_range = 1.0 - config.device.g_min
    if S > 1:
        c = float(weight_levels(bits))
    elif config.mapping.scheme == "differential":
        c = 1.0
    elif bits == 0:
        c = 0.5
    else:
        c = weight_levels(bits) / (2**bits - 1)
    return 1.0 / (g_range * c)


def quantize_cells(g: jax.Array, config: CrossbarConfig) -> jax.Array:
    """Optional conductance quantization to 2^cell_bits levels on [g_min, 1]."""
    c = config.device.cell_bits
    if c is None:
        return g
    g_min = config.device.g_min
    g_range = 1.0 - g_min
    n = 2**c - 1
    return g_min + round_ste((g - g_min) / g_range * n) * g_range / n


def conductances(targets: jax.Array, config: CrossbarConfig) -> jax.Array:
    """Cell conductances from slice targets (PHYSICS §1.3).

    Args:
      targets: (S, K, N) from `slice_weights`.
      config: scheme, on/off ratio, cell bits.

    Returns:
      (S, P, K, N) with P = 2 (differential: g+, g-) or 1 (offset); values in [g_min, 1].
    """
    g_min = config.device.g_min
    g_range = 1.0 - g_min
    if config.mapping.scheme == "differential":
        # jnp.maximum splits the derivative at exactly 0 (1/2 per cell), so a weight in the
        # zero quantization bin still receives the straight-through gradient.
        g = g_min + g_range * jnp.stack([jnp.maximum(targets, 0.0), jnp.maximum(-targets, 0.0)],
                                        axis=1)
    else:
        g = (g_min + g_range * targets)[:, None]
    return quantize_cells(g, config)


def zero_weight_conductances(config: CrossbarConfig):
    """Offset mapping: the (cell-quantized) conductance of a zero weight, per slice (S,)."""
    g_min = config.device.g_min
    g_range = 1.0 - g_min
    bits, S = config.weights.bits, config.mapping.slices
    if bits == 0:
        targets = [0.5]
    elif S == 1:
        targets = [2 ** (bits - 1) / (2**bits - 1)]
    else:
        b = config.slice_bits
        zero = 2 ** (bits - 1)
        targets = [((zero >> (i * b)) % 2**b) / (2**b - 1) for i in range(S)]
    g = g_min + g_range * np.asarray(targets)
    c = config.device.cell_bits
    if c is not None:
        n = 2**c - 1
        g = g_min + jnp.round((g - g_min) / g_range * n) * g_range / n
    return g
