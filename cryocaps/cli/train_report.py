"""What `cryocaps train` reports when a run ends: run.json and the summary it prints."""

from __future__ import annotations

from pathlib import Path

from cryocaps.cli.common import command_line, console, print_table
from cryocaps.training.config import PAPER


def write_train_run_json(config, result: dict) -> None:
    from cryocaps.runinfo import write_run_json
    from cryocaps.training import config_dict

    result = dict(result)
    history = result.pop("history")
    outputs = ["config.json", "model.pt", "metrics.csv", "learning_curve.png", "checkpoint_last.pt"]
    write_run_json(
        config.out_dir,
        command=command_line(),
        inputs=result.pop("inputs"),
        outputs=[config.out_dir / name for name in outputs],
        parameters=config_dict(config)
        | {"world_size": result["world_size"], "paper_defaults": PAPER},
        seed=config.seed,
        timings={"total": result["seconds"], "per_step": result["seconds_per_step"]},
        results=result | {"epochs_recorded": len(history)},
    )


def print_summary(result: dict, out_dir: Path) -> None:
    best = result["best_validation"] or {}
    thresholds = {
        row["class_name"]: row["min_score"]
        for row in (result["pick_thresholds"] or {}).get("probability", [])
    }

    def shown(value):
        return "-" if value is None else value

    rows = [
        [
            name,
            dice,
            *(shown(best.get(f"val_{key}_{name}")) for key in ("precision", "recall", "f1")),
            shown(best.get(f"val_background_share_{name}")),
            shown(thresholds.get(name)),
        ]
        for name, dice in result["best_dice"].items()
    ]
    print_table(
        f"Best epoch {result['best_epoch']} of {result['epochs_done']}",  # short: no wrapping
        ["class", "patch Dice", "precision", "recall", "F1", "background", "min score"],
        rows,
    )
    validation = result["validation"]
    macro = best.get("val_macro_f1")
    share = validation["time_share"]
    console.print(
        f"Held out {validation['held_out']}: macro F1 "
        f"{'-' if macro is None else f'{macro:.3f}'} at the best epoch (min score: its picks' "
        "best-F1 thresholds, kept in the model; segment writes them beside its maps); "
        f"validation took {'-' if share is None else f'{share:.0%}'} of the time."
    )
    _print_unannotated(console, result.get("unannotated"))
    note = (result["pick_thresholds"] or {}).get("not_set")
    if note:
        console.print(f"Score thresholds {note}; picking methods are still chosen per class.")
    console.print(
        f"{result['steps_done']} steps, {result['seconds_per_step']:.2f} s/step, "
        f"{result['samples_per_second']:.1f} patches/s on {result['device']} "
        f"x{result['world_size']}; stopped: {result['stopped']}; model in {out_dir}"
    )
    schedule = {"none": "constant", "plateau": "halved on plateaus"}.get(
        result["lr_schedule"], result["lr_schedule"]
    )
    if result["annealed_from_step"] is not None:
        schedule += f" from step {result['annealed_from_step']}"
    if result["ema"]:
        schedule += f"; the model is the weights' moving average (EMA {result['ema']:g})"
    console.print(f"Learning rate: {schedule}")


def _print_unannotated(console, outcome: dict | None) -> None:
    """One line on what ``--unannotated auto`` found (nothing when it did not look)."""
    if not outcome:
        return
    if outcome.get("skipped"):
        console.print(outcome["skipped"] + ".")
        return
    partial = {n: r for n, r in outcome["classes"].items() if r["partial"]}
    if not partial:
        console.print(
            f"Annotations judged complete after epoch {outcome['epoch']} (annotated share "
            "estimated from the network's picks on the training tomograms: "
            + ", ".join(f"{n} {r['annotated_share']:.2f}" for n, r in outcome["classes"].items())
            + ")."
        )
        return
    console.print(
        f"Partly annotated after epoch {outcome['epoch']}: "
        + ", ".join(f"{n} (share {r['annotated_share']:.2f})" for n, r in partial.items())
        + f"; {outcome['places']} places the network picked on background became unknown "
        "for the rest of the run (--unannotated keep: train on the maps as given)."
    )
