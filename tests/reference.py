"""Slow float64 NumPy reference of the analog matrix multiply of PHYSICS.md §0-§5.

This is the test oracle for the JAX implementation. It is written for clarity, not speed: every
array partition, weight slice, polarity and input slice is an explicit Python loop, and every
conversion follows the formula in the specification literally.

Only the ideal device (noise model "none") and no parasitics (topology "none") are supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "WeightMapping",
    "adc",
    "adc_levels",
    "adc_ranges",
    "conductance_range",
    "conductances",
    "dac",
    "input_digits",
    "input_range",
    "input_slice_factors",
    "partition_sizes",
    "quantize_cells",
    "quantize_uniform",
    "quantize_weights",
    "ref_matmul",
    "weight_max",
    "weight_slice_bits",
    "weight_slices",
]


# --------------------------------------------------------------------------------------------
# Generic building blocks
# --------------------------------------------------------------------------------------------


def partition_sizes(n: int, max_size: int | None) -> list[int]:
    """Split ``n`` rows (or columns) into near-equal parts of at most ``max_size`` (§5).

    ``p = ceil(n / max_size)`` parts; with ``r = n mod p`` the first ``p - r`` parts get
    ``n // p`` and the last ``r`` get ``n // p + 1``. ``max_size=None`` gives one part.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"cannot partition {n} rows/columns")
    if max_size is None:
        return [n]
    max_size = int(max_size)
    if max_size < 1:
        raise ValueError(f"array size must be positive, got {max_size}")
    p = math.ceil(n / max_size)
    base, r = divmod(n, p)
    return [base] * (p - r) + [base + 1] * r


def _bounds(sizes: list[int]) -> list[tuple[int, int]]:
    """Turn part sizes into ``(start, stop)`` index pairs."""
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def quantize_uniform(y, lo: float, hi: float, levels: int) -> np.ndarray:
    """Uniform quantizer of §4: ``lo + round((clip(y, lo, hi) - lo) / Δ) · Δ``.

    ``Δ = (hi - lo) / (levels - 1)``; the grid index is rounded half to even (``np.round``).
    """
    levels = int(levels)
    if levels < 2:
        raise ValueError(f"a quantizer needs at least 2 levels, got {levels}")
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        raise ValueError(f"empty quantizer range [{lo}, {hi}]")
    y = np.asarray(y, dtype=np.float64)
    delta = (hi - lo) / (levels - 1)
    index = np.round((np.clip(y, lo, hi) - lo) / delta)
    return lo + index * delta


def adc_levels(lo: float, hi: float, bits: int) -> int:
    """Number of ADC levels: ``2^B - 1`` for a symmetric range ``[-h, h]``, else ``2^B``."""
    bits = int(bits)
    return 2**bits - 1 if float(lo) == -float(hi) else 2**bits


def adc(y, rng: tuple[float, float] | None, bits: int | None) -> np.ndarray:
    """Digitize ``y`` with a ``bits``-bit ADC on ``rng``; ``bits`` 0 or None is ideal."""
    y = np.asarray(y, dtype=np.float64)
    if not bits:
        return y.copy()
    lo, hi = rng
    return quantize_uniform(y, lo, hi, adc_levels(lo, hi, bits))


# --------------------------------------------------------------------------------------------
# Inputs (DAC, bit-serial digits)
# --------------------------------------------------------------------------------------------


def input_range(cfg: dict) -> tuple[float, bool]:
    """Return ``(x_max, signed)`` from ``cfg["inputs"]["range"]``.

    ``[-m, m]`` is signed, ``[0, m]`` unsigned; any other range is rejected.
    """
    lo, hi = (float(v) for v in cfg["inputs"]["range"])
    if not hi > 0:
        raise ValueError(f"input range upper end must be positive, got {hi}")
    if lo == 0.0:
        return hi, False
    if lo == -hi:
        return hi, True
    raise ValueError(f"input range must be [0, m] or [-m, m], got [{lo}, {hi}]")


def dac(x_n, bits: int, signed: bool) -> np.ndarray:
    """DAC on normalized inputs (§3). ``bits`` 0 is ideal: no clipping, no quantization.

    Signed: the §4 quantizer on ``[-1, 1]`` with ``2^B - 1`` levels; unsigned: ``2^B`` levels on
    ``[0, 1]``.
    """
    x_n = np.asarray(x_n, dtype=np.float64)
    bits = int(bits or 0)
    if bits == 0:
        return x_n.copy()
    if signed:
        if bits < 2:
            raise ValueError("signed inputs need at least 2 bits")
        return quantize_uniform(x_n, -1.0, 1.0, 2**bits - 1)
    return quantize_uniform(x_n, 0.0, 1.0, 2**bits)


def _magnitude_bits(bits: int, signed: bool) -> int:
    return bits - 1 if signed else bits


def input_digits(x_q, bits: int, signed: bool, slice_bits: int) -> list[np.ndarray]:
    """Bit-serial input slices of §3, least significant first.

    ``n = round(|x_q| · (2^m - 1))`` (m = bits, or bits - 1 signed) is written in base ``2^s``;
    slice k is the MVM input ``sign(x_q) · digit_k / (2^s - 1)``, k = 0 .. ceil(m/s) - 1.
    """
    bits, s = int(bits), int(slice_bits)
    if bits < 1 or (signed and bits < 2):
        raise ValueError("bit-serial inputs need a quantizing DAC")
    if s < 1:
        raise ValueError(f"input slice bits must be positive, got {s}")
    m = _magnitude_bits(bits, signed)
    x_q = np.asarray(x_q, dtype=np.float64)
    n = np.round(np.abs(x_q) * (2**m - 1)).astype(np.int64)
    sign = np.sign(x_q)
    digits = []
    for _ in range(math.ceil(m / s)):
        digits.append(sign * (n % 2**s) / (2**s - 1))
        n = n // 2**s
    if np.any(n != 0):
        raise AssertionError("input magnitude does not fit its digits")
    return digits


def input_slice_factors(bits: int, signed: bool, slice_bits: int) -> list[float]:
    """Shift-and-add weights of §3: ``(2^s - 1) / (2^m - 1) · 2^(k·s)`` for each input slice k."""
    m = _magnitude_bits(int(bits), signed)
    s = int(slice_bits)
    return [(2**s - 1) / (2**m - 1) * 2.0 ** (k * s) for k in range(math.ceil(m / s))]


# --------------------------------------------------------------------------------------------
# Weights (scale, quantize, slice, map to conductances)
# --------------------------------------------------------------------------------------------


def weight_max(W, clip_percentile: float) -> float:
    """Per-layer weight scale of §1: the larger magnitude of the p-th and (100-p)-th percentiles.

    Returns 1 when that scale is 0 (an all-zero layer).
    """
    W = np.asarray(W, dtype=np.float64)
    p = float(clip_percentile)
    w_max = max(abs(np.percentile(W, p)), abs(np.percentile(W, 100.0 - p)))
    return float(w_max) if w_max > 0 else 1.0


def quantize_weights(W, bits: int, w_max: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(w, W_int)``: the clipped normalized weights and their integers (§1).

    ``w = clip(W, -w_max, w_max) / w_max``; ``W_int = round(w · (2^(B-1) - 1))`` or None when
    ``bits`` is 0 (unquantized).
    """
    w = np.clip(np.asarray(W, dtype=np.float64), -w_max, w_max) / w_max
    bits = int(bits)
    if bits == 0:
        return w, None
    if bits < 2:
        raise ValueError("quantized weights need at least 2 bits")
    return w, np.round(w * (2 ** (bits - 1) - 1)).astype(np.int64)


def weight_slice_bits(bits: int, slices: int, scheme: str) -> int:
    """Bits per weight slice: ``B/S`` when S divides B, else ``ceil((B-1)/S)`` differential and
    ``ceil(B/S)`` offset."""
    bits, slices = int(bits), int(slices)
    if bits % slices == 0:
        return bits // slices
    if scheme == "differential":
        return math.ceil((bits - 1) / slices)
    if scheme == "offset":
        return math.ceil(bits / slices)
    raise ValueError(f"unknown mapping scheme {scheme!r}")


def weight_slices(W_int, bits: int, slices: int, scheme: str) -> list[np.ndarray]:
    """Integer digits of each weight slice, least significant slice first (§1).

    Differential: signed digits ``sign(W_int) · d_i`` with ``d_i`` the base-``2^b`` digits of
    ``|W_int|``. Offset: the base-``2^b`` digits of ``W_int + 2^(B-1)`` (all non-negative).
    Either way ``Σ_i 2^(i·b) · digit_i`` recovers ``W_int`` (offset: ``W_int + 2^(B-1)``).
    """
    b = weight_slice_bits(bits, slices, scheme)
    W_int = np.asarray(W_int, dtype=np.int64)
    if scheme == "differential":
        sign, value = np.sign(W_int), np.abs(W_int)
    elif scheme == "offset":
        sign, value = np.ones_like(W_int), W_int + 2 ** (int(bits) - 1)
        if np.any(value < 0):
            raise ValueError("weight integer below the offset range")
    else:
        raise ValueError(f"unknown mapping scheme {scheme!r}")
    digits = []
    for _ in range(int(slices)):
        digits.append(sign * (value % 2**b))
        value = value // 2**b
    if np.any(value != 0):
        raise AssertionError("weight integer does not fit its slices")
    return digits


def conductance_range(cfg: dict) -> tuple[float, float]:
    """``(g_min, g_range)``: ``g_min = 1 / on_off_ratio`` (0 for None), ``g_range = 1 - g_min``."""
    ratio = cfg["device"]["on_off_ratio"]
    g_min = 0.0 if ratio is None else 1.0 / float(ratio)
    g_range = 1.0 - g_min
    if not g_range > 0:
        raise ValueError(f"on/off ratio must exceed 1, got {ratio}")
    return g_min, g_range


def quantize_cells(g, g_min: float, g_range: float, cell_bits: int | None) -> np.ndarray:
    """Cell conductance quantization of §1 to ``2^c`` levels on ``[g_min, 1]`` (None: off)."""
    g = np.asarray(g, dtype=np.float64)
    if cell_bits is None:
        return g.copy()
    steps = 2 ** int(cell_bits) - 1
    return g_min + np.round((g - g_min) / g_range * steps) * g_range / steps


@dataclass
class WeightMapping:
    """A layer's weights as conductances.

    ``arrays[i][j]`` is the (K, N) conductance matrix of weight slice ``i`` (least significant
    first) and polarity ``j`` (differential: ``[g+, g-]``; offset: ``[g]``). ``slice_factor[i]``
    is the digital recombination weight of slice i (``(2^b - 1) · 2^(i·b)`` sliced, 1 unsliced).
    ``g_zero[i]`` is the conductance of a zero weight in slice i (offset only, after cell
    quantization; None for differential). Results are brought back to output units with
    ``w_max · x_max / (g_range · c)``. ``lsb_g`` is the conductance step of one weight LSB
    (None for unquantized weights), used by the granular ADC range.
    """

    arrays: list[list[np.ndarray]]
    slice_factor: list[float]
    g_zero: list[float] | None
    c: float
    w_max: float
    g_min: float
    g_range: float
    lsb_g: float | None


def conductances(W, cfg: dict) -> WeightMapping:
    """Map the (K, N) weights to conductances following §1 (clip, quantize, slice, map)."""
    wcfg, mcfg, dcfg = cfg["weights"], cfg["mapping"], cfg["device"]
    scheme = mcfg["scheme"]
    if scheme not in ("differential", "offset"):
        raise ValueError(f"unknown mapping scheme {scheme!r}")
    S = int(mcfg["slices"])
    B_w = int(wcfg["bits"])
    if S < 1:
        raise ValueError(f"slices must be positive, got {S}")
    if S > 1 and B_w == 0:
        raise ValueError("bit slicing needs quantized weights")
    g_min, g_range = conductance_range(cfg)
    cell_bits = dcfg["cell_bits"]

    w_max = weight_max(W, wcfg["clip_percentile"])
    w, W_int = quantize_weights(W, B_w, w_max)

    # Per slice: normalized cell values v in [-1, 1] (differential) or [0, 1] (offset), the
    # normalized value of a zero weight (offset), and the digital recombination factor.
    values: list[np.ndarray] = []
    zero_values: list[float] = []
    if S == 1:
        slice_factor = [1.0]
        if scheme == "differential":
            c = 1.0
            values.append(w if W_int is None else W_int / (2 ** (B_w - 1) - 1))
            lsb_g = None if W_int is None else g_range / (2 ** (B_w - 1) - 1)
        else:
            if W_int is None:
                c = 0.5
                values.append((w + 1.0) / 2.0)
                zero_values.append(0.5)
                lsb_g = None
            else:
                c = (2 ** (B_w - 1) - 1) / (2**B_w - 1)
                values.append((W_int + 2 ** (B_w - 1)) / (2**B_w - 1))
                zero_values.append(2 ** (B_w - 1) / (2**B_w - 1))
                lsb_g = g_range / (2**B_w - 1)
    else:
        b = weight_slice_bits(B_w, S, scheme)
        c = float(2 ** (B_w - 1) - 1)
        slice_factor = [(2**b - 1) * 2.0 ** (i * b) for i in range(S)]
        lsb_g = g_range / (2**b - 1)
        digits = weight_slices(W_int, B_w, S, scheme)
        if scheme == "offset":
            zero_digits = weight_slices(np.zeros((), dtype=np.int64), B_w, S, scheme)
        for i in range(S):
            values.append(digits[i] / (2**b - 1))
            if scheme == "offset":
                zero_values.append(float(zero_digits[i]) / (2**b - 1))

    clip_mode = dcfg["clip"]

    def program(g):
        g = quantize_cells(g, g_min, g_range, cell_bits)
        # Programming error would be added here; with model "none" the clip is a no-op.
        if clip_mode == "zero":
            return np.maximum(g, 0.0)
        if clip_mode == "range":
            return np.clip(g, g_min, 1.0)
        raise ValueError(f"unknown conductance clip {clip_mode!r}")

    arrays = []
    g_zero = None if scheme == "differential" else []
    for i, v in enumerate(values):
        if scheme == "differential":
            g_plus = g_min + g_range * np.maximum(v, 0.0)
            g_minus = g_min + g_range * np.maximum(-v, 0.0)
            arrays.append([program(g_plus), program(g_minus)])
        else:
            arrays.append([program(g_min + g_range * v)])
            g_zero.append(float(program(g_min + g_range * zero_values[i])))
    return WeightMapping(arrays, slice_factor, g_zero, c, w_max, g_min, g_range, lsb_g)


# --------------------------------------------------------------------------------------------
# ADC ranges
# --------------------------------------------------------------------------------------------


def _is_pair(r) -> bool:
    return (
        isinstance(r, (list, tuple, np.ndarray)) and len(r) == 2 and all(np.ndim(v) == 0 for v in r)
    )


def adc_ranges(cfg: dict, mapping: WeightMapping, max_rows: int) -> list[tuple[float, float]]:
    """ADC range ``(lo, hi)`` per weight slice, in array output units (§4 and the conventions).

    ``max_rows`` is the largest row-partition size of the layer (used by "max" and "granular").
    Returns an empty list for an ideal ADC.
    """
    acfg, mcfg, icfg = cfg["adc"], cfg["mapping"], cfg["inputs"]
    bits = int(acfg["bits"] or 0)
    S = int(mcfg["slices"])
    if bits == 0:
        return []
    rng = acfg["range"]
    if rng is None:
        raise ValueError("a quantizing ADC needs a range")
    if isinstance(rng, str):
        _, signed = input_range(cfg)
        a_lo, a_hi = (-1.0, 1.0) if signed else (0.0, 1.0)
        if mcfg["scheme"] == "differential" and mcfg["subtract"] == "analog":
            c_lo, c_hi = -mapping.g_range, mapping.g_range
        else:
            c_lo, c_hi = mapping.g_min, 1.0
        corners = [a * cc for a in (a_lo, a_hi) for cc in (c_lo, c_hi)]
        lo, hi = max_rows * min(corners), max_rows * max(corners)
        if rng == "max":
            return [(lo, hi)] * S
        if rng != "granular":
            raise ValueError(f"unknown ADC range mode {rng!r}")
        B_in = int(icfg["bits"] or 0)
        if mapping.lsb_g is None or B_in == 0:
            raise ValueError("a granular ADC needs quantized weights and inputs")
        if icfg["bit_serial"] and acfg["per_input_slice"]:
            lsb_x = 1.0 / (2 ** int(icfg["slice_bits"]) - 1)
        elif signed:
            lsb_x = 1.0 / (2 ** (B_in - 1) - 1)
        else:
            lsb_x = 1.0 / (2**B_in - 1)
        delta = mapping.lsb_g * lsb_x
        if lo < 0:
            h = delta * (2 ** (bits - 1) - 1)
            return [(-h, h)] * S
        return [(0.0, delta * (2**bits - 1))] * S
    if _is_pair(rng):
        return [(float(rng[0]), float(rng[1]))] * S
    ranges = [(float(r[0]), float(r[1])) for r in rng]
    if len(ranges) != S or not all(_is_pair(r) for r in rng):
        raise ValueError(f"expected one ADC range pair per weight slice ({S}), got {rng!r}")
    return ranges


# --------------------------------------------------------------------------------------------
# The analog matrix multiply
# --------------------------------------------------------------------------------------------


def _check_unsupported(cfg: dict) -> None:
    dcfg = cfg["device"]
    for key in ("programming_error", "read_noise"):
        if dcfg[key]["model"] != "none":
            raise NotImplementedError(f"{key} model {dcfg[key]['model']!r}")
    if cfg["parasitics"]["topology"] != "none":
        raise NotImplementedError(f"parasitics topology {cfg['parasitics']['topology']!r}")


def _convert(column_current, mvm_inputs, mvm_factors, rows, per_input_slice, rng, adc_bits):
    """Run the MVMs of all input slices on one array and digitize (§3, §4).

    ``column_current(u)`` is the analog quantity the ADC sees for the input ``u`` restricted to
    the array's ``rows``. With ``per_input_slice`` every input slice is digitized and the results
    are shifted and added digitally; otherwise they are added in analog and digitized once.
    """
    if per_input_slice:
        total = 0.0
        for u, f in zip(mvm_inputs, mvm_factors, strict=True):
            total = total + f * adc(column_current(u[:, rows]), rng, adc_bits)
        return total
    analog = 0.0
    for u, f in zip(mvm_inputs, mvm_factors, strict=True):
        analog = analog + f * column_current(u[:, rows])
    return adc(analog, rng, adc_bits)


def ref_matmul(x, W, cfg: dict) -> np.ndarray:
    """Analog ``x @ W`` per PHYSICS.md §0-§5, in float64.

    ``x``: (B, K) (leading axes broadcast), ``W``: (K, N). Returns (B, N) float64.
    """
    _check_unsupported(cfg)
    x = np.asarray(x, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or x.shape[-1] != W.shape[0]:
        raise ValueError(f"shapes {x.shape} and {W.shape} do not multiply")
    lead = x.shape[:-1]
    x = x.reshape(-1, W.shape[0])
    K, N = W.shape
    icfg, acfg, mcfg = cfg["inputs"], cfg["adc"], cfg["mapping"]
    scheme = mcfg["scheme"]

    # Weights -> conductances (§1).
    mapping = conductances(W, cfg)

    # Inputs -> DAC outputs, and the MVMs that carry them (§3).
    x_max, signed = input_range(cfg)
    B_in = int(icfg["bits"] or 0)
    x_q = dac(x / x_max, B_in, signed)
    if icfg["bit_serial"]:
        if B_in == 0:
            raise ValueError("bit-serial inputs need a quantizing DAC")
        mvm_inputs = input_digits(x_q, B_in, signed, icfg["slice_bits"])
        mvm_factors = input_slice_factors(B_in, signed, icfg["slice_bits"])
        per_input_slice = bool(acfg["per_input_slice"])
    else:
        mvm_inputs, mvm_factors, per_input_slice = [x_q], [1.0], False

    # Tiling (§5) and ADC ranges (§4).
    row_parts = _bounds(partition_sizes(K, cfg["array"]["rows"]))
    col_parts = _bounds(partition_sizes(N, cfg["array"]["cols"]))
    max_rows = max(r1 - r0 for r0, r1 in row_parts)
    adc_bits = int(acfg["bits"] or 0)
    ranges = adc_ranges(cfg, mapping, max_rows)

    if scheme == "differential":
        subtract = mcfg["subtract"]
        if subtract not in ("analog", "digital"):
            raise ValueError(f"unknown subtraction {subtract!r}")
    else:
        subtract = mcfg["offset_subtraction"]
        if subtract not in ("digital", "unit_column"):
            raise ValueError(f"unknown offset subtraction {subtract!r}")

    y_arr = np.zeros((x.shape[0], N), dtype=np.float64)
    for r0, r1 in row_parts:
        for c0, c1 in col_parts:
            for i, polarities in enumerate(mapping.arrays):
                rng = ranges[i] if adc_bits else None

                def convert(column_current, rows=slice(r0, r1), rng=rng):
                    return _convert(
                        column_current,
                        mvm_inputs,
                        mvm_factors,
                        rows,
                        per_input_slice,
                        rng,
                        adc_bits,
                    )

                if scheme == "differential":
                    g_plus = polarities[0][r0:r1, c0:c1]
                    g_minus = polarities[1][r0:r1, c0:c1]
                    if subtract == "analog":
                        y = convert(lambda u, gp=g_plus, gm=g_minus: u @ gp - u @ gm)
                    else:
                        y = convert(lambda u, gp=g_plus: u @ gp) - convert(
                            lambda u, gm=g_minus: u @ gm
                        )
                else:
                    g = polarities[0][r0:r1, c0:c1]
                    g_zero = mapping.g_zero[i]
                    if subtract == "unit_column":
                        unit = np.full((r1 - r0, 1), g_zero)
                        g_ext = np.concatenate([g, unit], axis=1)
                        out = convert(lambda u, ge=g_ext: u @ ge)
                        y = out[:, :-1] - out[:, -1:]
                    else:
                        out = convert(lambda u, gg=g: u @ gg)
                        y = out - g_zero * np.sum(x_q[:, r0:r1], axis=1, keepdims=True)
                y_arr[:, c0:c1] += mapping.slice_factor[i] * y

    y = y_arr * mapping.w_max * x_max / (mapping.g_range * mapping.c)
    return y.reshape(*lead, N)
