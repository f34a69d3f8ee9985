"""Named optax optimizers and learning-rate schedules (what the `finetune` command offers).

The training loop accepts any `optax.GradientTransformation`; these helpers only build the
common ones from command-line style arguments.
"""

from __future__ import annotations

import optax

from jaxbar.config import ConfigError

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_optimizer", "make_schedule"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def make_schedule(kind: str, lr: float, total_steps: int, warmup_steps: int = 0,
                  final_fraction: float = 0.0) -> optax.Schedule:
    """A learning-rate schedule.

    Args:
      kind: "constant", "cosine" (from `lr` to `final_fraction·lr` over `total_steps`)
        or "warmup_cosine" (linear warm-up from 0 over `warmup_steps`, then cosine).
      lr: peak learning rate.
      total_steps: steps of the whole run.
      warmup_steps: warm-up steps ("warmup_cosine").
      final_fraction: the final learning rate as a fraction of `lr`.

    Returns:
      `step -> learning rate`.
    """
    total = max(1, int(total_steps))
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, total, alpha=final_fraction)
    if kind == "warmup_cosine":
        warm = min(max(0, int(warmup_steps)), total - 1)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, total, lr * final_fraction)
    raise ConfigError(f"schedule {kind!r} is invalid: expected one of {', '.join(SCHEDULES)}")


def make_optimizer(name: str, schedule: optax.Schedule | float, *, momentum: float = 0.9,
                   weight_decay: float = 0.0, grad_clip: float | None = None
                   ) -> optax.GradientTransformation:
    """An optax optimizer by name.

    Args:
      name: "sgd" (with `momentum`, Nesterov), "adam" or "adamw".
      schedule: learning rate or schedule.
      momentum: SGD momentum (0: plain SGD).
      weight_decay: L2 penalty added to the gradient (sgd, adam) or decoupled decay (adamw).
      grad_clip: clip the global gradient norm to this value first (None: no clipping).

    Returns:
      The transformation.
    """
    if name == "sgd":
        opt = optax.sgd(schedule, momentum=momentum or None, nesterov=bool(momentum))
    elif name == "adam":
        opt = optax.adam(schedule)
    elif name == "adamw":
        opt = optax.adamw(schedule, weight_decay=weight_decay)
    else:
        raise ConfigError(f"optimizer {name!r} is invalid: expected one of "
                          f"{', '.join(OPTIMIZERS)}")
    chain = []
    if grad_clip:
        chain.append(optax.clip_by_global_norm(grad_clip))
    if weight_decay and name != "adamw":
        chain.append(optax.add_decayed_weights(weight_decay))
    return optax.chain(*chain, opt) if chain else opt
