"""Small IR-drop test circuits and the error measure shared by the solver tests."""

import numpy as np

K, N, B = 8, 6, 3
TERMINALS = dict(r_driver=0.04, r_integrator=0.06, extra_rows=2)
NO_TERMINALS = dict(r_driver=0.0, r_integrator=0.0, extra_rows=0)


def problem(topology, signed, seed=0, k=K, n=N, b=B):
    """Random conductances (k, n) of both polarities and b input vectors of the topology.

    Input-source inputs are uniform voltages (signed or not); gated-source inputs are bits
    in {0, 1} or {-1, 0, 1}, row 0 always on.
    """
    rng = np.random.default_rng(seed)
    g = rng.uniform(0.0, 1.0, (k, n))
    g_neg = rng.uniform(0.0, 1.0, (k, n))
    if topology == "input_source":
        inp = rng.uniform(-1.0 if signed else 0.0, 1.0, (b, k))
    else:
        inp = rng.integers(-1 if signed else 0, 2, (b, k)).astype(float)
        inp[:, 0] = 1.0  # at least one active row
    return g, g_neg, inp


def rel_err(x, ref):
    """Per input vector: max |x - ref| / max |ref|; the worst vector."""
    x, ref = np.asarray(x), np.asarray(ref)
    return float(np.max(np.max(np.abs(x - ref), -1) / np.max(np.abs(ref), -1)))
