"""Generates jaxbar/core/ir/kernel_lanes.py: the lane-unrolled CPU kernels of the transfer solve.

A kernel solves a block of adjoint circuits (one per driven bit line) at once, one circuit per
SIMD lane. Numba vectorizes straight-line code over scalars (LLVM's SLP vectorizer) but not loops
over small work arrays it cannot prove unaliased, so every per-lane statement is written out once
per lane here. One kernel per number of polarities: single arrays, and interleaved pairs whose
two row lines share each row's bit-line nodes.

Usage: ``python tools/gen_ir_kernel.py`` (rewrites the module, and the record of
``constants.py``'s hash in ``kernel_common.py``; a test checks both are up to date).
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


def _kernel(P: int, L: int) -> list[str]:
    """The kernel for P polarities (see ``kernel_common.prepare_compact`` for the factors).

    Rows are solved one at a time (their nodes differ): a row's recurrences (one multiply-add
    per node and polarity) are shorter than the loads and stores around them. A lane's drive
    (its bit line's cells driven by -1) only enters the nodes in the block's own columns: each
    row's nodes are swept in three runs, the middle one adding a row of an identity (a branch
    per node split the lanes' vectors into pieces; reading a zero row elsewhere cost a third of
    a pass).
    """
    c = _Code(L)
    pols = range(P)
    c(0, f'''

@numba.njit(nogil=True, fastmath={{"contract"}}, cache=True)
def block_p{P}(g, rp, col, gq, rho, rrp, jr, cab, ccd, w0, eye, xs, j0, tol, cx2, cxi, qhat,
             max_passes, F, wbuf, fbuf, hbuf, ja, m_old, m_new, W, D, state, out, err):
    """Transfer rows of the driven bit lines j0 .. j0 + {L} - 1, float32, P = {P}.

    See ``cpu_kernel`` for the passes and ``cpu_kernel._worker`` for the arrays; ``eye``: the
    {L} x {L} identity (row b: lane b's drive). W, D: the relaxed bit-line and row-line voltages
    of the previous pass at every node (read and written only once over-relaxation is on).
    Returns (passes, status): status 0 converged, 1 not converged within max_passes, 2 too slow.
    """
    K = rp.shape[0] - 1
    N = w0.shape[1]
    U = numba.uint64
    zero = numba.float32(0.0)  # typed: a Python number would promote the lanes to float64
    one = numba.float32(1.0)
    n_live = min({L}, N - j0)
    passes = 0
    status = 1
    full_passes = 0
    done = 0
    relax = False  # W and D hold the previous pass's relaxed voltages
    start_rows(g, w0, j0, n_live, m_old)
    t = 0
    while t < max_passes:
        t += 1
        # Block SOR once the control sets a relaxation factor: the first such pass runs
        # unrelaxed and records the voltages it used (relaxing from 0 gives them exactly).
        om = one
        if state[7, 0] > 1.0:
            if relax:
                om = numba.float32(state[7, 0])
            else:
                W[:] = zero
                D[:, :] = zero
                relax = True
        state[9, 0] = om
        # A pass that is predicted to converge skips the bit-line elimination (which only the
        # next pass would read); when it does not converge it is run again in full (not with
        # relaxation: the rerun would relax the recorded voltages twice).
        last = not relax and worth_last(state, n_live, t - 1, qhat, tol)
        for attempt in range(2):
            full = attempt == 1 or not last
            desc = full_passes % 2 == 0
            dr = 0 if desc else 1
            start = full_passes == 0
            wbuf[:] = zero  # per column: the last node's bit-line voltage and elimination
            fbuf[:] = zero
            for kk in range(K):
                k = K - 1 - kk if desc else kk
                i0 = rp[k]
                i1 = rp[k + 1]''')
    ind = 4
    for p in pols:
        c.lanes_(ind, f"e{p}_#", "zero")
    # Nodes [a, b) lie in the block's own columns, where the lanes' drives enter.
    c(ind, "a = first_at_least(col, i0, i1, j0)")
    c(ind, "b = first_at_least(col, a, i1, j0 + n_live)")
    # Row-line elimination from the open end, i = i1 - 1 - ii down to i0.
    segments = (("0", "i1 - b", False), ("i1 - b", "i1 - a", True), ("i1 - a", "i1 - i0", False))
    c(ind, "if start:  # the start: bit lines solved with ideal row lines (0 off the drives)")
    for lo, hi, drive in segments:
        c(ind + 1, f"for ii in range({lo}, {hi}):")
        if drive:
            c(ind + 2, "i = U(i1 - 1 - ii)")
            c(ind + 2, "n = col[i]")
            c(ind + 2, f"x = U((n - j0) * {L})")
            c(ind + 2, "v = w0[k, n] + one")
            for p in pols:
                c(ind + 2, f"gv = gq[{p}, i] * v")
                c.lanes_(ind + 2, f"e{p}_#", f"e{p}_# - gv * eye[x + U(#)]")
        for p in pols:
            c.lanes_(ind + 2, f"hbuf[{p}, U(ii * {L}) + U(#)]", f"e{p}_#")
    # With the bit-line back-substitution of the previous pass; relaxed: each node's voltage
    # moves from the recorded one by om times the step to the back-substitution's.
    for relaxed in (False, True):
        c(ind, "else:" if relaxed else "elif not relax:")
        # The rows two steps ahead are fetched while this one is read (the passes read each
        # node's elimination once, from memory).
        c(ind + 1, "pf = rp[min(max(k + (-2 if desc else 2), 0), K - 1) + 1] - i1")
        c(ind + 1, f"last_line = F.shape[0] // {L} - 1")
        w = "wr_#" if relaxed else "wbuf[q + U(#)]"
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
            if relaxed:
                c.lanes_(ind + 2, "wr_#", "W[o + U(#)] + om * (wbuf[q + U(#)] - W[o + U(#)])")
                c.lanes_(ind + 2, "W[o + U(#)]", "wr_#")
            if drive:
                c(ind + 2, f"x = U((n - j0) * {L})")
            for p in pols:
                c(ind + 2, f"gw = gq[{p}, i]")
                u = f"({w} + eye[x + U(#)])" if drive else w
                c.lanes_(ind + 2, f"e{p}_#", f"e{p}_# - gw * {u}")
                c.lanes_(ind + 2, f"hbuf[{p}, U(ii * {L}) + U(#)]", f"e{p}_#")
    for p in pols:
        c(ind, f"jk = jr[{p}, k]")
        c.lanes_(ind, f"ja[{p}, k, #]", f"jk * e{p}_#")
    # Row-line back-substitution from the driver and the next bit-line elimination.
    for relaxed in (False, True):
        c(ind, "elif full:" if relaxed else "if full and not relax:")
        for p in pols:
            c.lanes_(ind + 1, f"d{p}_#", "zero")
        for lo, hi, drive in (("0", "a - i0", False), ("a - i0", "b - i0", True),
                              ("b - i0", "i1 - i0", False)):
            c(ind + 1, f"for ii in range({lo}, {hi}):")
            c(ind + 2, "i = U(i0 + ii)")
            c(ind + 2, "n = col[i]")
            c(ind + 2, f"q = U(n * {L})")
            c(ind + 2, f"o = i * U({L})")
            c(ind + 2, f"hq = U((i1 - i0 - 1 - ii) * {L})")
            for p in pols:
                c(ind + 2, f"ra = rho[{p}, i]")
                c(ind + 2, f"rs = rrp[{p}, i]")
                c.lanes_(ind + 2, f"d{p}_#", f"ra * d{p}_# + rs * hbuf[{p}, hq + U(#)]")
                if relaxed:  # the recurrence runs on, the elimination takes the relaxed ones
                    c.lanes_(ind + 2, f"dr{p}_#",
                             f"D[{p}, o + U(#)] + om * (d{p}_# - D[{p}, o + U(#)])")
                    c.lanes_(ind + 2, f"D[{p}, o + U(#)]", f"dr{p}_#")
            c(ind + 2, "cg = ccd[dr, 0, i]")
            if drive:
                c(ind + 2, f"x = U((n - j0) * {L})")
            terms = []
            for p in pols:
                c(ind + 2, f"c{p} = ccd[dr, {1 + p}, i]")
                d = f"dr{p}_#" if relaxed else f"d{p}_#"
                terms.append(f"c{p} * ({d} + eye[x + U(#)])" if drive else f"c{p} * {d}")
            c.lanes_(ind + 2, "f_#",
                     f"(fbuf[q + U(#)] + {' + '.join(terms)}) - cg * fbuf[q + U(#)]")
            c.lanes_(ind + 2, "F[o + U(#)]", "f_#")
            c.lanes_(ind + 2, "fbuf[q + U(#)]", "f_#")
    c(0, '''            if full:
                full_passes += 1
            if attempt == 1:
                break  # the pass run again in full: its readout was taken
            passes = t
            compact_readout(ja, n_live, m_new)
            done = control(m_old, m_new, n_live, t, tol, cx2, cxi, xs, state, err)
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
        f"# kernel_common.py sha256: {_helpers_hash()}",
        "import numba",
        "",
        "from jaxbar.core.ir.kernel_common import (compact_readout, control, first_at_least,",
        "                                          start_rows, worth_last, prefetch)",
        "",
        f"LANES = {LANES}",
    ]
    for P in (1, 2):
        lines.extend(_kernel(P, LANES))
    return "\n".join(lines) + "\n"


def _helpers_hash() -> str:
    path = target().parent / "kernel_common.py"
    return hashlib.sha256(path.read_bytes()).hexdigest()


_CONSTANTS_LINE = "# constants.py sha256: "


def common_stamped() -> str:
    """``kernel_common.py`` with the current sha256 of ``constants.py`` on its record line.

    numba's cache of ``kernel_common`` tracks only its own file; recording the constants' hash
    there makes a change of the constants change the file (and so recompile it and, through
    its hash, the generated kernels).
    """
    core = target().parent
    digest = hashlib.sha256((core / "constants.py").read_bytes()).hexdigest()
    lines = (core / "kernel_common.py").read_text().split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(_CONSTANTS_LINE))
    lines[at] = _CONSTANTS_LINE + digest
    return "\n".join(lines)


def target() -> pathlib.Path:
    root = pathlib.Path(__file__).resolve().parents[1]
    return root / "jaxbar" / "core" / "ir" / "kernel_lanes.py"


if __name__ == "__main__":
    common = target().parent / "kernel_common.py"
    stamped = common_stamped()
    if common.read_text() != stamped:
        common.write_text(stamped)
        print(f"wrote {common}")
    target().write_text(generate())
    print(f"wrote {target()}")
