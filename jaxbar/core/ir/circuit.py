"""Circuit assembly of the IR-drop solver: the linear circuit of each topology in solver layout.

Two topologies (PHYSICS.md §6):

* **input-source** (full crossbar): input k drives row line k from its column-0 end; cells connect
  row node (k, n) to bit-line node (k, n); bit line n ends in a virtual-ground integrator below
  row K-1.
* **gated-source**: each column n has a supply line (source at the top, next to row 0) and a bit
  line (integrator at the bottom); a selected cell connects the two with a series drive `b[k]`.

Both are two families of resistive lines ("A-lines": row lines or supply lines; "B-lines": bit
lines) coupled through the cells. This module factors them (`make_circuit`), lays out
conductances and drives (`to_layout`), maps terminal resistances onto line segments
(`resistances`) and splits batches into chunks of bounded memory (`chunking`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbar.core.ir.lines import line_factor

Array = jax.Array


# Working-set budget of one batch chunk when `batch_chunk=None` (bytes of solver fields).
_CHUNK_BYTES = 384 * 2**20
# Matrix products are exact float32 (no TF32/bf16 passes on accelerators).
HIGHEST = lax.Precision.HIGHEST


class Circuit(NamedTuple):
    """Everything that defines the linear circuit of one chunk (arrays in solver layout)."""

    g: Array  # (K, N, P, 1) cell conductances
    mask: Array | None  # gated: (K, 1, 1, Bc) |bit| (cell selected); None for input-source
    rho_a: Array  # A-line factors: (K, N, P, 1) or (K, N, P, Bc)
    rho_b: Array  # B-line factors: (K, N, 1, 1) or (K, N, 1, Bc)
    r_a: Array  # A-line segment
    r_a_end: Array  # first A-line segment (with the driver's terminal resistance)
    r_b: Array  # bit-line segment
    r_b_end: Array  # last bit-line segment (unused rows and integrator resistance)

    @property
    def a_axis(self) -> int:
        """Axis of the A-lines: 1 (row lines along N, input-source), 0 (supply lines, gated).

        The topology is carried by the mask (None for input-source), so the circuit stays a
        plain pytree of arrays. (Row-line steps read strided slices; measured faster on CPU
        than transposing the fields twice per sweep.)
        """
        return 1 if self.mask is None else 0


def make_circuit(topology, g_l, mask, res, lines):
    """Factor the A- and B-lines of a circuit (g_l: (K, N, P, 1); mask: None or (K,1,1,Bc))."""
    assert (mask is None) == (topology == "input_source")
    r_a, r_a_end, r_b, r_b_end = res
    G = g_l if mask is None else g_l * mask
    rho_a = line_factor(G, 1 if mask is None else 0, True, r_a_end, r_a, lines)
    rho_b = line_factor(jnp.sum(G, axis=2, keepdims=True), 0, False, r_b_end, r_b, lines)
    return Circuit(g_l, mask, rho_a, rho_b, r_a, r_a_end, r_b, r_b_end)


def cell_g(g, m):
    """Conductances of the selected cells: `g` times the mask (gated), `g` (input-source)."""
    return g if m is None else g * m


def ideal_currents(cir, e_row, e_col):
    """Ideal (IR-free) output currents (Bc, N) of the chunk's drives, by matrix products."""
    g = cir.g[..., 0]  # (K, N, P)
    drive = e_row[:, 0] if cir.mask is None else e_row[:, 0] * cir.mask[:, 0]  # (K, P, Bc)
    ideal = jnp.einsum("knp,kpb->bn", g, drive, precision=HIGHEST)
    if e_col is not None:
        if cir.mask is None:
            gsum = jnp.sum(g, axis=(0, 2))[None, :]  # (1, N)
        else:
            gsum = jnp.einsum("knp,kb->bn", g, cir.mask[:, 0, 0], precision=HIGHEST)
        ideal = ideal + gsum * e_col[0, :, 0, :].T
    return ideal


def resistances(r_row, r_col, r_driver, r_integrator, extra_rows):
    """Line segments (r_a, r_a_end, r_b, r_b_end) from the array's wire and terminal resistances."""
    return (r_row, r_row + r_driver, r_col, (extra_rows + 1.0) * r_col + r_integrator)


def to_layout(topology, g_stack, x, signs):
    """Solver-layout conductances, drives and masks for a chunk x (Bc, K)."""
    g_l = jnp.transpose(g_stack, (1, 2, 0))[..., None]  # (K, N, P, 1)
    xt = x.T  # (K, Bc)
    e_row = signs[None, None, :, None] * xt[:, None, None, :]  # (K, 1, P, Bc)
    mask = None if topology == "input_source" else jnp.abs(xt)[:, None, None, :]
    return g_l, e_row, mask


def shared_circuit(topology, g_stack, res, lines):
    """Circuit factors shared by all vectors (input-source only; gated depends on the bits)."""
    if topology != "input_source":
        return None
    g_l = jnp.transpose(g_stack, (1, 2, 0))[..., None]
    return make_circuit(topology, g_l, None, res, lines)


def chunk_circuit(topology, shared, g_l, mask, res, lines):
    """The circuit of one chunk: the shared one (input-source), else factored for its bits."""
    if shared is not None:
        return shared
    return make_circuit(topology, g_l, mask, res, lines)


def chunking(B, per_vector_bytes, batch_chunk):
    """(n_chunks, chunk) for B vectors: `batch_chunk`, or None: within the memory budget."""
    if batch_chunk is None:
        batch_chunk = max(1, min(B, _CHUNK_BYTES // max(per_vector_bytes, 1)))
    batch_chunk = max(1, min(int(batch_chunk), B))
    n_chunks = -(-B // batch_chunk)
    chunk = -(-B // n_chunks)  # even chunks: least padding
    return n_chunks, chunk


def split_chunks(x, n_chunks, chunk):
    """X (B, ...) zero-padded and reshaped to (n_chunks, chunk, ...)."""
    B = x.shape[0]
    pad = n_chunks * chunk - B
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape((n_chunks, chunk) + x.shape[1:])


def map_chunks(fn, xs):
    """lax.map over chunks (sequential: bounded memory); a single chunk is called directly."""
    if jax.tree_util.tree_leaves(xs)[0].shape[0] == 1:
        return jax.tree_util.tree_map(lambda y: y[None], fn(jax.tree_util.tree_map(
            lambda x: x[0], xs)))
    return lax.map(fn, xs)


def per_vector_bytes(topology, K, N, P, itemsize):
    """Bytes of solver fields per input vector (sets the chunk size)."""
    # a, H_a, w, H_b, old copies and temporaries; gated also holds per-vector factors.
    fields = 4 * P + 4 + (2 * P + 2 if topology == "gated_source" else 0)
    return fields * K * N * itemsize
