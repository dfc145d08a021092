"""The settings of a training run: :class:`TrainConfig` (the one source of defaults), their checks.

The CLI reads its defaults from :func:`defaults`, so ``cryocaps train --help``
and the library cannot disagree. The paper's settings are in :data:`PAPER`.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from cryocaps.errors import CryocapsError

LR_SCHEDULES = ("auto", "none", "cosine", "plateau")
# --lr-schedule auto: anneal (cosine + a weight average) only in runs of at least this many
# steps. Measured with 3D-UCaps (benchmarks/RESULTS.md, levers table): cosine + EMA 0.99 won at
# 700, 800 and 1841 steps on two differently simulated sets and lost at the demo's ~250 steps;
# 500 lies between (the crossover itself was not measured).
AUTO_ANNEAL_MIN_STEPS = 500
AUTO_EMA_DECAY = 0.99  # --ema auto, when the rate anneals
SELECTION_SCORES = ("f1", "dice", "loss")
UNANNOTATED_CHOICES = ("auto", "keep")  # train --unannotated
# --val-every auto: validate the held-out regions as often as keeps them to about this share of
# the run's time (measured after each region validation; see validation.region_interval)
VAL_TIME_SHARE = 0.15
# The automatic patch side (data.auto_patch_size): 2 x largest radius + context, rounded up.
AUTO_PATCH_MIN = 32
AUTO_PATCH_MULTIPLE = 8  # fits both networks (unet 4, ucaps 8)
AUTO_PATCH_CONTEXT = 8  # voxels of context around the largest particle (4 per side)
PAPER = {"lr": 1e-4, "batch_size": 24, "patch_size": 64, "val_fraction": 0.17, "optimizer": "Adam"}


@dataclass
class TrainConfig:
    """Everything a training run needs. Paths may be files or folders of MRC files.

    Defaults are chosen for minutes-long runs on a CPU workstation; the paper's
    values are in ``PAPER`` (Adam lr 1e-4, batch 24, 64³ patches). Measured on
    2 shared CPU cores, U-Net, 3 simulated classes, Dice on a held-out
    tomogram: lr 1e-3 beat 1e-4 after 120 steps (0.45 vs 0.30); 32³ patches beat
    48³ in the same 15 minutes (0.40 vs 0.12; a 48³ step costs ~3.5x); batch 2
    beat batch 8 in the same 10 minutes (0.57 vs 0.51).
    """

    tomograms: list[Path]
    labels: list[Path]
    out_dir: Path
    classes: Path | None = None  # default: classes.csv beside the label maps (or one folder up)
    # particle files giving the patch centres; default: the label maps' connected components
    coords: list[Path] = field(default_factory=list)
    model: str = "ucaps"
    model_options: dict = field(default_factory=dict)
    patch_size: int | None = None  # None: auto_patch_size (32, more for large particles)
    batch_size: int = 2  # per process
    epochs: int = 300
    steps_per_epoch: int = 100
    lr: float = 1e-3
    # "auto": constant, or cosine + ema from AUTO_ANNEAL_MIN_STEPS steps (hooks.AutoRecipe)
    lr_schedule: str = "auto"
    # decay of the weights' moving average; 0 = off; "auto": AUTO_EMA_DECAY when the rate anneals
    ema: float | str = "auto"
    patience: int = 20  # validations without a better score (--select-by); 0 = never stop early
    # best model: highest particle-level macro F1 on the held-out regions ("f1"; ties: less
    # background taken, then lower loss), highest mean patch Dice ("dice") or lowest loss
    select_by: str = "f1"
    val_fraction: float = 0.17  # of each tomogram's longer in-plane axis, held out as a slab
    val_every: int | None = None  # epochs between region validations; None: auto (VAL_TIME_SHARE)
    max_val_voxels: int = 8_000_000  # held-out voxels segmented per validation, at most
    val_tomograms: list[str] = field(default_factory=list)
    fold: str | None = None  # "k/K"
    background_fraction: float = 0.3
    hard_negative_fraction: float = 0.5  # of the background patches, share on hard negatives
    # of the background patches, share on the network's false positives mined between epochs;
    # measured (benchmarks/RESULTS.md, "Background sampling"): 0.5 lifted U-Net macro F1 from
    # 0.858 to 0.883 and 0.896 in two runs, the small class's precision from 0.73 to 0.92-0.96
    mined_negative_fraction: float = 0.5
    # "auto": once 40% of the run is done, particles the network finds where a partly annotated
    # class's label maps say background become unknown (training/unannotated.py); "keep": no.
    # Default: on the benchmark family's five draws at 30% annotated (U-Net) macro F1 0.75 mean
    # / 0.49 worst against 0.67 / 0.42 with "keep"; every fully annotated run (U-Net draws 0-4,
    # 3D-UCaps 0 and 3) was judged complete. Not before 200 steps (unannotated.MIN_LOOK_STEPS):
    # the demo's 100-step run had looked with a weak network (RESULTS.md, README).
    unannotated: str = "auto"
    jitter_voxels: int | None = None  # default: patch_size // 4
    rot90: bool = False
    mirror: bool = False
    intensity_augmentation: bool = True
    max_val_patches: int = 64
    class_weights: bool = True
    # weights (median freq / freq) ** power: 1 = median-frequency balancing, 0.5 its square root
    class_weight_power: float = 1.0
    max_minutes: float | None = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    bf16: bool | None = None  # None: on where the CPU computes bfloat16 natively
    voxel_size_angstrom: float | None = None
    threads: int | None = None  # torch threads per process; default: CPUs / local processes


def defaults() -> dict:
    """``{setting: default}`` of every :class:`TrainConfig` field that has one (for the CLI)."""
    values = {}
    for item in fields(TrainConfig):
        if item.default is not MISSING:
            values[item.name] = item.default
        elif item.default_factory is not MISSING:
            values[item.name] = item.default_factory()
    return values


def parse_fold(text: str | None) -> tuple[int, int] | None:
    """``"k/K"`` -> ``(k, K)`` (k 1-based), None for None; CryocapsError when malformed."""
    if text is None:
        return None
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise CryocapsError(f"--fold {text!r}: expected k/K, e.g. 1/6") from None
    if not (n >= 2 and 1 <= k <= n):
        raise CryocapsError(f"--fold {text!r}: need K >= 2 and 1 <= k <= K")
    return k, n


def check_settings(config: TrainConfig) -> None:
    """Refuse settings out of range, naming the flag and the value (CryocapsError)."""
    c = config
    checks = [
        (
            c.patch_size is None or c.patch_size >= 8,
            f"--patch-size {c.patch_size}: must be >= 8 voxels",
        ),
        (c.batch_size >= 1, f"--batch-size {c.batch_size}: must be >= 1"),
        (c.epochs >= 1, f"--epochs {c.epochs}: must be >= 1"),
        (c.steps_per_epoch >= 1, f"--steps-per-epoch {c.steps_per_epoch}: must be >= 1"),
        (0 < c.lr < float("inf"), f"--lr {c.lr}: must be a finite number > 0"),
        (
            0 <= c.background_fraction < 1,
            f"--background-fraction {c.background_fraction}: must be in [0, 1)",
        ),
        (
            0 <= c.hard_negative_fraction <= 1,
            f"--hard-negatives {c.hard_negative_fraction}: must be in [0, 1]",
        ),
        (
            0 <= c.mined_negative_fraction <= 1,
            f"--mined-negatives {c.mined_negative_fraction}: must be in [0, 1]",
        ),
        (
            0 <= c.class_weight_power <= 1,
            f"--class-weight-power {c.class_weight_power}: must be in [0, 1]",
        ),
        (0 < c.val_fraction < 1, f"--val-fraction {c.val_fraction}: must be in (0, 1)"),
        (c.patience >= 0, f"--patience {c.patience}: must be >= 0"),
        (
            c.select_by in SELECTION_SCORES,
            f"--select-by {c.select_by!r}: choose {', '.join(SELECTION_SCORES)}",
        ),
        (
            c.unannotated in UNANNOTATED_CHOICES,
            f"--unannotated {c.unannotated!r}: choose {', '.join(UNANNOTATED_CHOICES)}",
        ),
        (c.val_every is None or c.val_every >= 1, f"--val-every {c.val_every}: must be >= 1"),
        (c.max_val_voxels >= 1, f"--max-val-voxels {c.max_val_voxels}: must be >= 1"),
        (
            c.ema == "auto" or (not isinstance(c.ema, str) and (c.ema == 0 or 0.5 <= c.ema < 1)),
            f"--ema {c.ema}: give a decay in [0.5, 1), e.g. 0.99, 0 for none, or auto",
        ),
        (
            c.lr_schedule in LR_SCHEDULES,
            f"--lr-schedule {c.lr_schedule!r}: choose {', '.join(LR_SCHEDULES)}",
        ),
        (
            c.max_minutes is None or c.max_minutes > 0,
            f"--max-minutes {c.max_minutes}: must be > 0",
        ),
        (c.max_val_patches >= 1, f"--max-val-patches {c.max_val_patches}: must be >= 1"),
        (c.threads is None or c.threads >= 1, f"--threads {c.threads}: must be >= 1"),
        (
            c.jitter_voxels is None or c.jitter_voxels >= 0,
            f"--jitter-voxels {c.jitter_voxels}: must be >= 0",
        ),
        (not (c.fold and c.val_tomograms), "give --fold or --val-tomograms, not both"),
    ]
    for ok, message in checks:
        if not ok:
            raise CryocapsError(message)
    parse_fold(c.fold)


def parse_ema(text: str) -> float | str:
    """``--ema`` as typed: ``"auto"`` or a decay (range checked by :func:`check_settings`)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        message = f"--ema {text!r}: give a decay such as 0.99, 0 for none, or auto"
        raise CryocapsError(message) from None


def ema_decay(config: TrainConfig, annealing: bool) -> float:
    """The weight average's decay (0: none): ``--ema`` as given, or for ``auto``
    AUTO_EMA_DECAY while the rate anneals."""
    if config.ema != "auto":
        return float(config.ema)
    return AUTO_EMA_DECAY if annealing else 0.0


def config_dict(config: TrainConfig) -> dict:
    """The settings as JSON-able values (for run.json)."""
    return {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
        for k, v in asdict(config).items()
    }
