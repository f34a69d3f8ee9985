"""Convergence constants of the IR-drop solver, shared by the XLA sweeps and the CPU kernel.

`_ir_common` (numba, cached on disk) compiles these values into its functions; numba's cache
tracks only that module's own file, so it records this file's sha256 and
`tools/gen_ir_kernel.py` rewrites that line (and the generated kernels) after a change here.
"""

# Safety factor on the geometric-tail error estimate of monotone (Gauss-Seidel) sweeps.
SAFETY = 4.0
# Relative output changes below this many ulps are rounding noise, not convergence progress.
NOISE_ULPS = 16
# Cap on the contraction estimate used to turn a change into an error estimate.
MAX_RATE = 0.99
# Sweeps whose output change shrinks slower than this (per sweep) get over-relaxation.
SOR_THRESHOLD = 0.1
# Sweeps between two updates of the relaxation factor (lets the new factor's transient decay).
SOR_WAIT = 3
# Cap on the estimated squared block-Jacobi radius (keeps the relaxation factor below 2).
MAX_MU2 = 0.9999
