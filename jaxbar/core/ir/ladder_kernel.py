"""Numba kernel of the gated-source ladder solve: one input vector's columns per SIMD lane.

A gated-source column (its supply lines and its bit line) is a ladder whose rungs are the
cells: the columns are independent circuits. `ladder_currents` eliminates each one exactly,
from the integrator up to the sources, in the hybrid form described in docs/ir_solver.md
("The gated-source ladder"). All columns of one input vector share its bit pattern, so the
inner loops run over the columns and a row whose bit is 0 costs nothing but the addition of
its segment resistances to the pending ones.
"""

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _schedule(x, i, res, rows, seg_a, seg_b):
    """The active rows of vector i from the integrator up, with the segments merged below each.

    Fills `rows[:m]` (descending), `seg_a[:m]` (the supply resistance between the row and
    the next active row below it) and `seg_b[:m]` (the bit-line resistance below the row, to
    the next active row or the integrator); returns m and the supply resistance above the
    topmost active row, to the source.
    """
    K = x.shape[1]
    r_a, r_a_end, r_b, r_b_end = res[0], res[1], res[2], res[3]
    pa = r_a * 0
    pb = r_b_end
    m = 0
    for k in range(K - 1, -1, -1):
        if k < K - 1:
            pa += r_a
            pb += r_b
        if x[i, k] != 0:
            rows[m] = k
            seg_a[m] = pa
            seg_b[m] = pb
            m += 1
            pa = r_a * 0
            pb = r_a * 0
    return m, pa + r_a_end


@numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def ladder_p1(g, x, res, out, lo, hi, st):
    """Integrator currents of single-polarity gated-source columns for vectors lo..hi-1.

    Args:
      g: (Bg, 1, K, N) conductances: Bg = 1 (every vector) or B (one set per vector, e.g.
        with read noise).
      x: (B, K) bits in {-1, 0, 1} (a cell conducts `|b| g` in series with drive `b`).
      res: (4,) supply segment, first supply segment (with the source's terminal resistance),
        bit-line segment, last bit-line segment (with unused rows and the integrator).
      out: (B, N) integrator currents (written).
      lo, hi: the vectors to solve.
      st: (5, N) work array: Y, A, Z, h, z of every column.
    """
    K, N = g.shape[2], g.shape[3]
    per_vector = g.shape[0] > 1
    one = res[0] * 0 + 1
    rows = np.empty(K, np.int64)
    seg = np.empty((2, K), res.dtype)
    for i in range(lo, hi):
        st[:, :] = 0
        gi = g[i] if per_vector else g[0]
        m, pa = _schedule(x, i, res, rows, seg[0], seg[1])
        for j in range(m):
            k = rows[j]
            e = x[i, k]
            ae = abs(e)  # the cell conducts |b| g (bits are +-1; the gradient's probes are not)
            pk, pb = seg[0, j], seg[1, j]
            for n in range(N):
                Y, A, Z, h, z = st[0, n], st[1, n], st[2, n], st[3, n], st[4, n]
                # Segments between this row's nodes and the next active row's.
                f = one / (one + pk * Y)
                Y = f * Y
                A1 = f * A
                h = f * h
                Z = Z + pb + pk * A * A1
                z = z + pk * A * h
                # The cell.
                G = ae * gi[0, k, n]
                s = one / (one + Z * G)
                z = s * (z + Z * G * e)
                q = one + A1
                st[0, n] = Y + s * G * q * q
                st[1, n] = s * (A1 - Z * G)
                st[2, n] = s * Z
                st[3, n] = h + G * q * (e - z)
                st[4, n] = z
        for n in range(N):
            out[i, n] = st[3, n] / (one + pa * st[0, n])


@numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def ladder_p2(g, x, res, out, lo, hi, st):
    """As `ladder_p1` for interleaved pairs: two supply lines (driven by +b and -b).

    `g` is (Bg, 2, K, N); `st` (9, N): Y00, Y01, Y11, A0, A1, Z, h0, h1, z.
    """
    K, N = g.shape[2], g.shape[3]
    per_vector = g.shape[0] > 1
    one = res[0] * 0 + 1
    rows = np.empty(K, np.int64)
    seg = np.empty((2, K), res.dtype)
    for i in range(lo, hi):
        st[:, :] = 0
        gi = g[i] if per_vector else g[0]
        m, pa = _schedule(x, i, res, rows, seg[0], seg[1])
        for j in range(m):
            k = rows[j]
            e = x[i, k]
            ae = abs(e)  # the cell conducts |b| g (bits are +-1; the gradient's probes are not)
            pk, pb = seg[0, j], seg[1, j]
            for n in range(N):
                y00, y01, y11 = st[0, n], st[1, n], st[2, n]
                a0, a1, Z, h0, h1, z = st[3, n], st[4, n], st[5, n], st[6, n], st[7, n], st[8, n]
                # Segments: M = (I + pk Y)^-1, Y <- M Y, A <- M A, h <- M h.
                dety = y00 * y11 - y01 * y01
                inv = one / (one + pk * (y00 + y11) + pk * pk * dety)
                m00 = (one + pk * y11) * inv
                m11 = (one + pk * y00) * inv
                m01 = -pk * y01 * inv
                b0 = m00 * a0 + m01 * a1
                b1 = m01 * a0 + m11 * a1
                k0 = m00 * h0 + m01 * h1
                k1 = m01 * h0 + m11 * h1
                Z = Z + pb + pk * (a0 * b0 + a1 * b1)
                z = z + pk * (a0 * k0 + a1 * k1)
                y00, y01, y11 = (y00 + pk * dety) * inv, y01 * inv, (y11 + pk * dety) * inv
                # The pair of cells: + driven by e, - by -e, on one bit-line node.
                g0 = ae * gi[0, k, n]
                g1 = ae * gi[1, k, n]
                gs = g0 + g1
                ge = e * (g0 - g1)
                s = one / (one + Z * gs)
                z = s * (z + Z * ge)
                zg = Z * g0 * g1
                q0 = one + b0
                q1 = one + b1
                st[0, n] = y00 + s * (g0 * q0 * q0 + g1 * b0 * b0 + zg)
                st[1, n] = y01 + s * (g0 * b1 * q0 + g1 * b0 * q1 - zg)
                st[2, n] = y11 + s * (g1 * q1 * q1 + g0 * b1 * b1 + zg)
                c = ge - gs * z
                st[3, n] = s * (b0 - Z * g0)
                st[4, n] = s * (b1 - Z * g1)
                st[5, n] = s * Z
                st[6, n] = k0 + g0 * (e - z) + b0 * c
                st[7, n] = k1 + g1 * (-e - z) + b1 * c
                st[8, n] = z
        for n in range(N):
            y00, y01, y11 = st[0, n], st[1, n], st[2, n]
            h0, h1 = st[6, n], st[7, n]
            dety = y00 * y11 - y01 * y01
            inv = one / (one + pa * (y00 + y11) + pa * pa * dety)
            # Sum of M h: both sources' currents.
            out[i, n] = ((one + pa * y11 - pa * y01) * h0 + (one + pa * y00 - pa * y01) * h1) * inv
