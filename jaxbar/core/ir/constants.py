"""Convergence constants of the IR-drop solver: the XLA sweeps' and the CPU kernel's, in one place.

`kernel_common` (numba, cached on disk) compiles these values into its functions; numba's cache
tracks only that module's own file, so it records this file's sha256 and
`tools/gen_ir_kernel.py` rewrites that line (and the generated kernels) after a change here.
"""

# Shared by the XLA sweeps (`convergence.control_step`) and the CPU kernel.

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

# The XLA sweeps.

# A vector whose output change has not halved for this many sweeps has stalled (rounding
# noise): the solve stops early and reports it unconverged instead of running max_iters.
STALL_SWEEPS = 100

# The CPU kernel (`kernel_common.control`).

# Per-pass contraction above which over-relaxed passes (SOR_WAIT passes after the factor's last
# update) are too slow: the caller falls back to the XLA solver.
KERNEL_SLOW_RATE = 0.5
# Passes without the change halving after which a lane has stalled (rounding noise).
KERNEL_STALL = 3
# Within this factor of tol the cheap bound on the output change is replaced by the exact one
# (a product with every input vector per pass and block). With uniform inputs the bound is within
# 1.5x of the exact change and certifies the last pass by itself: a wider zone (1e3) spent a
# tenth of a separate array's solve on exact changes that decided nothing.
KERNEL_EXACT_ZONE = 30.0
