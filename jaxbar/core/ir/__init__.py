"""The exact, differentiable IR-drop (parasitic wire resistance) solver (PHYSICS.md §6).

The public API is re-exported here; each concept lives in its own module:

* `solve`: the public solves with their `custom_vjp`s (`solve_input_source`,
  `solve_gated_source`, `solve_gated_source_per_read`), the node voltages
  (`input_source_nodes`, `gated_source_nodes`) and `default_tol`.
* `circuit`: the circuit of each topology in solver layout, line segments, batch chunks.
* `lines`: the exact O(L) line eliminations (`line_factor`, `line_solve`); `line_scan`: the
  same as associative scans (logarithmic sequential depth, for accelerators).
* `sweeps`: the block Gauss-Seidel / SOR iteration and the per-vector (direct) solve.
* `convergence`: the sweeps' convergence control, `SolveInfo` and its `PATH_*` and `LINES_*` codes,
  non-convergence reporting (`check_convergence`, `ConvergenceError`, ...); `constants`
  holds the convergence constants (hashed into the CPU kernel's numba cache).
* `transfer`: transfer matrices of input-source arrays.
* `ladder`: gated-source columns as ladders, eliminated exactly.
* `gradients`: gradients by pairs of forward and adjoint solves.
* `cpu_kernel` (host side), `kernel_common` and the generated `kernel_lanes` (numba): the
  CPU kernel of the transfer solve; `ladder_kernel`: the CPU kernel of the ladders.

docs/ir_solver.md describes the design.
"""

from jaxbar.core.ir.convergence import (
    LINES_PARALLEL,
    LINES_SEQUENTIAL,
    PATH_DIRECT,
    PATH_KERNEL,
    PATH_KERNEL_THEN_XLA,
    PATH_LADDER,
    PATH_LADDER_KERNEL,
    PATH_TRANSFER,
    ConvergenceError,
    SolveInfo,
    check_convergence,
    convergence_error,
    quiet_callback_logs,
    solving,
)
from jaxbar.core.ir.solve import (
    NodeVoltages,
    default_tol,
    gated_source_nodes,
    input_source_nodes,
    solve_gated_source,
    solve_gated_source_per_read,
    solve_input_source,
)

__all__ = [
    "ConvergenceError",
    "LINES_PARALLEL",
    "LINES_SEQUENTIAL",
    "NodeVoltages",
    "PATH_DIRECT",
    "PATH_KERNEL",
    "PATH_KERNEL_THEN_XLA",
    "PATH_LADDER",
    "PATH_LADDER_KERNEL",
    "PATH_TRANSFER",
    "SolveInfo",
    "check_convergence",
    "convergence_error",
    "default_tol",
    "gated_source_nodes",
    "input_source_nodes",
    "quiet_callback_logs",
    "solve_gated_source",
    "solve_gated_source_per_read",
    "solve_input_source",
    "solving",
]
