"""Independent dense reference for the crossbar IR-drop circuits (PHYSICS.md §6).

The circuit is assembled element by element from textbook nodal-analysis stamps (every wire
segment, cell and terminal resistor is its own stamp; ideal sources and virtual grounds are
nodes of known voltage) and solved densely with NumPy. It shares no code and no formulation with
``jaxbar.core.ir``: zero resistances are handled by merging nodes (union-find), unused rows
are modelled as real bit-line nodes without cells, and the integrator current is the current
flowing into the integrator's node group. Only meant for small arrays (up to about 8 x 6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Circuit:
    """A linear resistive network with ideal voltage nodes and series-source conductances."""

    names: dict = field(default_factory=dict)  # node name -> index
    parent: list = field(default_factory=list)  # union-find parent
    known: dict = field(default_factory=dict)  # node index -> fixed voltage
    elements: list = field(default_factory=list)  # (node_a, node_b, conductance, source_volts)

    def node(self, name):
        if name not in self.names:
            self.names[name] = len(self.parent)
            self.parent.append(len(self.parent))
        return self.names[name]

    def fix(self, name, volts):
        self.known[self.node(name)] = float(volts)

    def find(self, i):
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def resistor(self, a, b, r):
        """A resistor between named nodes; r == 0 shorts (merges) them."""
        ia, ib = self.node(a), self.node(b)
        if r == 0:
            self.parent[self.find(ia)] = self.find(ib)
        else:
            self.elements.append((ia, ib, 1.0 / r, 0.0))

    def cell(self, a, b, g, source=0.0):
        """Conductance g in series with an ideal source: current a -> b is g*(source + Va - Vb)."""
        if g != 0:
            self.elements.append((self.node(a), self.node(b), float(g), float(source)))

    def solve(self):
        """Node voltages (dict name -> volts) of the network."""
        n = len(self.parent)
        root = [self.find(i) for i in range(n)]
        fixed = {}
        for i, v in self.known.items():
            r = root[i]
            if r in fixed and fixed[r] != v:
                raise ValueError("two different ideal sources shorted together")
            fixed[r] = v
        groups = sorted(set(root))
        free = [grp for grp in groups if grp not in fixed]
        col = {grp: j for j, grp in enumerate(free)}
        m = len(free)
        A = np.zeros((m, m))
        f = np.zeros(m)
        for ia, ib, g, src in self.elements:
            ra, rb = root[ia], root[ib]
            if ra == rb:
                continue
            # Current leaving node a through the element: g*(Va - Vb) + g*src.
            for this, other, sgn in ((ra, rb, 1.0), (rb, ra, -1.0)):
                if this not in col:
                    continue
                A[col[this], col[this]] += g
                if other in col:
                    A[col[this], col[other]] -= g
                else:
                    f[col[this]] += g * fixed[other]
                f[col[this]] -= sgn * g * src
        volts_free = np.linalg.solve(A, f) if m else np.zeros(0)
        volts = {}
        for name, i in self.names.items():
            r = root[i]
            volts[name] = fixed[r] if r in fixed else volts_free[col[r]]
        self._root = root
        return volts

    def current_into(self, name, volts):
        """Net current flowing into the node group of ``name`` through all elements."""
        target = self._root[self.names[name]]
        total = 0.0
        inv = {i: nm for nm, i in self.names.items()}
        for ia, ib, g, src in self.elements:
            ra, rb = self._root[ia], self._root[ib]
            if ra == rb:
                continue
            i_ab = g * (src + volts[inv[ia]] - volts[inv[ib]])
            if rb == target:
                total += i_ab
            elif ra == target:
                total -= i_ab
        return total


def _build(g, inp, r_row, r_col, topology, g_neg, r_driver, r_integrator, extra_rows):
    K, N = g.shape
    c = _Circuit()
    polarities = [(+1.0, g)] + ([(-1.0, g_neg)] if g_neg is not None else [])
    for n in range(N):
        # Bit line: one r_col segment after each used row, then the unused rows (real nodes
        # without cells), the last segment in series with the integrator's terminal resistance.
        total = K + extra_rows
        for k in range(total - 1):
            c.resistor(("bl", k, n), ("bl", k + 1, n), r_col)
        c.resistor(("bl", total - 1, n), ("int", n), r_col + r_integrator)
        c.fix(("int", n), 0.0)
    for p, (sign, gp) in enumerate(polarities):
        if topology == "input_source":
            for k in range(K):
                c.fix(("drv", p, k), sign * inp[k])
                c.resistor(("drv", p, k), ("rl", p, k, 0), r_row + r_driver)
                for n in range(N - 1):
                    c.resistor(("rl", p, k, n), ("rl", p, k, n + 1), r_row)
                for n in range(N):
                    c.cell(("rl", p, k, n), ("bl", k, n), gp[k, n])
        elif topology == "gated_source":
            for n in range(N):
                c.fix(("src", p, n), 0.0)
                c.resistor(("src", p, n), ("sl", p, 0, n), r_row + r_driver)
                for k in range(K - 1):
                    c.resistor(("sl", p, k, n), ("sl", p, k + 1, n), r_row)
                for k in range(K):
                    bit = sign * inp[k]
                    c.cell(("sl", p, k, n), ("bl", k, n), abs(inp[k]) * gp[k, n], source=bit)
        else:
            raise ValueError(topology)
    return c


def reference_solve(
    g,
    inputs,
    r_row,
    r_col,
    *,
    topology="input_source",
    g_neg=None,
    r_driver=0.0,
    r_integrator=0.0,
    extra_rows=0,
):
    """Exact column currents and node voltages of one array by a dense nodal solve.

    Args:
      g: (K, N) normalized cell conductances.
      inputs: (B, K) input voltages (input_source) or bits in {-1, 0, 1} (gated_source).
      r_row, r_col: normalized segment resistances (>= 0).
      topology: "input_source" or "gated_source".
      g_neg: optional (K, N) conductances of the interleaved negative cells.
      r_driver, r_integrator: terminal resistances.
      extra_rows: unused rows below the used ones (real bit-line nodes without cells).

    Returns:
      (currents, nodes): currents (B, N) into the integrators; nodes a list (one dict per input
      vector) with arrays "line" (P, K, N) (row-line voltages for input_source, supply-line
      voltages for gated_source) and "bit" (K, N) bit-line voltages.
    """
    g = np.asarray(g, np.float64)
    g_neg = None if g_neg is None else np.asarray(g_neg, np.float64)
    inputs = np.atleast_2d(np.asarray(inputs, np.float64))
    K, N = g.shape
    P = 1 if g_neg is None else 2
    out = np.zeros((inputs.shape[0], N))
    nodes = []
    for b, inp in enumerate(inputs):
        c = _build(
            g, inp, float(r_row), float(r_col), topology, g_neg,
            float(r_driver), float(r_integrator), int(extra_rows),
        )
        volts = c.solve()
        for n in range(N):
            out[b, n] = c.current_into(("int", n), volts)
        tag = "rl" if topology == "input_source" else "sl"
        line = np.array(
            [[[volts[(tag, p, k, n)] for n in range(N)] for k in range(K)] for p in range(P)]
        )
        bit = np.array([[volts[("bl", k, n)] for n in range(N)] for k in range(K)])
        nodes.append({"line": line, "bit": bit})
    return out, nodes


def reference_currents(g, inputs, r_row, r_col, **kwargs):
    """Column currents (B, N) only; see :func:`reference_solve`."""
    return reference_solve(g, inputs, r_row, r_col, **kwargs)[0]
