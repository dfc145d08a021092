"""The training loop: a :class:`Trainer` whose whole mutable state is one :class:`TrainState`.

``train(TrainConfig(...))`` reads the data, builds the network and runs the
loop: every epoch it validates (loss and per-class Dice on fixed patches) and
calls its hooks (:mod:`cryocaps.training.hooks`), which append to
``metrics.csv``, redraw ``learning_curve.png``, save the best model
(``config.json`` + ``model.pt``, loadable by ``segment``) and write
``checkpoint_last.pt`` / ``checkpoint_best.pt``. A checkpoint is the
:class:`TrainState`, so ``resume`` restores every field the loop changes.
SIGINT/SIGTERM stop after the current step with a checkpoint; ``max_minutes``
ends the current epoch early so its weights are validated. Under ``torchrun``
(WORLD_SIZE > 1) it runs DistributedDataParallel, each process with its own
sampler stream; only rank 0 writes files.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cryocaps import runtime
from cryocaps.errors import CryocapsError
from cryocaps.training import hooks as loop_hooks
from cryocaps.training.build import create_model, loss_module, make_scheduler, schedule_used
from cryocaps.training.checkpoint import (
    CHECKPOINT_FORMAT,
    LAST_CHECKPOINT,
    ProcessRng,
    SamplerStreams,
    check_resumable,
    check_run_folder,
    clear_run_folder,
    load_checkpoint,
    run_identity,
)
from cryocaps.training.config import (
    AUTO_ANNEAL_MIN_STEPS,
    AUTO_EMA_DECAY,
    TrainConfig,
    check_settings,
    ema_decay,
)
from cryocaps.training.data import TrainingData, class_weights, prepare_data, training_sampler
from cryocaps.training.deadstart import DeadNetwork, DeadStartCheck, fresh_start
from cryocaps.training.guard import GradientGuard
from cryocaps.training.mining import MineFalsePositives
from cryocaps.training.ranks import Ranks
from cryocaps.training.unannotated import LabelUnannotated, unannotated_summary
from cryocaps.training.validation import Validator, mean_dice, region_interval, selection_score

log = logging.getLogger(__name__)


def _driven(**kwargs):
    """A field holding an object the loop drives, saved and restored through its state_dict."""
    if "default_factory" not in kwargs:
        kwargs["default"] = None
    return field(metadata={"state_dict": True}, **kwargs)


# TrainState fields a checkpoint of the same format may lack
ADDED_LATER = (
    "ema",
    "annealing",
    "anneal_from_step",
    "ema_decay",
    "best_thresholds",
    "best_regions",
    "region_interval",
    "last_region_epoch",
    "skipped_steps",
    "unannotated",
)


@dataclass
class TrainState:
    """Everything the loop changes: a checkpoint is :meth:`state_dict`; resuming, its inverse.

    Plain fields are saved as they are; ``_driven`` fields (the network, the
    optimiser, the generators...) through their ``state_dict()``. Both
    directions walk the dataclass fields, so a new field is saved and restored
    without more code.
    """

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # steps done in the unfinished epoch
    total_steps: int = 0
    skipped_steps: int | None = 0  # steps whose gradients were not finite (no update)
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_seconds: float = 0.0  # time already spent in the unfinished epoch
    train_seconds: float = 0.0  # time spent in training steps, over all runs
    rows: list[dict] = field(default_factory=list)  # metrics.csv, one row per finished epoch
    best_score: list | None = None  # validation.selection_score of the best epoch (None: none)
    best_val_loss: float = math.inf  # of the best epoch
    best_epoch: int = 0
    bad_epochs: int = 0  # validations with a score since the best one
    best_thresholds: dict | None = None  # pick-score thresholds tuned on the best epoch's picks
    best_regions: dict | None = None  # the best epoch's region validation (metrics.csv entries)
    region_interval: float | None = None  # --val-every auto: epochs between region validations
    last_region_epoch: int = 0  # the epoch of the last region validation
    model_saved: bool = False
    annealing: bool | None = None  # --lr-schedule auto: decided to anneal (None: not yet)
    anneal_from_step: int | None = None
    ema_decay: float = 0.0  # of the weight average in ``ema`` (0: none)
    unannotated: dict | None = None  # --unannotated auto: what the look found (None: not yet)
    model: Any = _driven()
    optimizer: Any = _driven()
    scheduler: Any = _driven()  # only for --lr-schedule plateau
    ema: Any = _driven()  # --ema: the weights' moving average (validated and saved), else None
    scaler: Any = _driven()  # CUDA float16 gradient scaler (disabled elsewhere)
    sampler_streams: Any = _driven()  # the patch samplers' generators, every rank's
    process_rng: Any = _driven(default_factory=ProcessRng)

    def state_dict(self) -> dict:
        saved = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.metadata.get("state_dict"):
                value = value.state_dict() if value is not None else None
            saved[item.name] = value
        return saved

    def load_state_dict(self, saved: dict) -> None:
        saved = {name: None for name in ADDED_LATER} | saved  # older checkpoints lack them
        missing = [item.name for item in fields(self) if item.name not in saved]
        if missing:
            raise CryocapsError(f"--resume: the checkpoint lacks {', '.join(missing)}")
        for item in fields(self):
            value = saved[item.name]
            if not item.metadata.get("state_dict"):
                setattr(self, item.name, copy.deepcopy(value))
            elif getattr(self, item.name) is not None and value:  # None/{}: nothing was saved
                getattr(self, item.name).load_state_dict(value)
        if isinstance(self.best_score, float):  # written before scores became lists
            self.best_score = [self.best_score] if math.isfinite(self.best_score) else None


class Trainer:
    """Runs epochs of steps on ``state``, validates, and calls the hooks at each point.

    ``state`` (:class:`TrainState`) is everything a resumed run continues from.
    The few other attributes that change belong to this run only, on purpose:
    ``stopped`` (why it ended), the ``validator``'s timings (for the time budget)
    and the step and time counters at its start.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: TrainingData,
        model,
        device: str,
        ranks: Ranks,
        started: float | None = None,
    ):
        import torch

        self.config, self.data, self.device, self.ranks = config, data, device, ranks
        self.started = time.time() if started is None else started
        self.sampler = training_sampler(data, config, [config.seed, ranks.rank])
        self.class_weights = None
        if config.class_weights:
            self.class_weights = class_weights(data, config).to(device)
        self.bf16 = runtime.use_bf16(device, config.bf16)
        self.validator = Validator(data, config, self.class_weights, device, self.bf16, ranks)
        self.loss_module = loss_module(model, device, ranks)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        is_cuda = runtime.device_type(device) == "cuda"
        self.state = TrainState(
            model=model,
            optimizer=optimizer,
            scheduler=make_scheduler(optimizer, config),
            scaler=torch.amp.GradScaler("cuda", enabled=is_cuda),
            sampler_streams=SamplerStreams(self.sampler, ranks),
        )
        self.start_ema(ema_decay(config, annealing=config.lr_schedule == "cosine"))
        self.identity = run_identity(config, model, data)
        self.stopped = "completed"
        self.steps_at_start, self.train_seconds_at_start = 0, 0.0
        self.guard = GradientGuard()  # no update from gradients that are not finite

    def autocast(self):
        return runtime.autocast(self.device, self.bf16)

    @property
    def judged_model(self):
        """The weights validation judges and the saved model holds: the average with --ema."""
        return self.state.model if self.state.ema is None else self.state.ema.module

    def start_ema(self, decay: float) -> None:
        """Average the weights from now on (``--ema``; 0: no average)."""
        if decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            average = get_ema_multi_avg_fn(decay)
            self.state.ema = AveragedModel(self.state.model, multi_avg_fn=average, use_buffers=True)
            self.state.ema_decay = decay

    # --- checkpoints ------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """The checkpoint of this moment (a collective under DDP: every rank calls it)."""
        return {
            "format": CHECKPOINT_FORMAT,
            **self.identity,
            "world_size": self.ranks.world_size,
            "seed": self.config.seed,
            "state": self.state.state_dict(),
        }

    def restore(self, checkpoint: dict) -> None:
        """Continue from ``checkpoint`` (checked by :func:`.checkpoint.check_resumable` first)."""
        saved = checkpoint["state"]
        if saved.get("ema") and self.state.ema is None:  # started by --lr-schedule auto
            self.start_ema(saved.get("ema_decay") or AUTO_EMA_DECAY)
        self.state.load_state_dict(saved)
        self.steps_at_start = self.state.total_steps
        self.train_seconds_at_start = self.state.train_seconds
        log.info("resuming at epoch %d step %d", self.state.epoch + 1, self.state.step_in_epoch)

    # --- the loop ---------------------------------------------------------------------
    def run(self, hooks: list[loop_hooks.Hook]) -> str:
        """Train until the last epoch or a stop; returns why it stopped."""
        state, config = self.state, self.config
        state.model.train()
        try:
            for hook in hooks:
                hook.on_train_begin(self)
            while state.epoch < config.epochs:
                epoch_start = time.time() - state.epoch_seconds
                reason = self._train_epoch(hooks)
                if reason is not None:
                    self.stopped = reason
                if state.step_in_epoch < config.steps_per_epoch and reason != "max_minutes":
                    # a signal mid-epoch: checkpointed at the end (resume continues this step)
                    state.epoch_seconds = time.time() - epoch_start
                    break
                self._end_epoch(hooks, epoch_start)
                if self.stopped != "completed":
                    break
            for hook in hooks:
                hook.on_train_end(self)
        finally:
            for hook in hooks:
                hook.close()
        return self.stopped

    def _train_epoch(self, hooks) -> str | None:
        """Steps until the epoch ends or a hook asks to stop (the reason all ranks agree on)."""
        while self.state.step_in_epoch < self.config.steps_per_epoch:
            step_seconds = self._step()
            reasons = [hook.on_step_end(self, step_seconds) for hook in hooks]
            reason = self.ranks.agree_on_stop(next((r for r in reasons if r is not None), None))
            if reason is not None:
                return reason
        return None

    def _step(self) -> float:
        """One optimiser step on a fresh batch; returns its duration in seconds."""
        import torch

        state, config = self.state, self.config
        step_start = time.time()
        images, labels = self.sampler.sample(config.batch_size)
        images_t = torch.from_numpy(images).to(self.device, non_blocking=True)
        labels_t = torch.from_numpy(labels).to(self.device, non_blocking=True)
        state.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, _parts = self.loss_module(images_t, labels_t, self.class_weights)
        state.scaler.scale(loss).backward()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise CryocapsError(
                f"training diverged (loss {loss_value}) at epoch {state.epoch + 1}; "
                "try a lower --lr"
            )
        if state.scaler.is_enabled() or self.guard.allows_update(state):  # a scaler checks
            state.scaler.step(state.optimizer)
            state.scaler.update()
            if state.ema is not None:
                state.ema.update_parameters(state.model)
        state.epoch_loss_sum += loss_value
        state.epoch_loss_count += 1
        state.step_in_epoch += 1
        state.total_steps += 1
        step_seconds = time.time() - step_start
        state.train_seconds += step_seconds
        return step_seconds

    def _end_epoch(self, hooks, epoch_start: float) -> None:
        """Validate, record the epoch's row, update the best model and schedule, call the hooks."""
        state, config = self.state, self.config
        train_seconds = time.time() - epoch_start
        val_loss, dice = self.validator.patches(self.judged_model, self.autocast)
        row = self._epoch_row(val_loss, dice)
        regions = None
        if self._regions_due() or (
            config.select_by != "f1" and self._beats_best(row)  # its thresholds go with it
        ):
            regions = self._validate_regions(train_seconds)
        row |= regions.metrics if regions else dict.fromkeys(self._region_columns(), math.nan)
        row |= {
            "val_seconds": time.time() - epoch_start - train_seconds,
            "lr": state.optimizer.param_groups[0]["lr"],
            "seconds": time.time() - epoch_start,
            "elapsed_seconds": time.time() - self.started,
        }
        state.rows.append(row)
        score = selection_score(config.select_by, row)
        improved = self._beats_best(row)
        if improved:
            state.best_score, state.best_val_loss = score, val_loss
            state.best_epoch, state.bad_epochs = state.epoch + 1, 0
            state.best_thresholds = regions.thresholds
            state.best_regions = regions.metrics_for_json()
        elif score is not None:
            state.bad_epochs += 1
        if state.scheduler is not None:  # plateau; cosine is a per-step hook
            state.scheduler.step(val_loss)
        state.epoch += 1
        state.step_in_epoch, state.epoch_loss_sum, state.epoch_loss_count = 0, 0.0, 0
        state.epoch_seconds = 0.0
        region_text = f", val macro F1 {row['val_macro_f1']:.3f}" if regions else ""
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, mean Dice %.3f%s%s",
            state.epoch,
            row["train_loss"],
            val_loss,
            row["mean_dice"],
            region_text,
            " (best)" if improved else "",
        )
        for hook in hooks:
            reason = hook.on_epoch_end(self, row, improved)
            if reason is not None and self.stopped == "completed":
                self.stopped = reason

    def _beats_best(self, row: dict) -> bool:
        score = selection_score(self.config.select_by, row)
        return score is not None and (
            self.state.best_score is None or score > self.state.best_score
        )

    def _regions_due(self) -> bool:
        """Validate the whole regions this epoch: every --val-every epochs and the last (auto:
        the first, to time it, then as often as keeps them to their share of the time)."""
        state, config = self.state, self.config
        last = state.epoch + 1 >= config.epochs or self.stopped != "completed"
        every = config.val_every or math.ceil((state.region_interval or 1.0) - 1e-9)
        return last or state.epoch + 1 - state.last_region_epoch >= every

    def _validate_regions(self, train_seconds: float):
        scores = self.validator.whole_regions(self.judged_model)
        self.state.last_region_epoch = self.state.epoch + 1
        if self.config.val_every is None:
            interval = region_interval(self.validator.region_seconds, train_seconds)
            self.state.region_interval = self.ranks.mean(interval)
        return scores

    def _region_columns(self) -> list[str]:
        names = self.data.classes.names
        per_class = [
            f"val_{key}_{name}"
            for name in names
            for key in ("precision", "recall", "f1", "background_share")
        ]
        return [*per_class, "val_macro_f1", "val_background_share", "val_picks"]

    def _epoch_row(self, val_loss: float, dice: list[float]) -> dict:
        """The epoch's metrics.csv row so far (the train loss is averaged over the ranks)."""
        state = self.state
        classes = self.data.classes
        class_dice = [dice[c.label] for c in classes]
        row = {
            "epoch": state.epoch + 1,
            "steps": state.step_in_epoch,
            "train_loss": self.ranks.mean(state.epoch_loss_sum / max(1, state.epoch_loss_count)),
            "val_loss": val_loss,
        }
        row |= {f"dice_{name}": d for name, d in zip(classes.names, class_dice, strict=True)}
        return row | {"mean_dice": mean_dice(class_dice)}

    def summary(self) -> dict:
        """The run in numbers (written to run.json by the CLI)."""
        state, config, data = self.state, self.config, self.data
        steps_this_run = state.total_steps - self.steps_at_start
        done_this_run = max(1, steps_this_run)
        run_train_seconds = state.train_seconds - self.train_seconds_at_start
        best_row = next((r for r in state.rows if r["epoch"] == state.best_epoch), None)
        names = data.classes.names
        return {
            "out_dir": str(config.out_dir),
            "model": config.model,
            "device": self.device,
            "bf16": self.bf16,
            "world_size": self.ranks.world_size,
            "stopped": self.stopped,
            "epochs_done": state.epoch,
            "steps_in_partial_epoch": state.step_in_epoch,
            "steps_done": state.total_steps,
            "steps_skipped": state.skipped_steps or 0,
            "steps_this_run": steps_this_run,
            "seconds": time.time() - self.started,
            "seconds_per_step": run_train_seconds / done_this_run,
            "samples_per_second": done_this_run
            * config.batch_size
            * self.ranks.world_size
            / max(run_train_seconds, 1e-9),
            "lr_schedule": schedule_used(config.lr_schedule, state),
            "annealed_from_step": state.anneal_from_step,
            "ema": state.ema_decay or None,
            "best_epoch": state.best_epoch,
            "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
            "best_dice": {n: best_row[f"dice_{n}"] for n in names} if best_row else {},
            "best_mean_dice": best_row["mean_dice"] if best_row else None,
            "n_train_particles": data.train_particles.counts(),
            "n_val_particles": data.val_particles.counts(),
            "n_val_patches": len(self.validator.locations),
            "validation": self.validator.summary(state),
            "best_validation": state.best_regions,
            "pick_thresholds": state.best_thresholds,
            "unannotated": unannotated_summary(state.unannotated),
            "class_weights": None if self.class_weights is None else self.class_weights.tolist(),
            "history": state.rows,
            "inputs": [str(p) for p in data.inputs],
            "rank": self.ranks.rank,
        }


def default_hooks(config: TrainConfig, ranks: Ranks, progress: Callable[..., None] | None) -> list:
    """The loop features a run uses, in calling order (progress first: it may raise a signal)."""
    hooks: list[loop_hooks.Hook] = []
    if progress is not None and ranks.is_main:
        hooks.append(loop_hooks.ProgressReport(progress))
    hooks.append(loop_hooks.StopOnSignal())
    if config.max_minutes:
        hooks.append(loop_hooks.TimeBudget(config.max_minutes))
    hooks.append(DeadStartCheck())  # before anything records the epoch
    if config.lr_schedule == "cosine":
        total_steps = config.epochs * config.steps_per_epoch
        hooks.append(loop_hooks.CosineSchedule(config.lr, total_steps, config.max_minutes))
    elif config.lr_schedule == "auto":
        # a decay given with --ema has averaged from the start; auto starts when annealing does
        average = ema_decay(config, annealing=True)
        hooks.append(loop_hooks.AutoRecipe(config, AUTO_ANNEAL_MIN_STEPS, average))
    if config.unannotated == "auto":  # before mining and Checkpointing: both see its places
        hooks.append(LabelUnannotated(config.max_minutes))
    if config.mined_negative_fraction > 0:  # before Checkpointing: checkpoints keep the places
        hooks.append(MineFalsePositives())
    hooks.append(loop_hooks.EarlyStopping(config.patience))
    hooks.append(loop_hooks.Checkpointing(config.out_dir))
    if ranks.is_main:
        hooks.append(loop_hooks.MetricsWriter(config.out_dir))
    return hooks


def train(config: TrainConfig, progress: Callable[..., None] | None = None) -> dict:
    """Train a segmentation network; returns a summary dict (the CLI writes it to ``run.json``).

    ``progress(n=1, info=str, total=None)`` is called after every step (rank 0 only).
    """
    started = time.time()
    config.out_dir = Path(config.out_dir)
    device = runtime.resolve_device(config.device)
    ranks = Ranks(runtime.setup_distributed(device))
    if runtime.device_type(device) == "cpu":
        runtime.configure_threads(config.threads, ranks.dist.local_world_size)
    runtime.tune_process_for("train", device)  # the same large tensors every step: keep them mapped
    check_settings(config)
    check_run_folder(config.out_dir, config.resume, config.overwrite)  # every rank: all fail
    checkpoint = load_checkpoint(config.out_dir / LAST_CHECKPOINT) if config.resume else None
    data, restarts = prepare_data(config), []
    while True:
        runtime.seed_everything(config.seed)
        model = create_model(config, data.classes.n_labels)
        if checkpoint is not None:
            identity = run_identity(config, model, data)
            check_resumable(checkpoint, f"--resume {config.out_dir / LAST_CHECKPOINT}", identity)
        elif (config.overwrite or restarts) and ranks.is_main:
            clear_run_folder(config.out_dir)
        trainer = Trainer(config, data, model.to(device), device, ranks, started)
        if checkpoint is not None:
            trainer.restore(checkpoint)
        try:
            trainer.run(default_hooks(config, ranks, progress))
            break
        except DeadNetwork as dead:  # never learns: fresh weights, another seed
            config, checkpoint = fresh_start(config, dead, started, restarts), None
            ranks.barrier()
    result = trainer.summary() | {"dead_starts": restarts, "seed_used": config.seed}
    data.close()
    ranks.barrier()
    return result
