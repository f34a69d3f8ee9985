"""Hardware-aware fine-tuning on optax: the analog network in the training forward pass.

Every training step runs the network on freshly programmed crossbars: a new trial key per step
draws new programming errors (and read noise) from the *same* per-layer configs that evaluation
uses (noise injection), while straight-through estimators carry gradients through the weight,
DAC and ADC quantizers of the core. Optionally the kernels are clipped after each step, the
input and ADC ranges are learned (`jaxbar.nn.ranges`), and batch-norm statistics are
either frozen or updated.

The step is one `jax.jit`-compiled pure function of `(state, images, labels, key)`; all
randomness of step `s` (augmentation, programming error, read noise) comes from
`fold_in(key(seed), s)` and the batch from `(seed, epoch)`, so training resumed from a
checkpoint continues bit for bit like an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxbar.config import ConfigError
from jaxbar.core import mapping
from jaxbar.nn import calibrate as calibrate_lib
from jaxbar.nn.analogize import (
    ANALOG_STATE,
    analog_layers,
    attach_learned_ranges,
    commit_learned_ranges,
    program_model,
    update_configs,
)
from jaxbar.nn.graph import WEIGHT_LAYERS, modules
from jaxbar.nn.ranges import LearnedRanges
from jaxbar.train.augment import batch_indices, random_crop_flip
from jaxbar.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)

__all__ = ["TrainOptions", "TrainState", "Trainer", "clip_kernel", "clip_percentiles",
           "clip_weights", "read_log"]

BATCH_STATS = ("update", "frozen")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """What a training step does besides the optimizer update.

    Attributes:
      batch_size: examples per step.
      seed: seeds the data order, the augmentation and the noise of every step.
      batch_stats: "frozen" (normalize with the running averages and keep them, as
        evaluation does) or "update" (normalize with batch statistics and update the running
        averages, as in ordinary training). Under noise injection "update" lets batch norm
        re-normalize every trial's perturbed activations with that trial's own statistics, a
        correction evaluation (running averages) does not have; "frozen" trains for the
        evaluation condition and did better in the ResNet20 experiment.
      weight_clip: after each step clip every analog layer's kernel (every convolution and
        dense layer of a digital run): None (never), "mapped" (to the range its mapping uses,
        `±w_max` at `weights.clip_percentile`), or a number k (to `±k·std` of the kernel,
        which lowers `w_max` relative to the typical weight and with it the relative size of
        programming error, which scales with `w_max`).
      learn_ranges: learn each analog layer's input and ADC ranges.
      ir_drop: keep the configs' parasitic wire resistance in training (when the core
        supports it); False trains without it (faster) and still evaluates with it.
      augment: random crop (`crop_padding` pixels of zero padding) and horizontal flip.
      crop_padding: padding of the random crop.
      label_smoothing: of the cross-entropy targets.
    """

    batch_size: int = 128
    seed: int = 0
    batch_stats: str = "frozen"
    weight_clip: str | float | None = None
    learn_ranges: bool = False
    ir_drop: bool = True
    augment: bool = True
    crop_padding: int = 4
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.batch_stats not in BATCH_STATS:
            raise ConfigError(f"batch_stats = {self.batch_stats!r} is invalid: expected one of "
                              f"{', '.join(BATCH_STATS)}")
        wc = self.weight_clip
        if not (wc is None or wc == "mapped" or (isinstance(wc, int | float)
                                                 and not isinstance(wc, bool) and wc > 0)):
            raise ConfigError(f"weight_clip = {wc!r} is invalid: expected None, 'mapped' or a "
                              "positive number of standard deviations")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"batch_size = {self.batch_size!r} is invalid: expected >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing = {self.label_smoothing!r} is invalid: "
                              "expected [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """The options as a dict."""
        return dataclasses.asdict(self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training (a pytree; what a checkpoint stores).

    Attributes:
      step: global steps completed (int32 scalar).
      params: the model's `nnx.Param` state.
      batch_stats: the rest of the model's state (batch-norm running averages).
      ranges: learnable range parameters by layer (empty unless `learn_ranges`).
      opt_state: the optax state.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    ranges: Any
    opt_state: Any


def clip_kernel(W: jax.Array, clip: str | float, clip_percentile: float = 100.0) -> jax.Array:
    """Clips a kernel after an update (see `TrainOptions.weight_clip`).

    Args:
      W: the kernel (any shape).
      clip: "mapped" or a number k of standard deviations.
      clip_percentile: the layer's `weights.clip_percentile` (for "mapped").

    Returns:
      The clipped kernel.
    """
    if clip == "mapped":
        _, w_max = mapping.clip_and_scale(W.reshape(-1, W.shape[-1]), clip_percentile)
    else:
        w_max = float(clip) * jnp.std(W)
    return jnp.clip(W, -w_max, w_max)


def clip_percentiles(model: nnx.Module) -> dict[str, float]:
    """The layers weight clipping acts on, with the percentile "mapped" clips at.

    An analog model's analog layers, at their mapping's `weights.clip_percentile`; a digital
    model's every weight layer at 100 (the control of an analog run with the same options).
    """
    layers = analog_layers(model)
    if layers:
        return {p: op.config.weights.clip_percentile for p, (_, op) in layers.items()}
    return {p: 100.0 for p, m in modules(model).items() if isinstance(m, WEIGHT_LAYERS)}


def clip_weights(model: nnx.Module, clip: str | float, percentiles: dict[str, float]) -> None:
    """Clips the kernels of the layers in `percentiles`, in place (see `clip_kernel`)."""
    mods = modules(model)
    for path, pct in percentiles.items():
        mods[path].kernel[...] = clip_kernel(mods[path].kernel[...], clip, pct)


def _strip_weak(tree):
    # Via NumPy: no weak types (a restored state has the avals of a fresh one, so the step is
    # not traced again) and no XLA compilation per leaf shape, as eager jnp copies would cost.
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), tree)


class Trainer:
    """Fine-tunes a model with any optax optimizer under analog noise.

    Args:
      model: the model to start from (not modified): an analog model (`jaxbar.analogize`,
        ranges calibrated, as evaluation uses it) or a digital one (the control).
      optimizer: any optax transformation for the model parameters (its schedule included).
      options: what a step does besides the update.
      schedule: the learning-rate schedule inside `optimizer`, only for logging.
      range_optimizer: the transformation for range parameters (default `adam(1e-3)`).
      preprocess: applied to each (augmented) batch inside the step, e.g. the CIFAR mean
        subtraction, so uint8 images can be fed and padded with black.
      augment: `(key, images) -> images`; default `random_crop_flip` when
        `options.augment`.
    """

    def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation, *,
                 options: TrainOptions = TrainOptions(),
                 schedule: Callable[[int], Any] | None = None,
                 range_optimizer: optax.GradientTransformation | None = None,
                 preprocess: Callable[[jax.Array], jax.Array] | None = None,
                 augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None):
        self.options = options
        self._eval = nnx.clone(model)
        self.analog = bool(analog_layers(model))
        if options.learn_ranges and not self.analog:
            raise ConfigError("learn_ranges needs an analog model (this one is digital)")
        train_model = nnx.clone(model)
        if not options.ir_drop and any(op.config.parasitics.topology != "none"
                                       for _, op in analog_layers(train_model).values()):
            update_configs(train_model, **{"parasitics.topology": "none"})
        if options.learn_ranges:
            attach_learned_ranges(train_model)
        (self.graphdef, ranges, params, self._analog_state,
         batch_stats) = nnx.split(train_model, LearnedRanges, nnx.Param, ANALOG_STATE, ...)
        self._initial = (params, batch_stats, ranges)
        self.schedule = schedule
        self.preprocess = preprocess
        if augment is None and options.augment:
            pad = options.crop_padding

            def augment(key, x):
                return random_crop_flip(key, x, pad)

        self.augment = augment if options.augment else None
        if options.learn_ranges:
            optimizer = optax.multi_transform(
                {"params": optimizer, "ranges": range_optimizer or optax.adam(1e-3)},
                {"params": "params", "ranges": "ranges"})
        self.tx = optimizer
        self._clip_layers = {} if options.weight_clip is None else clip_percentiles(model)
        self.traces = 0  # how often the step was traced (compiled): 1 in a healthy run
        self._step = jax.jit(self._step_impl)

    # ------------------------------------------------------------------ state
    def init_state(self) -> TrainState:
        """The training state at step 0 (the initial model, a fresh optimizer)."""
        params, batch_stats, ranges = self._initial
        trainable = {"params": params, "ranges": ranges}
        # One compiled init instead of an eager (per-shape compiled) op per leaf.
        opt_state = jax.jit(self.tx.init)(trainable)
        state = TrainState(np.zeros((), np.int32), params, batch_stats, ranges, opt_state)
        return _strip_weak(state)

    def training_model(self, state: TrainState) -> nnx.Module:
        """The model as it trains.

        It has the configs of training (IR drop as `options.ir_drop`) and the learned ranges
        as parameters.
        """
        return nnx.merge(self.graphdef, state.ranges, state.params, self._analog_state,
                         state.batch_stats, copy=True)

    def model(self, state: TrainState) -> nnx.Module:
        """The model to evaluate.

        It has the state's parameters, batch statistics and learned ranges, with the configs
        the trainer was given (IR drop included).
        """
        trained = self.training_model(state)
        if self.options.learn_ranges:
            commit_learned_ranges(trained)
        out = nnx.clone(self._eval)
        nnx.update(out, nnx.state(trained, nnx.Param), nnx.state(trained, nnx.BatchStat))
        trained_ops = analog_layers(trained)
        for path, (_, op) in analog_layers(out).items():
            trained_cfg = trained_ops[path][1].config
            op.crossbar.set_value(op.config.replace(**{
                "inputs.range": trained_cfg.inputs.range, "adc.range": trained_cfg.adc.range}))
        return out

    def calibration(self, state: TrainState, meta: dict | None = None):
        """The learned ranges as a calibration (None unless ranges are learned)."""
        if not self.options.learn_ranges:
            return None
        return calibrate_lib.learned_calibration(self.training_model(state), meta)

    # ------------------------------------------------------------------ step
    def _clip(self, params, batch_stats):
        if not self._clip_layers:
            return params
        model = nnx.merge(self.graphdef, self._initial[2], params, self._analog_state,
                          batch_stats, copy=True)
        clip_weights(model, self.options.weight_clip, self._clip_layers)
        return nnx.state(model, nnx.Param)

    def _step_impl(self, state: TrainState, images, labels, key):
        self.traces += 1
        key = jax.random.fold_in(key, state.step)
        k_aug, k_trial = jax.random.split(key)
        x = images
        if self.augment is not None:
            x = self.augment(k_aug, x)
        if self.preprocess is not None:
            x = self.preprocess(x)
        x = x.astype(jnp.float32)
        train = self.options.batch_stats == "update"
        smooth = self.options.label_smoothing

        def loss_fn(trainable):
            # copy=True: fresh Variables at this trace level, so batch norm may update them.
            model = nnx.merge(self.graphdef, trainable["ranges"], trainable["params"],
                              self._analog_state, state.batch_stats, copy=True)
            if self.analog:  # a fresh trial every step, programmed from the current kernels
                program_model(model, k_trial, live=True)
            logits = model(x, train=train)
            targets = jax.nn.one_hot(labels, logits.shape[-1])
            if smooth:
                targets = optax.smooth_labels(targets, smooth)
            loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
            stats = nnx.split(model, LearnedRanges, nnx.Param, ANALOG_STATE, ...)[4]
            return loss, (logits, stats)

        trainable = {"params": state.params, "ranges": state.ranges}
        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        params = self._clip(trainable["params"], stats)
        metrics = {"loss": loss,
                   "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
                   "grad_norm": optax.tree.norm(grads)}
        new = TrainState(state.step + 1, params, stats, trainable["ranges"], opt_state)
        return new, metrics

    def step(self, state: TrainState, images, labels, key: jax.Array | None = None):
        """One training step (compiled once; same shapes, no retracing).

        Args:
          state: the current state.
          images: a batch (`(B, H, W, C)`; uint8 when `preprocess` converts).
          labels: `(B,)` integer labels.
          key: the run's base key (default `key(options.seed)`); step s uses
            `fold_in(key, s)`.

        Returns:
          `(new state, metrics)` with scalar `loss`, `accuracy` (of the batch, under
          this step's noise) and `grad_norm`.
        """
        if key is None:
            key = jax.random.key(self.options.seed)
        return self._step(state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), key)

    def learning_rate(self, step: int) -> float | None:
        """The scheduled learning rate at `step` (None without a schedule)."""
        if self.schedule is None:
            return None
        return float(self.schedule(step)) if callable(self.schedule) else float(self.schedule)

    # ------------------------------------------------------------------ loop
    def _run_meta(self, n: int) -> dict[str, Any]:
        return {"n_train": int(n), "options": self.options.to_dict()}

    def restore(self, run_dir: str | Path, n_train: int | None = None
                ) -> tuple[TrainState, int] | None:
        """The last checkpoint of a run directory, or None when there is none.

        Raises:
          CheckpointError: the checkpoint does not fit this trainer (other options or data).
        """
        path = latest_checkpoint(Path(run_dir) / "checkpoints")
        if path is None:
            return None
        tree, step, meta = restore_checkpoint(path, self.init_state())
        if n_train is not None:
            want = self._run_meta(n_train)
            got = {k: meta.get(k) for k in want}
            if json.loads(json.dumps(want)) != got:
                raise CheckpointError(f"{path} was written by a run with {got}, not {want}: "
                                      "use another run directory or start afresh")
        return _strip_weak(tree), step

    def fit(self, images: np.ndarray, labels: np.ndarray, *, epochs: float,
            run_dir: str | Path | None = None, resume: bool = True,
            state: TrainState | None = None, stop_at: int | None = None,
            log_every: int = 50, checkpoint_every: int | None = 500, keep_checkpoints: int = 2,
            on_epoch_end: Callable[[TrainState, int], dict | None] | None = None,
            progress: bool = True) -> TrainState:
        """Trains for `epochs` passes over (images, labels).

        Batches are drawn without replacement in an order fixed by `(seed, epoch)` (the last
        partial batch of an epoch is dropped), so a fractional number of epochs trains on a
        random subset. With `run_dir`, it writes `log.jsonl` (step, epoch, loss, accuracy,
        lr, images/s, averaged since the previous record; training seconds so far) and
        checkpoints to `run_dir/checkpoints` every `checkpoint_every` steps, at every epoch
        end, at the end and on KeyboardInterrupt; with `resume` it continues from the last
        checkpoint there.

        Args:
          images: training images, as the step expects them (e.g. uint8 NHWC).
          labels: integer labels.
          epochs: passes over the data (may be fractional).
          run_dir: where logs and checkpoints go (None: nowhere).
          resume: continue from the last checkpoint in `run_dir`.
          state: the state to start from when not resuming (default `init_state()`).
          stop_at: stop after this global step even if the schedule is longer (the rest can
            be resumed later).
          log_every: steps per log record.
          checkpoint_every: steps between checkpoints (None: epoch ends and the end only).
          keep_checkpoints: how many checkpoints to keep.
          on_epoch_end: `(state, epoch) -> dict` of extra values to log (e.g. an
            evaluation), called after each completed epoch.
          progress: show a tqdm bar (loss, accuracy, images/s).

        Returns:
          The final state.
        """
        from tqdm.auto import tqdm

        images, labels = np.asarray(images), np.asarray(labels, np.int32)
        n, bs = len(images), self.options.batch_size
        steps_per_epoch = n // bs
        if steps_per_epoch < 1:
            raise ValueError(f"batch size {bs} exceeds the {n} training examples")
        total = max(1, int(round(epochs * steps_per_epoch)))
        end = total if stop_at is None else min(total, int(stop_at))
        run = None if run_dir is None else Path(run_dir)
        ckpt_dir = None if run is None else run / "checkpoints"
        start = 0
        if run is not None and resume:
            restored = self.restore(run, n)
            if restored is not None:
                state, start = restored
        elif ckpt_dir is not None:  # starting afresh: older checkpoints must not be resumed
            for _, old in list_checkpoints(ckpt_dir):
                old.unlink()
        if state is None:
            state = self.init_state()
        start = int(state.step) if start == 0 else start
        log_path = None if run is None else run / "log.jsonl"
        if log_path is not None:
            run.mkdir(parents=True, exist_ok=True)
            _truncate_log(log_path, start)
        meta = self._run_meta(n)
        key = jax.random.key(self.options.seed)

        def checkpoint(st):
            if ckpt_dir is not None:
                save_checkpoint(ckpt_dir, int(st.step), st, meta, keep_checkpoints)

        # Training seconds so far: those of the records kept from an earlier invocation, plus
        # this one's.
        prior = 0.0
        if log_path is not None and log_path.exists():
            kept = read_log(log_path)
            prior = float(kept[-1].get("seconds", 0.0)) if kept else 0.0
        t_fit = time.perf_counter()
        sums = {"loss": 0.0, "accuracy": 0.0, "count": 0, "since": time.perf_counter()}
        rate = None  # images/s, smoothed; the first (compiling) step is left out
        bar = tqdm(total=end, initial=start, desc="finetune", unit="step", disable=not progress,
                   dynamic_ncols=True)
        step = start
        try:
            with (open(log_path, "a") if log_path else contextlib.nullcontext()) as log:
                while step < end:
                    t_step = time.perf_counter()
                    idx = batch_indices(self.options.seed, step, n, bs)
                    state, m = self.step(state, images[idx], labels[idx], key)
                    step += 1
                    loss, acc = float(m["loss"]), float(m["accuracy"])  # waits for the step
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"the loss became {loss} at step {step}")
                    now = time.perf_counter()
                    if step > start + 1:
                        inst = bs / max(now - t_step, 1e-9)
                        rate = inst if rate is None else 0.9 * rate + 0.1 * inst
                    sums["loss"] += loss
                    sums["accuracy"] += acc
                    sums["count"] += 1
                    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}",
                                    img_s="-" if rate is None else f"{rate:.0f}", refresh=False)
                    bar.update(1)
                    epoch_done = step % steps_per_epoch == 0
                    record = None
                    if step % log_every == 0 or step == end or epoch_done:
                        c = sums["count"]
                        record = {"step": step, "epoch": step / steps_per_epoch,
                                  "loss": sums["loss"] / c, "accuracy": sums["accuracy"] / c,
                                  "lr": self.learning_rate(step - 1),
                                  "images_per_s": c * bs / max(now - sums["since"], 1e-9),
                                  "seconds": prior + now - t_fit}
                    if epoch_done and on_epoch_end is not None:
                        extra = on_epoch_end(state, step // steps_per_epoch - 1)
                        if extra:
                            record = dict(record, **extra)
                    if record is not None:
                        if log is not None:
                            log.write(json.dumps(record) + "\n")
                            log.flush()
                        sums = {"loss": 0.0, "accuracy": 0.0, "count": 0,
                                "since": time.perf_counter()}
                    if (checkpoint_every and step % checkpoint_every == 0) or epoch_done or \
                            step == end:
                        checkpoint(state)
        except KeyboardInterrupt:
            checkpoint(state)  # `state` is always that of a completed step
            raise
        finally:
            bar.close()
        return state


def _truncate_log(path: Path, step: int) -> None:
    """Drops log records after `step` (a resumed run writes them again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `log.jsonl` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
