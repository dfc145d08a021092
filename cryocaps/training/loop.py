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
from cryocaps.training.mining import MineFalsePositives
from cryocaps.training.ranks import Ranks
from cryocaps.training.sampling import validation_locations
from cryocaps.training.validation import mean_dice, selection_score, validate

log = logging.getLogger(__name__)


def _driven(**kwargs):
    """A field holding an object the loop drives, saved and restored through its state_dict."""
    if "default_factory" not in kwargs:
        kwargs["default"] = None
    return field(metadata={"state_dict": True}, **kwargs)


# TrainState fields a checkpoint of the same format may lack
ADDED_LATER = ("ema", "annealing", "anneal_from_step", "ema_decay")


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
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_seconds: float = 0.0  # time already spent in the unfinished epoch
    train_seconds: float = 0.0  # time spent in training steps, over all runs
    rows: list[dict] = field(default_factory=list)  # metrics.csv, one row per finished epoch
    best_score: float = -math.inf  # higher is better: mean Dice, or minus the loss
    best_val_loss: float = math.inf  # of the best epoch
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one
    model_saved: bool = False
    annealing: bool | None = None  # --lr-schedule auto: decided to anneal (None: not yet)
    anneal_from_step: int | None = None
    ema_decay: float = 0.0  # of the weight average in ``ema`` (0: none)
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


class Trainer:
    """Runs epochs of steps on ``state``, validates, and calls the hooks at each point.

    ``state`` (:class:`TrainState`) is everything a resumed run continues from.
    The few other attributes that change belong to this run only, on purpose:
    ``stopped`` (why it ended), ``val_seconds`` (the last validation's duration,
    for the time budget) and the step and time counters at its start.
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
        self.val_locations = validation_locations(
            data.volumes,
            data.val_particles,
            data.val_volumes,
            config.patch_size,
            background_fraction=config.background_fraction,
            max_patches=config.max_val_patches,
            seed=config.seed,
        )
        self.class_weights = None
        if config.class_weights:
            self.class_weights = class_weights(data, config).to(device)
        self.loss_module = _loss_module(model, device, ranks)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        is_cuda = runtime.device_type(device) == "cuda"
        self.bf16 = runtime.use_bf16(device, config.bf16)
        self.state = TrainState(
            model=model,
            optimizer=optimizer,
            scheduler=_make_scheduler(optimizer, config),
            scaler=torch.amp.GradScaler("cuda", enabled=is_cuda),
            sampler_streams=SamplerStreams(self.sampler, ranks),
        )
        self.start_ema(ema_decay(config, annealing=config.lr_schedule == "cosine"))
        self.identity = run_identity(config, model, data)
        self.stopped = "completed"
        self.val_seconds = 0.0  # the last validation's duration (0: none timed yet)
        self.steps_at_start, self.train_seconds_at_start = 0, 0.0

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
        state.scaler.step(state.optimizer)
        state.scaler.update()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise CryocapsError(
                f"training diverged (loss {loss_value}) at epoch {state.epoch + 1}; "
                "try a lower --lr"
            )
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
        val_start = time.time()
        val_loss, dice = validate(
            self.judged_model,
            self.val_locations,
            self.data.volumes,
            config.patch_size,
            config.batch_size,
            self.class_weights,
            self.device,
            self.autocast,
            self.ranks,
            self.data.classes.n_labels,
        )
        self.val_seconds = time.time() - val_start
        row = self._epoch_row(val_loss, dice, epoch_start)
        state.rows.append(row)
        score = selection_score(config.select_by, val_loss, row["mean_dice"])
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_val_loss = score, val_loss
            state.best_epoch, state.bad_epochs = state.epoch + 1, 0
        else:
            state.bad_epochs += 1
        if state.scheduler is not None:  # plateau; cosine is a per-step hook
            state.scheduler.step(val_loss)
        state.epoch += 1
        state.step_in_epoch, state.epoch_loss_sum, state.epoch_loss_count = 0, 0.0, 0
        state.epoch_seconds = 0.0
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, mean Dice %.3f%s",
            state.epoch,
            row["train_loss"],
            val_loss,
            row["mean_dice"],
            " (best)" if improved else "",
        )
        for hook in hooks:
            reason = hook.on_epoch_end(self, row, improved)
            if reason is not None and self.stopped == "completed":
                self.stopped = reason

    def _epoch_row(self, val_loss: float, dice: list[float], epoch_start: float) -> dict:
        """The epoch's metrics.csv row (the train loss is averaged over the ranks)."""
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
        row |= {"mean_dice": mean_dice(class_dice), "lr": state.optimizer.param_groups[0]["lr"]}
        row |= {"seconds": time.time() - epoch_start, "elapsed_seconds": time.time() - self.started}
        return row

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
            "steps_this_run": steps_this_run,
            "seconds": time.time() - self.started,
            "seconds_per_step": run_train_seconds / done_this_run,
            "samples_per_second": done_this_run
            * config.batch_size
            * self.ranks.world_size
            / max(run_train_seconds, 1e-9),
            "lr_schedule": _schedule_used(config.lr_schedule, state),
            "annealed_from_step": state.anneal_from_step,
            "ema": state.ema_decay or None,
            "best_epoch": state.best_epoch,
            "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
            "best_dice": {n: best_row[f"dice_{n}"] for n in names} if best_row else {},
            "best_mean_dice": best_row["mean_dice"] if best_row else None,
            "n_train_particles": data.train_particles.counts(),
            "n_val_particles": data.val_particles.counts(),
            "n_val_patches": len(self.val_locations),
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
    if config.lr_schedule == "cosine":
        total_steps = config.epochs * config.steps_per_epoch
        hooks.append(loop_hooks.CosineSchedule(config.lr, total_steps, config.max_minutes))
    elif config.lr_schedule == "auto":
        # a decay given with --ema has averaged from the start; auto starts when annealing does
        average = ema_decay(config, annealing=True)
        hooks.append(loop_hooks.AutoRecipe(config, AUTO_ANNEAL_MIN_STEPS, average))
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
    # on every rank, so that all fail together
    check_run_folder(config.out_dir, config.resume, config.overwrite)
    checkpoint = load_checkpoint(config.out_dir / LAST_CHECKPOINT) if config.resume else None

    data = prepare_data(config)
    runtime.seed_everything(config.seed)
    model = _create_model(config, data.classes.n_labels)
    if checkpoint is not None:
        check_resumable(
            checkpoint,
            f"--resume {config.out_dir / LAST_CHECKPOINT}",
            run_identity(config, model, data),
        )
    elif config.overwrite and ranks.is_main:
        clear_run_folder(config.out_dir)
    model.to(device)
    trainer = Trainer(config, data, model, device, ranks, started)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    trainer.run(default_hooks(config, ranks, progress))
    result = trainer.summary()
    data.close()
    ranks.barrier()
    return result


def _create_model(config: TrainConfig, n_labels: int):
    """The network by name, its options checked (CryocapsError names the flag)."""
    from cryocaps.models import create_model

    try:
        model = create_model(config.model, n_labels, **config.model_options)
    except TypeError as error:
        raise CryocapsError(f"--model-option: {error}") from None
    if config.patch_size % model.size_multiple:
        raise CryocapsError(
            f"--patch-size {config.patch_size}: must be a multiple of {model.size_multiple} "
            f"for {config.model}"
        )
    return model


def _loss_module(model, device: str, ranks: Ranks):
    """``model.compute_loss`` as a module's forward, so DistributedDataParallel syncs gradients."""
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images, labels, class_weights):
            return self.inner.compute_loss(images, labels, class_weights)

    module = LossModule(model)
    if not ranks.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index] if runtime.device_type(device) == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def _schedule_used(asked: str, state: TrainState) -> str:
    """The schedule that ran: ``--lr-schedule`` with auto resolved (auto: none or cosine)."""
    if asked != "auto":
        return asked
    return "cosine" if state.annealing else "none"


def _make_scheduler(optimizer, config: TrainConfig):
    import torch

    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=max(1, config.patience // 3)
        )
    return None
