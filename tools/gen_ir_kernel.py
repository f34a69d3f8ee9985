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
        n_groups = K // {2 if pol == 1 else 1}
        for gi in range(n_groups):
            k0 = K - 1 - {2 if pol == 1 else 1} * gi if desc else {2 if pol == 1 else 1} * gi''')
    if pol == 1:  # two rows at a time
        _group(c, 3, 2, pol, L, [("0", "1"), ("1", "0")])
        c(2, "if K % 2 == 1:")
        c(3, "k0 = 0 if desc else K - 1")
        _group(c, 3, 1, pol, L, [("0", "1")], last=True)
    else:  # one row (two polarities) at a time; the two voltage buffers alternate
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
        "from jaxbar.core._ir_common import _control, _readout, _start_rows, prefetch",
        "",
        f"LANES = {LANES}",
    ]
    for pol in (1, 2):
        lines.extend(_block(pol, LANES))
    return "\n".join(lines) + "\n"


def _helpers_hash() -> str:
    path = target().parent / "_ir_common.py"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def target() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1] / "jaxbar" / "core" / "_ir_lanes.py"


if __name__ == "__main__":
    target().write_text(generate())
    print(f"wrote {target()}")
