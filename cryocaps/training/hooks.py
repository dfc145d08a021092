"""Loop features as small hooks: progress, signals, time budget, early stop, checkpoints, metrics.

The :class:`~cryocaps.training.loop.Trainer` calls every hook at fixed points,
in list order; a hook may answer with a stop reason. A new feature is a new
hook, not a new branch inside the loop. Hooks read the trainer (its
``state``, ``config``, ``ranks``) and change only ``state`` fields that are
theirs to change.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryocaps.training.checkpoint import (
    BEST_CHECKPOINT,
    CURVE_NAME,
    LAST_CHECKPOINT,
    METRICS_NAME,
    model_metadata,
    save_checkpoint,
)

log = logging.getLogger(__name__)

STOPPED_MID_EPOCH = ("SIGINT", "SIGTERM", "max_minutes")


class Hook:
    """Does nothing at every point; subclasses override what they need."""

    def on_train_begin(self, trainer) -> None:
        """Before the first step of this run (after a resume restored the state)."""

    def on_step_end(self, trainer, step_seconds: float) -> str | None:
        """After each optimiser step; a returned reason stops the loop after this step."""
        return None

    def on_epoch_end(self, trainer, row: dict, improved: bool) -> str | None:
        """After an epoch was validated and recorded (``state.epoch`` counts it); may stop."""
        return None

    def on_train_end(self, trainer) -> None:
        """When the loop has ended normally (completed or stopped), not after an error."""

    def close(self) -> None:
        """Always, last (also after an error)."""


class ProgressReport(Hook):
    """Calls ``progress(n=..., info=..., total=...)`` once at the start and after every step."""

    def __init__(self, progress: Callable[..., None]):
        self.progress = progress

    def on_train_begin(self, trainer) -> None:
        config, state = trainer.config, trainer.state
        done = state.epoch * config.steps_per_epoch + state.step_in_epoch
        self.progress(n=done, info="", total=config.epochs * config.steps_per_epoch)

    def on_step_end(self, trainer, step_seconds: float) -> None:
        state = trainer.state
        val_text = f" val {state.rows[-1]['val_loss']:.3f}" if state.rows else ""
        loss = state.epoch_loss_sum / state.epoch_loss_count
        info = f"epoch {state.epoch + 1}/{trainer.config.epochs} loss {loss:.3f}{val_text}"
        self.progress(n=1, info=info)


class StopOnSignal(Hook):
    """SIGINT/SIGTERM stop the loop after the current step (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def on_train_begin(self, trainer) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "%s received: stopping after this step and saving a checkpoint", self.signal_name
        )

    def on_step_end(self, trainer, step_seconds: float) -> str | None:
        return self.signal_name

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class RunClock:
    """A run's wall clock against its ``--max-minutes`` (None: no time limit), for the hooks
    that act on the share of the run done. Restarted when training begins (a resumed run has
    its budget anew)."""

    def __init__(self, max_minutes: float | None):
        self.budget_seconds = max_minutes * 60 if max_minutes else None
        self.restart()

    def restart(self) -> None:
        self.start = time.time()

    def elapsed(self) -> float:
        return time.time() - self.start

    def share(self, done: float) -> float:
        """The share of the run done: the larger of ``done`` (by steps or epochs) and the
        time used of the budget."""
        if self.budget_seconds:
            done = max(done, self.elapsed() / self.budget_seconds)
        return done


class TimeBudget(Hook):
    """``--max-minutes``: stop when the time left would not cover one more step and a validation.

    The epoch then ends early and is validated, so the last weights are judged
    (and kept if best).
    """

    def __init__(self, max_minutes: float):
        self.clock = RunClock(max_minutes)

    def on_train_begin(self, trainer) -> None:
        self.clock.restart()

    def on_step_end(self, trainer, step_seconds: float) -> str | None:
        # the last epoch always validates the whole held-out regions
        needed = step_seconds + trainer.validator.seconds_needed(step_seconds) + 5
        return "max_minutes" if self.clock.elapsed() + needed > self.clock.budget_seconds else None


class CosineSchedule(Hook):
    """``--lr-schedule cosine``: a short warm-up, then a cosine from ``--lr`` to 1% of it.

    The cosine spans the whole run, whichever limit ends it first: ``--epochs`` ×
    ``--steps-per-epoch`` steps, or ``--max-minutes`` of wall-clock time (so a
    time-budgeted run anneals by the end of its budget, not of epochs it will never
    reach). The learning rate is set before every step from the progress through the
    run; nothing is saved, so a resumed run with ``--max-minutes`` anneals again over
    its new budget (its step count carries over).
    """

    WARMUP = 0.03  # of the run, linear from 10% of the learning rate
    FLOOR = 0.01  # of the learning rate, at the end

    def __init__(self, lr: float, total_steps: int, max_minutes: float | None):
        self.lr, self.total_steps = lr, total_steps
        self.clock = RunClock(max_minutes)

    def on_train_begin(self, trainer) -> None:
        self.clock.restart()
        self.apply(trainer)

    def on_step_end(self, trainer, step_seconds: float) -> None:
        self.apply(trainer)

    def progress(self, total_steps_done: int) -> float:
        """Fraction of the run done, 0 to 1 (the larger of steps and time)."""
        return min(self.clock.share(total_steps_done / self.total_steps), 1.0)

    def apply(self, trainer) -> None:
        # the ranks' clocks differ slightly: they must set the same rate (a collective)
        progress = trainer.ranks.mean(self.progress(trainer.state.total_steps))
        lr = cosine_lr(self.lr, progress, self.WARMUP, self.FLOOR)
        for group in trainer.state.optimizer.param_groups:
            group["lr"] = lr


def cosine_lr(lr: float, progress: float, warmup: float, floor: float) -> float:
    """The rate at ``progress`` (0-1): linear warm-up from 0.1 lr, then cosine to floor × lr."""
    if progress < warmup:
        return lr * (0.1 + 0.9 * progress / warmup)
    t = (progress - warmup) / (1.0 - warmup)
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))


class AutoRecipe(Hook):
    """``--lr-schedule auto`` (the default): anneal, with a weight average, only a long run.

    A cosine to 1% of ``--lr`` plus an EMA of the weights helped 3D-UCaps in runs of
    700 steps and more and hurt at ~250 (benchmarks/RESULTS.md), so the run's length
    decides. Without ``--max-minutes`` it is known at the start (``--epochs`` ×
    ``--steps-per-epoch``); with it, it is projected at the end of the first epoch from
    that epoch's pace (steps and validation). From ``min_steps`` on, the rest of the run
    follows :class:`CosineSchedule` from the progress already made and ``--ema auto``
    starts averaging; below, the rate stays at ``--lr``. The decision is kept in the
    checkpoint (``TrainState.annealing``), so a resumed run keeps it.
    """

    def __init__(self, config, min_steps: int, ema_decay: float):
        self.planned_steps = config.epochs * config.steps_per_epoch
        # its clock and budget are this hook's too
        self.cosine = CosineSchedule(config.lr, self.planned_steps, config.max_minutes)
        self.min_steps, self.ema_decay = min_steps, ema_decay

    def on_train_begin(self, trainer) -> None:
        self.cosine.clock.restart()
        state = trainer.state
        if state.annealing is None and (
            self.cosine.clock.budget_seconds is None or self.planned_steps < self.min_steps
        ):
            self._decide(trainer, self.planned_steps)
        if state.annealing:
            self.cosine.apply(trainer)

    def on_step_end(self, trainer, step_seconds: float) -> None:
        if trainer.state.annealing:
            self.cosine.apply(trainer)

    def on_epoch_end(self, trainer, row: dict, improved: bool) -> None:
        if trainer.state.annealing is None:
            self._decide(trainer, self.projected_steps(trainer))

    def projected_steps(self, trainer) -> float:
        """Steps the run will make at this run's pace so far (validation included)."""
        done = trainer.state.total_steps - trainer.steps_at_start
        clock = self.cosine.clock
        elapsed = clock.elapsed()
        more = (clock.budget_seconds - elapsed) * done / max(elapsed, 1e-9)
        projected = min(self.planned_steps, trainer.state.total_steps + max(0.0, more))
        return trainer.ranks.mean(projected)  # every rank must decide alike

    def _decide(self, trainer, steps: float) -> None:
        state = trainer.state
        state.annealing = steps >= self.min_steps
        state.anneal_from_step = state.total_steps if state.annealing else None
        if state.annealing and self.ema_decay and state.ema is None:
            trainer.start_ema(self.ema_decay)
        if state.annealing:
            average = f" and --ema {self.ema_decay:g}" if self.ema_decay else ""
            plan = f"cosine from step {state.total_steps}{average}"
        else:
            plan = f"a constant rate (annealing needs {self.min_steps} steps)"
        log.info("--lr-schedule auto: about %d steps in this run: %s", steps, plan)


class EarlyStopping(Hook):
    """Stop after ``patience`` epochs without a better validation score."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, trainer, row: dict, improved: bool) -> str | None:
        if self.patience and trainer.state.bad_epochs >= self.patience:
            return "early_stopping"
        return None


class Checkpointing(Hook):
    """The best model (config.json + model.pt), ``checkpoint_best.pt`` and ``checkpoint_last.pt``.

    Saved after every epoch, and once more when a signal stopped the run
    mid-epoch (so ``--resume`` continues from that very step). The state is
    captured on every rank (a collective under DDP); rank 0 writes.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)

    def _save_model(self, trainer, training: dict) -> None:
        from cryocaps.modelfile import save_model

        found = (trainer.state.unannotated or {}).get("classes", {})
        shares = {name: r["annotated_share"] for name, r in found.items() if r["partial"]}
        metadata = model_metadata(trainer.config, trainer.data, training, shares)
        thresholds = trainer.state.best_thresholds
        if thresholds is not None:
            metadata["pick_thresholds"] = {
                "calibrated_on": trainer.data.holdout.description,
                "epoch": trainer.state.best_epoch,
                **thresholds,
            }
        save_model(self.out_dir, trainer.judged_model, metadata)

    def on_epoch_end(self, trainer, row: dict, improved: bool) -> None:
        state = trainer.state
        if improved:
            state.model_saved = True
        checkpoint = trainer.checkpoint()
        if not trainer.ranks.is_main:
            return
        if improved:
            names = trainer.data.classes.names
            training = {
                "epoch": state.best_epoch,
                "val_loss": state.best_val_loss,
                "dice": {name: row[f"dice_{name}"] for name in names},
                "validation": state.best_regions,
            }
            self._save_model(trainer, training)
            save_checkpoint(self.out_dir / BEST_CHECKPOINT, checkpoint)
        save_checkpoint(self.out_dir / LAST_CHECKPOINT, checkpoint)

    def on_train_end(self, trainer) -> None:
        state = trainer.state
        if trainer.stopped not in STOPPED_MID_EPOCH or state.step_in_epoch == 0:
            return
        first_model = not state.model_saved
        state.model_saved = True
        checkpoint = trainer.checkpoint()
        if trainer.ranks.is_main:
            if first_model:
                note = "stopped before the first validation; last weights"
                self._save_model(trainer, {"epoch": None, "note": note})
            save_checkpoint(self.out_dir / LAST_CHECKPOINT, checkpoint)


class MetricsWriter(Hook):
    """``metrics.csv`` (a row per epoch) and ``learning_curve.png``, rewritten after every epoch."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)

    def on_epoch_end(self, trainer, row: dict, improved: bool) -> None:
        write_metrics(self.out_dir, trainer.state.rows)


def write_metrics(out_dir: Path, rows: list[dict]) -> None:
    """Write ``metrics.csv`` and redraw the learning curve (a plotting failure only warns)."""
    import pandas as pd

    from cryocaps.io.files import write_text_atomic

    frame = pd.DataFrame(rows)
    write_text_atomic(out_dir / METRICS_NAME, frame.to_csv(index=False, float_format="%.6g"))
    try:
        from cryocaps.plots import plot_learning_curve

        plot_learning_curve(frame, out_dir / CURVE_NAME)
    except Exception as error:  # noqa: BLE001 - a plotting failure must not lose the run
        log.warning("could not draw %s: %s", CURVE_NAME, error)
