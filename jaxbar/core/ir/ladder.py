"""Gated-source ladders: every column eliminated exactly, per input vector (XLA or CPU kernel).

Gated-source columns do not touch each other: each is a ladder (its supply and bit lines, the
cells as rungs), eliminated exactly per input vector, from the integrator up to the sources
(docs/ir_solver.md, "The gated-source ladder"): by a `lax.scan` over the rows in XLA, or on CPUs
by the numba kernel of `jaxbar.core.ir.ladder_kernel`, which skips rows whose bit is 0. The
forward solve needs no sweeps; its gradients use the sweeps (`jaxbar.core.ir.gradients`).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbar.core.ir import cpu_kernel as ir_cpu
from jaxbar.core.ir.convergence import PATH_LADDER, PATH_LADDER_KERNEL


def _ladder_segment(st, pa, pb):
    """Adds the supply segments `pa` and the bit-line segment `pb` above a ladder's top.

    `st` = (Y, A, Z, h, z): the part of the ladder below, seen from its top nodes, as
    `J = Y s + A C + h` (currents into its supply lines for supply voltages s and the current
    C entering its bit line) and `w = -A.T s + Z C + z` (its top bit-line voltage). Y is a
    tuple (y00,) or (y00, y01, y11); A and h are tuples of P entries.
    """
    Y, A, Z, h, z = st
    if len(A) == 1:
        m = 1.0 / (1.0 + pa * Y[0])
        A1, h1 = (m * A[0],), (m * h[0],)
        Y1 = (m * Y[0],)
    else:
        y00, y01, y11 = Y
        dety = y00 * y11 - y01 * y01
        inv = 1.0 / (1.0 + pa * (y00 + y11) + pa * pa * dety)
        m00, m11, m01 = (1.0 + pa * y11) * inv, (1.0 + pa * y00) * inv, -pa * y01 * inv
        A1 = (m00 * A[0] + m01 * A[1], m01 * A[0] + m11 * A[1])
        h1 = (m00 * h[0] + m01 * h[1], m01 * h[0] + m11 * h[1])
        Y1 = ((y00 + pa * dety) * inv, y01 * inv, (y11 + pa * dety) * inv)
    Z = Z + pb + pa * sum(a * b for a, b in zip(A, A1, strict=True))
    z = z + pa * sum(a * b for a, b in zip(A, h1, strict=True))
    return Y1, A1, Z, h1, z


def _ladder_cells(st, G, e):
    """Adds one row's cells (conductances G per polarity, drives e) at the ladder's top."""
    Y, A, Z, h, z = st
    gs = sum(G)
    ge = sum(gp * ep for gp, ep in zip(G, e, strict=True))
    s = 1.0 / (1.0 + Z * gs)
    z = s * (z + Z * ge)
    c = ge - gs * z
    h = tuple(hp + gp * (ep - z) + ap * c for hp, gp, ep, ap in zip(h, G, e, A, strict=True))
    if len(A) == 1:
        q = 1.0 + A[0]
        Y = (Y[0] + s * G[0] * q * q,)
    else:
        (g0, g1), (a0, a1) = G, A
        zg = Z * g0 * g1
        q0, q1 = 1.0 + a0, 1.0 + a1
        Y = (Y[0] + s * (g0 * q0 * q0 + g1 * a0 * a0 + zg),
             Y[1] + s * (g0 * a1 * q0 + g1 * a0 * q1 - zg),
             Y[2] + s * (g1 * q1 * q1 + g0 * a1 * a1 + zg))
    A = tuple(s * (ap - Z * gp) for ap, gp in zip(A, G, strict=True))
    return Y, A, s * Z, h, z


def _ladder_xla(g_stack, x, res):
    """Integrator currents (B, N) of a gated-source array by exact elimination (XLA).

    Each column is a ladder (its supply lines and its bit line, the cells as rungs), solved from
    the integrator up to the sources; a row whose bit is 0 has G = 0 and only adds its
    segments. One `lax.scan` step per row, vectorized over vectors and columns. `g_stack`
    is (P, K, N), or (B, P, K, N) with one set of conductances per vector.
    """
    P, K, N = g_stack.shape[-3:]
    B = x.shape[0]
    dtype = g_stack.dtype
    r_a, r_a_end, r_b, r_b_end = (jnp.asarray(r, dtype) for r in res)
    signs = (1.0, -1.0)[:P]
    zero = jnp.zeros((B, N), dtype)
    st0 = ((zero,) * (1 if P == 1 else 3), (zero,) * P, zero, (zero,) * P, zero)

    def row(st, inp):
        k, bk, gk = inp  # bk (B,), gk (P, N) or (B, P, N)
        st = _ladder_segment(st, jnp.where(k == K - 1, 0.0, r_a),
                             jnp.where(k == K - 1, r_b_end, r_b))
        on = jnp.abs(bk)[:, None]
        G = tuple(on * gk[..., p, :] for p in range(P))
        e = tuple(sp * bk[:, None] for sp in signs)
        return _ladder_cells(st, G, e), None

    st, _ = lax.scan(row, st0, (jnp.arange(K), x.T, jnp.moveaxis(g_stack, -2, 0)), reverse=True)
    Y, A, Z, h, z = _ladder_segment(st, r_a_end, jnp.zeros((), dtype))
    return sum(h)


@functools.cache
def _kernels():
    from jaxbar.core.ir import ladder_kernel

    return ladder_kernel


def _host_ladder(g, x, res):
    """Numpy in, numpy out: the integrator currents (B, N) of a gated-source array."""
    kernels = _kernels()
    g = ir_cpu.read_only(g, g.dtype)
    g = g[None] if g.ndim == 3 else g
    x = ir_cpu.read_only(x, g.dtype)
    res = ir_cpu.read_only(res, g.dtype)
    _, P, _, N = g.shape
    B = x.shape[0]
    out = np.empty((B, N), g.dtype)
    fn = kernels.ladder_p1 if P == 1 else kernels.ladder_p2
    n_threads = max(1, min(ir_cpu.threads(), B // 64))

    def part(lo, hi):
        fn(g, x, res, out, lo, hi, np.zeros((5 if P == 1 else 9, N), g.dtype))

    if n_threads == 1:
        part(0, B)
        return out
    bounds = np.linspace(0, B, n_threads + 1).astype(int)
    with ThreadPoolExecutor(n_threads) as pool:
        for f in [pool.submit(part, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:],
                                                                   strict=True)]:
            f.result()
    return out


def _kernel_currents(g_stack, x, res):
    """Integrator currents of a gated-source array by the CPU ladder kernel (inside jit).

    Every column is eliminated exactly, once per input vector (`ladder_kernel`); rows whose bit
    is 0 are skipped. float32 and float64.

    Args:
      g_stack: (P, K, N) conductances (P = 2: interleaved negative cells, driven by -b), or
        (B, P, K, N): one set per input vector.
      x: (B, K) input bits in {-1, 0, 1}.
      res: (r_a, r_a_end, r_b, r_b_end) supply segment, first supply segment (with the source),
        bit-line segment, last bit-line segment (with unused rows and the integrator).

    Returns:
      (B, N) integrator currents.
    """
    dtype = g_stack.dtype
    shape = jax.ShapeDtypeStruct((x.shape[0], g_stack.shape[-1]), dtype)
    r = jnp.stack([jnp.asarray(v, dtype) for v in res])
    return jax.pure_callback(_host_ladder, shape, g_stack, x.astype(dtype), r,
                             vmap_method="sequential")


def ladder_currents(cpu_kernel, g_stack, x, res):
    """Gated-source currents by exact elimination: (I (B, N), path).

    The CPU kernel (rows whose bit is 0 skipped) where numba is installed and the computation
    runs on a CPU, chosen per platform when lowering; the XLA scan elsewhere.
    """
    def xla(g_stack, x, *res):
        return _ladder_xla(g_stack, x, res), jnp.int32(PATH_LADDER)

    if not (cpu_kernel and ir_cpu.available()):
        return xla(g_stack, x, *res)

    def kernel(g_stack, x, *res):
        return _kernel_currents(g_stack, x, res), jnp.int32(PATH_LADDER_KERNEL)

    return lax.platform_dependent(g_stack, x, *res, cpu=kernel, default=xla)
