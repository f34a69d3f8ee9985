"""Generates jaxbar/core/_ir_lanes.py: the lane-unrolled CPU kernels of the transfer solve.

A kernel solves a block of adjoint circuits (one per driven bit line) at once, one circuit per
SIMD lane. Numba vectorizes straight-line code over scalars (LLVM's SLP vectorizer) but not loops
over small work arrays it cannot prove unaliased, so every per-lane statement is written out once
per lane here. Two row lines (or the two polarities of an interleaved row) are solved side by side
so that their recurrences overlap in the pipeline.

Usage: ``python tools/gen_ir_kernel.py`` (rewrites the module; a test checks it is up to date).
"""

from __future__ import annotations

import hashlib
import pathlib

LANES = 16  # one 512-bit vector of float32


class _Code:
    def __init__(self, lanes: int):
        self.lanes = lanes
        self.lines: list[str] = []

    def __call__(self, indent: int, text: str) -> None:
        for line in text.splitlines():
            self.lines.append(" " * (4 * indent) + line if line else "")

    def lanes_(self, indent: int, lhs: str, rhs: str) -> None:
        """One statement per lane (``#``: the lane index), as a single tuple assignment."""
        left = ", ".join(lhs.replace("#", str(b)) for b in range(self.lanes))
        right = ", ".join(rhs.replace("#", str(b)) for b in range(self.lanes))
        self.lines.append(" " * (4 * indent) + f"{left} = ({right})")


def _group(c: _Code, ind: int, rows: int, pol: int, L: int, bufs, last: bool = False) -> None:
    """Pass body for ``rows`` consecutive rows (k0, k0 + step, ...) with ``pol`` polarities.

    ``bufs[r]`` = (write, previous): the bit-line voltage buffers of row r and of the row before;
    ``last``: no group follows in this pass.
    """
    chains = [(r, p) for r in range(rows) for p in range(pol)]
    for r in range(1, rows):
        c(ind, f"k{r} = k{r - 1} + step")
    c(ind, "if t == 1:  # the start: bit lines solved with ideal row lines")
    for r in range(rows):
        c(ind + 1, f"wbuf[{bufs[r][0]}, :] = zero")
        c(ind + 1, "for b in range(n_live):")
        c(ind + 2, f"wbuf[{bufs[r][0]}, (j0 + b) * {L} + b] = w0[k{r}, j0 + b]")
    # Row-line elimination from the open end (n = N - 1), with the bit-line back-substitution of
    # the previous pass fused in (elementwise in n).
    for r, p in chains:
        c.lanes_(ind, f"h{r}{p}_#", "zero")
        c(ind, f"ra{r}{p} = zero")
    c(ind, "for nn in range(N):")
    c(ind + 1, "n = N - 1 - nn")
    c(ind + 1, f"q = U(n * {L})")
    c(ind + 1, "if t >= 2:")
    for r in range(rows):
        wr, prev = bufs[r]
        c(ind + 2, f"o{r} = U(((k{r} + 1) * N + n) * {L})")
        c(ind + 2, f"ca{r} = coef[dr, 0, k{r}, n]")
        c(ind + 2, f"cw{r} = coef[dr, 1, k{r}, n]")
        c.lanes_(ind + 2, f"wbuf[{wr}, q + U(#)]",
                 f"ca{r} * F[o{r} + U(#)] + cw{r} * wbuf[{prev}, q + U(#)]")
    for r, p in chains:
        c(ind + 1, f"gg = g[{p}, k{r}, n]")
        c.lanes_(ind + 1, f"h{r}{p}_#",
                 f"ra{r}{p} * h{r}{p}_# - gg * (wbuf[{bufs[r][0]}, q + U(#)] + drive[q + U(#)])")
    for r, p in chains:
        c.lanes_(ind + 1, f"hbuf[{r}, {p}, q + U(#)]", f"h{r}{p}_#")
        c(ind + 1, f"ra{r}{p} = rho_a[{p}, k{r}, n]")
    for r, p in chains:
        c.lanes_(ind, f"ja[{p}, k{r}, #]", f"ra{r}{p} * h{r}{p}_#")
    # Row-line back-substitution from the driver, with the IR loss of the row (readout) and the
    # elimination of the next bit-line solve fused in.
    for r, p in chains:
        c.lanes_(ind, f"d{r}{p}_#", "zero")
        c.lanes_(ind, f"l{r}{p}_#", "zero")
    # The next group's rows of the elimination field are fetched while this one is computed:
    # always, from a row clamped into the array (a branch in the loop had the compiler rotate
    # a dozen registers on every step).
    fetch = range(0 if last else rows)
    for r in fetch:
        c(ind, f"pf{r} = U(((min(max(k{r} + {2 * rows} * step, 0), K - 1) + 1) * N) * {L})")
    c(ind, "for n in range(N):")
    c(ind + 1, f"q = U(n * {L})")
    for r in fetch:
        c(ind + 1, f"prefetch(F, pf{r} + q)")
    c(ind + 1, "ran = r_a[n]")
    for r in range(rows):
        for p in range(pol):
            c(ind + 1, f"gg = g[{p}, k{r}, n]")
            c(ind + 1, f"ra = rho_a[{p}, k{r}, n]")
            c(ind + 1, "rr = ra * ran")
            c.lanes_(ind + 1, f"d{r}{p}_#", f"ra * d{r}{p}_# + rr * hbuf[{r}, {p}, q + U(#)]")
            c.lanes_(ind + 1, f"l{r}{p}_#",
                     f"l{r}{p}_# + gg * (d{r}{p}_# + wbuf[{bufs[r][0]}, q + U(#)])")
            acc = "" if p == 0 else f"c{r}_# "
            c.lanes_(ind + 1, f"c{r}_#", f"{acc}- gg * (d{r}{p}_# + drive[q + U(#)])")
        prev = f"k{r - 1}" if r else "k0 - step"
        c(ind + 1, f"o = U(((k{r} + 1) * N + n) * {L})")
        c(ind + 1, f"op = U((({prev} + 1) * N + n) * {L})")
        c(ind + 1, f"cf = coef[dr, 2, k{r}, n]")
        c(ind + 1, f"cc = coef[dr, 3, k{r}, n]")
        c.lanes_(ind + 1, "F[o + U(#)]", f"cf * F[op + U(#)] + cc * c{r}_#")
    for r, p in chains:
        c.lanes_(ind, f"loss[{p}, k{r}, #]", f"l{r}{p}_#")


def _block(pol: int, L: int) -> list[str]:
    c = _Code(L)
    c(0, f'''

@numba.njit(nogil=True, fastmath={{"contract"}}, cache=True)
def block_p{pol}(g, rho_a, r_a, coef, w0, xs, j0, tol, cx2, cxi, max_passes, F, wbuf, hbuf, drive,
             ja, loss, m_old, m_new, state, out, err):
    """Transfer rows of the driven bit lines j0 .. j0 + {L} - 1, float32, P = {pol}.

    See ``ir_cpu`` for the passes and ``ir_cpu._worker`` for the arrays. Returns (passes,
    status): status 0 converged, 1 not converged within max_passes, 2 too slow for Gauss-Seidel.
    """
    P, K, N = g.shape
    U = numba.uint64
    zero = numba.float32(0.0)  # typed: a Python number would promote the lanes to float64
    n_live = min({L}, N - j0)
    F[: N * {L}] = zero  # padding rows above and below the array
    F[(K + 1) * N * {L}:] = zero
    drive[:] = zero  # 1 where lane b's cell is driven (column j0 + b)
    for b in range(n_live):
        drive[(j0 + b) * {L} + b] = numba.float32(1.0)
    passes = 0
    status = 1
    _start_rows(g, w0, j0, n_live, m_old)
    for t in range(1, max_passes + 1):
        desc = t % 2 == 1
        dr = 0 if desc else 1
        step = -1 if desc else 1
        wbuf[1, :] = zero
        for gi in range(K):
            k0 = K - 1 - gi if desc else gi''')
    # One row (two polarities) at a time; the two voltage buffers alternate.
    c(3, "wa = gi % 2")
    c(3, "wb = 1 - wa")
    _group(c, 3, 1, pol, L, [("wa", "wb")])
    c(0, '''        passes = t
        _readout(g, loss, ja, j0, n_live, m_new)
        done = _control(m_old, m_new, n_live, t, tol, cx2, cxi, xs, state, err)
        m_old[:, :] = m_new
        if done != 0:
            status = 0 if done == 1 else 2
            break
    for b in range(n_live):
        out[b, :] = m_old[b, :]
    return passes, status''')
    return c.lines


def _compact_block(L: int) -> list[str]:
    """The single-array kernel over conducting cells only (see ``_ir_common.prepare_compact``).

    Rows are solved one at a time: their cells differ, and a row's recurrences (one multiply-add
    per cell) are shorter than the loads and stores around them. A lane's drive (its bit line's
    cells driven by -1) only enters the cells in the block's own columns: each row's cells are
    swept in three runs, the middle one adding a row of an identity (a branch per cell split the
    lanes' vectors into pieces; reading a zero row elsewhere cost a third of a pass).
    """
    c = _Code(L)
    c(0, f'''

@numba.njit(nogil=True, fastmath={{"contract"}}, cache=True)
def block_c1(g, rp, col, gq, rho, rrp, jr, cab, ccd, w0, eye, xs, j0, tol, cx2, cxi, qhat,
             max_passes, F, wbuf, fbuf, hbuf, ja, m_old, m_new, state, out, err):
    """Transfer rows of the driven bit lines j0 .. j0 + {L} - 1 of a single array, float32.

    See ``ir_cpu`` for the passes and ``ir_cpu._worker`` for the arrays; ``eye``: the {L} x {L}
    identity (row b: lane b's drive). Returns (passes, status): status 0 converged, 1 not
    converged within max_passes, 2 too slow for Gauss-Seidel.
    """
    K = rp.shape[0] - 1
    N = w0.shape[1]
    U = numba.uint64
    zero = numba.float32(0.0)  # typed: a Python number would promote the lanes to float64
    n_live = min({L}, N - j0)
    passes = 0
    status = 1
    full_passes = 0
    done = 0
    _start_rows(g, w0, j0, n_live, m_old)
    t = 0
    while t < max_passes:
        t += 1
        # A pass that is predicted to converge skips the bit-line elimination (which only the
        # next pass would read); when it does not converge it is run again in full.
        last = _worth_last(state, n_live, t - 1, qhat, tol)
        for attempt in range(2):
            full = attempt == 1 or not last
            desc = full_passes % 2 == 0
            dr = 0 if desc else 1
            start = full_passes == 0
            wbuf[:] = zero  # per column: the last cell's bit-line voltage and elimination
            fbuf[:] = zero
            for kk in range(K):
                k = K - 1 - kk if desc else kk
                i0 = rp[k]
                i1 = rp[k + 1]''')
    ind = 4
    c.lanes_(ind, "e_#", "zero")
    # Cells [a, b) lie in the block's own columns, where the lanes' drives enter.
    c(ind, "a = _first_at_least(col, i0, i1, j0)")
    c(ind, "b = _first_at_least(col, a, i1, j0 + n_live)")
    # Row-line elimination from the open end, i = i1 - 1 - ii down to i0.
    segments = (("0", "i1 - b", False), ("i1 - b", "i1 - a", True), ("i1 - a", "i1 - i0", False))
    c(ind, "if start:  # the start: bit lines solved with ideal row lines (0 off the drives)")
    for lo, hi, drive in segments:
        c(ind + 1, f"for ii in range({lo}, {hi}):")
        if drive:
            c(ind + 2, "i = U(i1 - 1 - ii)")
            c(ind + 2, "n = col[i]")
            c(ind + 2, f"x = U((n - j0) * {L})")
            c(ind + 2, "gv = gq[i] * (w0[k, n] + numba.float32(1.0))")
            c.lanes_(ind + 2, "e_#", "e_# - gv * eye[x + U(#)]")
        c.lanes_(ind + 2, f"hbuf[U(ii * {L}) + U(#)]", "e_#")
    c(ind, "else:  # with the bit-line back-substitution of the previous pass")
    # The rows two steps ahead are fetched while this one is read (the passes read each cell's
    # elimination once, from memory).
    c(ind + 1, "pf = rp[min(max(k + (-2 if desc else 2), 0), K - 1) + 1] - i1")
    c(ind + 1, f"last_line = F.shape[0] // {L} - 1")
    for lo, hi, drive in segments:
        c(ind + 1, f"for ii in range({lo}, {hi}):")
        c(ind + 2, "i = U(i1 - 1 - ii)")
        c(ind + 2, f"prefetch(F, U(min(max(pf + i1 - 1 - ii, 0), last_line) * {L}))")
        c(ind + 2, "n = col[i]")
        c(ind + 2, f"q = U(n * {L})")
        c(ind + 2, f"o = i * U({L})")
        c(ind + 2, "ca = cab[dr, 0, i]")
        c(ind + 2, "cb = cab[dr, 1, i]")
        c.lanes_(ind + 2, "wbuf[q + U(#)]",
                 "(ca * F[o + U(#)] + wbuf[q + U(#)]) - cb * wbuf[q + U(#)]")
        c(ind + 2, "gw = gq[i]")
        if drive:
            c(ind + 2, f"x = U((n - j0) * {L})")
            c.lanes_(ind + 2, "e_#", "e_# - gw * (wbuf[q + U(#)] + eye[x + U(#)])")
        else:
            c.lanes_(ind + 2, "e_#", "e_# - gw * wbuf[q + U(#)]")
        c.lanes_(ind + 2, f"hbuf[U(ii * {L}) + U(#)]", "e_#")
    c(ind, "jk = jr[k]")
    c.lanes_(ind, "ja[k, #]", "jk * e_#")
    # Row-line back-substitution from the driver and the next bit-line elimination.
    c(ind, "if full:")
    c.lanes_(ind + 1, "d_#", "zero")
    for lo, hi, drive in (("0", "a - i0", False), ("a - i0", "b - i0", True),
                          ("b - i0", "i1 - i0", False)):
        c(ind + 1, f"for ii in range({lo}, {hi}):")
        c(ind + 2, "i = U(i0 + ii)")
        c(ind + 2, "n = col[i]")
        c(ind + 2, f"q = U(n * {L})")
        c(ind + 2, f"o = i * U({L})")
        c(ind + 2, f"hq = U((i1 - i0 - 1 - ii) * {L})")
        c(ind + 2, "ra = rho[i]")
        c(ind + 2, "rs = rrp[i]")
        c.lanes_(ind + 2, "d_#", "ra * d_# + rs * hbuf[hq + U(#)]")
        c(ind + 2, "cg = ccd[dr, 0, i]")
        c(ind + 2, "cd = ccd[dr, 1, i]")
        if drive:
            c(ind + 2, f"x = U((n - j0) * {L})")
            c.lanes_(ind + 2, "f_#",
                     "(fbuf[q + U(#)] + cd * (d_# + eye[x + U(#)])) - cg * fbuf[q + U(#)]")
        else:
            c.lanes_(ind + 2, "f_#", "(fbuf[q + U(#)] + cd * d_#) - cg * fbuf[q + U(#)]")
        c.lanes_(ind + 2, "F[o + U(#)]", "f_#")
        c.lanes_(ind + 2, "fbuf[q + U(#)]", "f_#")
    c(0, '''            if full:
                full_passes += 1
            if attempt == 1:
                break  # the pass run again in full: its readout was taken
            passes = t
            _compact_readout(ja, n_live, m_new)
            done = _control(m_old, m_new, n_live, t, tol, cx2, cxi, xs, state, err)
            m_old[:, :] = m_new
            if done != 0 or full:
                break
        if done != 0:
            status = 0 if done == 1 else 2
            break
    for b in range(n_live):
        out[b, :] = m_old[b, :]
    return passes, status''')
    return c.lines


def generate() -> str:
    lines = [
        '"""Lane-unrolled CPU kernels of the IR-drop transfer solve (float32, 16 lanes).',
        "",
        "Generated by tools/gen_ir_kernel.py; do not edit.",
        '"""',
        "",
        "# ruff: noqa",
        f"# _ir_common.py sha256: {_helpers_hash()}",
        "import numba",
        "",
        "from jaxbar.core._ir_common import (_compact_readout, _control, _first_at_least,",
        "                                    _readout, _start_rows, _worth_last, prefetch)",
        "",
        f"LANES = {LANES}",
    ]
    lines.extend(_block(2, LANES))
    lines.extend(_compact_block(LANES))
    return "\n".join(lines) + "\n"


def _helpers_hash() -> str:
    path = target().parent / "_ir_common.py"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def target() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1] / "jaxbar" / "core" / "_ir_lanes.py"


if __name__ == "__main__":
    target().write_text(generate())
    print(f"wrote {target()}")
