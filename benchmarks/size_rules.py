"""Size limits for picks at defaults, scored on the label maps that vs_deepfinder.py runs left.

For every ``<work>/<set>/cryocaps-<model>/segment/{valid,test}/<tomo>_labels.mrc`` of the
given ``vs_deepfinder.py --work`` folders: pick the map with the components method, keep the
picks that pass each size rule below, and score them against the set's ``particles.csv``
(``cryocaps.evaluation.evaluate_picks``, no score thresholds: what a user without a
validation tomogram gets). Label maps only, as ``cryocaps cluster-picks`` sees them after
``segment`` without ``--probabilities``, so nothing is segmented again.

    python benchmarks/size_rules.py WORK [WORK ...]            # a table of macro F1 per map
    python benchmarks/size_rules.py WORK --json rules.json    # and per-class numbers

Rules: fixed fractions of the class sphere (0.2, the default of 0.1.0; 0.5; 0.7), fractions of
the class's typical pick in the same map (0.5 of the 75th or of the 90th percentile of its pick
sizes; the latter is the default of ``cluster-picks`` since 2026-12-06) and a split of the
log sizes into two groups where their medians differ 3-fold or more.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from _bench import append_run

from cryocaps.evaluation import evaluate_picks
from cryocaps.io.class_table import read_classes
from cryocaps.io.volumes import read_tomogram
from cryocaps.picking import pick_particles, sphere_volume_voxels

OLD_DEFAULT = "0.2 sphere (0.1.0 default)"
DEFAULT = "0.2 sphere + 0.5 x 90th pct (default)"


def two_group_cut(sizes: np.ndarray) -> float:
    """The size splitting log sizes into two groups with the largest between-group variance."""
    logs = np.log(np.sort(sizes))
    best, cut = -1.0, float(sizes.min())
    for i in range(1, len(logs)):
        low, high = logs[:i], logs[i:]
        between = len(low) * len(high) * (low.mean() - high.mean()) ** 2
        if between > best:
            best, cut = between, float(np.exp((logs[i - 1] + logs[i]) / 2))
    return cut


def per_class(picks: pd.DataFrame, keep) -> pd.DataFrame:
    kept = [keep(group) for _, group in picks.groupby("class_name")]
    return pd.concat(kept) if kept else picks


def split_if_bimodal(group: pd.DataFrame) -> pd.DataFrame:
    if len(group) < 4:
        return group
    cut = two_group_cut(group.size_voxels.to_numpy())
    low, high = group[group.size_voxels < cut], group[group.size_voxels >= cut]
    return high if high.size_voxels.median() >= 3 * low.size_voxels.median() else group


def rules(picks: pd.DataFrame, default_picks: pd.DataFrame, classes, voxel_size: float) -> dict:
    """{rule name: picks kept}; ``picks`` passed the 0.2 sphere limit only."""
    sphere = picks.class_name.map(
        {c.name: sphere_volume_voxels(c.radius_voxels(voxel_size)) for c in classes}
    )
    of_sphere = picks.size_voxels / sphere

    def of_typical(quantile: float):
        return lambda g: g[g.size_voxels >= 0.5 * g.size_voxels.quantile(quantile)]

    return {
        OLD_DEFAULT: picks,
        "0.5 sphere": picks[of_sphere >= 0.5],
        "0.7 sphere": picks[of_sphere >= 0.7],
        "0.2 sphere + 0.5 x 75th pct": per_class(picks, of_typical(0.75)),
        "log-size split": per_class(picks, split_if_bimodal),
        DEFAULT: default_picks,
    }


def score_maps(work: Path) -> dict:
    """{"<set>/<tool>/<tomo>": {rule: scores}} for every label map of one vs_deepfinder run."""
    results = {}
    for set_folder in sorted(p for p in work.iterdir() if (p / "data" / "particles.csv").is_file()):
        classes = read_classes(set_folder / "data" / "classes.csv")
        truth = pd.read_csv(set_folder / "data" / "particles.csv")
        for label_path in sorted(set_folder.glob("cryocaps-*/segment/*/*_labels.mrc")):
            tomo = label_path.name.removesuffix("_labels.mrc")
            label_file = read_tomogram(label_path)
            voxel_size = label_file.voxel_size_angstrom
            label_map = np.asarray(label_file.data)
            picks = pick_particles(label_map, classes, voxel_size, tomo_name=tomo,
                                   relative_min_size=0.0)  # fmt: skip
            default_picks = pick_particles(label_map, classes, voxel_size, tomo_name=tomo)
            key = f"{work.name}/{set_folder.name}/{label_path.parts[-4]}/{tomo}"
            results[key] = {
                rule: evaluate_picks(
                    kept, truth[truth.tomo == tomo], classes, voxel_size, tomograms=[tomo]
                )  # fmt: skip
                for rule, kept in rules(picks, default_picks, classes, voxel_size).items()
            }
    return results


def table(results: dict) -> str:
    names = list(next(iter(results.values())))
    lines = ["| map | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, scores in results.items():
        lines.append(
            f"| {key} | " + " | ".join(f"{scores[n]['macro']['f1']:.2f}" for n in names) + " |"
        )
    means = [np.mean([scores[n]["macro"]["f1"] for scores in results.values()]) for n in names]
    lines.append("| mean | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, nargs="+", help="vs_deepfinder.py --work folders")
    parser.add_argument("--json", type=Path, default=None, help="write per-class scores here")
    args = parser.parse_args(argv)
    results = {}
    for work in args.work:
        results |= score_maps(work)
    if not results:
        raise SystemExit("no cryocaps-*/segment/*/*_labels.mrc under the given folders")
    print(table(results))
    if args.json:
        append_run(args.json, json.loads(json.dumps(results, default=float)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
