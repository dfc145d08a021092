"""The randomized benchmark family (benchmarks/family.py): draws, annotated subsets, scores."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def family():
    sys.path.insert(0, str(BENCHMARKS))  # family imports its sibling _bench
    try:
        spec = importlib.util.spec_from_file_location("family", BENCHMARKS / "family.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_draws_are_reproducible_varied_and_within_their_ranges(family, structures_dir):
    draws = [family.draw_set(seed, structures_dir) for seed in range(20)]
    assert family.draw_set(3, structures_dir) == draws[3]
    assert len({d["snr"] for d in draws}) == 20
    for draw in draws:
        for key in ("snr", "tilt_range_deg", "defocus_um", "blur_angstrom", "crowding"):
            low, high = family.RANGES[key]
            assert low <= draw[key] <= high
        classes = draw["classes"]
        assert 3 <= len(classes) <= 5
        names = [c["name"] for c in classes]
        assert len(set(names)) == len(names)
        kinds = [c["kind"] for c in classes]
        assert kinds.count("assembly") >= 1
        similar = [c["structure"] for c in classes if c["kind"] == "similar-size"]
        assert len(similar) >= 2 and set(similar) <= set(family.SHREC19)
        faint = [c for c in classes if c["contrast"] != 1.0]
        assert len(faint) == 1 and 0.4 <= faint[0]["contrast"] <= 0.7
        assert faint[0]["name"].endswith("-faint")
    every_kind = {c["shape"] for d in draws for c in d["classes"] if c["kind"] == "assembly"}
    assert every_kind == set(family.ASSEMBLY_KINDS)


def test_similar_size_classes_are_nearest_in_diameter(family, structures_dir):
    diameters = family.read_diameters(structures_dir)
    for seed in range(10):
        chosen = family.similar_size_classes(np.random.default_rng(seed), diameters, 2)
        anchor, partner = chosen
        gap = abs(np.log(diameters[partner] / diameters[anchor]))
        for other in family.SHREC19:
            if other != anchor:
                assert abs(np.log(diameters[other] / diameters[anchor])) >= gap


def test_tomograms_grow_until_the_particles_fit(family):
    assert family.plan_shape((64, 160, 160), 0.2, [3.0, 4.0], 80) == (64, 160, 160)
    z, y, x = family.plan_shape((64, 160, 160), 0.1, [14.0, 12.0], 80)
    assert y == x and y > 160 and y % 16 == 0
    mean_volume = np.mean([4 / 3 * np.pi * r**3 for r in (14.0, 12.0)])
    assert 0.1 * 0.8 * z * y * x / mean_volume >= 80
    assert family.plan_shape((16, 64, 64), 0.1, [10.0], 0)[0] * 0.8 >= 23  # deep enough


def test_annotated_subset_takes_a_fraction_of_each_tomogram_and_class(family):
    rows = [
        {"tomo": tomo, "class_name": name, "x": float(k), "y": 0.0, "z": 0.0}
        for tomo in ("tomo_01", "tomo_02", "tomo_05")
        for name, n in (("ring", 20), ("3gl1", 3))
        for k in range(n)
    ]
    particles = pd.DataFrame(rows)
    subset = family.annotated_subset(particles, ["tomo_01", "tomo_02"], 0.3, seed=7)
    counts = subset.groupby(["tomo", "class_name"]).size().to_dict()
    assert counts == {
        ("tomo_01", "3gl1"): 1, ("tomo_01", "ring"): 6,
        ("tomo_02", "3gl1"): 1, ("tomo_02", "ring"): 6,
    }  # fmt: skip
    assert subset.merge(particles).shape[0] == len(subset)  # rows of the original
    again = family.annotated_subset(particles, ["tomo_01", "tomo_02"], 0.3, seed=7)
    pd.testing.assert_frame_equal(subset, again)
    other = family.annotated_subset(particles, ["tomo_01", "tomo_02"], 0.3, seed=8)
    assert not subset.equals(other)
    full = family.annotated_subset(particles, ["tomo_01", "tomo_02"], 1.0, seed=7)
    assert len(full) == 46


def test_background_share_counts_a_class_outside_the_true_particles(family, tmp_path):
    from cryocaps.io.volumes import write_volume

    truth = np.zeros((8, 10, 10), np.uint8)
    truth[0:2, :5, :5] = 1  # 50 voxels of class 1
    truth[4, :2, :] = 2  # 20 voxels of class 2
    predicted = truth.copy()
    predicted[6:8, :, :] = 2  # 200 background voxels called class 2
    predicted[0, 0, :] = 1  # 5 of them already class 1 (50 inside), 5 new on background
    paths = []
    for name, volume in (("pred", predicted), ("truth", truth)):
        paths.append(write_volume(tmp_path / f"{name}.mrc", volume, 10.0, dtype="uint8"))
    shares = family.background_share([paths[0]], [paths[1]], 3)
    background = 800 - 70
    assert shares["background_voxels"] == background
    assert shares["share"][1] == pytest.approx(5 / background)
    assert shares["share"][2] == pytest.approx(200 / background)
    assert shares["true_fraction"][2] == pytest.approx(20 / 800)


def _tool(macro: float, classes: dict) -> dict:
    worst = min(c["f1"] for c in classes.values())
    return {"tool": "t", "macro_f1": macro, "worst_class_f1": worst, "classes": classes}


def test_summary_over_draws_gives_mean_worst_spread_and_ratio_to_full(family):
    good = {"a": {"precision": 0.9, "recall": 0.9, "f1": 0.9, "background_ratio": 0.5}}
    runaway = {"a": {"precision": 0.5, "recall": 0.6, "f1": 0.5, "background_ratio": 7.0}}
    draws = [
        {"draw": {"seed": 0}, "fractions": {
            "1": {"tools": {"x": _tool(0.9, good)}},
            "0.3": {"tools": {"x": _tool(0.45, runaway)}}}},
        {"draw": {"seed": 1}, "fractions": {
            "1": {"tools": {"x": _tool(0.5, runaway)}},
            "0.3": {"tools": {"x": {"tool": "t", "error": "exit 1"}}}}},
    ]  # fmt: skip
    summary = family.summarize(draws)
    assert list(summary) == ["1", "0.3"]
    full, partial = summary["1"]["x"], summary["0.3"]["x"]
    assert full["mean_macro_f1"] == pytest.approx(0.7) and full["worst_macro_f1"] == 0.5
    assert full["max_background_ratio"] == 7.0
    assert full["imprecise_classes"] == ["a (draw 1)"]
    assert full["mean_ratio_to_full"] is None
    assert partial["n_draws"] == 1 and partial["n_failed"] == 1
    assert partial["mean_ratio_to_full"] == pytest.approx(0.5)
    table = "\n".join(family.summary_lines(summary))
    assert "0.70 / 0.50 (0.70)" in table and "0.45 / 0.45 (0.50) (0.50 × full) (1 failed)" in table


def _args(**overrides):
    import argparse

    values = {"no_deepfinder": False, "models": ["unet"], "annotated_fraction": [1.0], "family": 5}
    return argparse.Namespace(**(values | overrides))


def test_a_resumed_draw_keeps_only_the_tools_that_finished(family):
    ok = _tool(0.8, {"a": {"f1": 0.8}})
    tools = {"deepfinder": ok, "deepfinder-tuned": ok, "cryocaps-unet": ok,
             "cryocaps-unet:meanshift": ok, "cryocaps-ucaps:meanshift": ok,
             "cryocaps-ucaps": {"tool": "t", "error": "killed"}}  # fmt: skip
    earlier = {"draw": {"seed": 0}, "fractions": {"1": {"tools": tools}}}
    kept = family.finished_tools(earlier, "1")
    assert set(kept) == {"deepfinder", "cryocaps-unet"}
    assert set(kept["deepfinder"]) == {"deepfinder", "deepfinder-tuned"}  # both entries of its run
    assert set(kept["cryocaps-unet"]) == {"cryocaps-unet", "cryocaps-unet:meanshift"}  # + levers
    tools.pop("deepfinder-tuned")  # killed between its two entries: run it again
    assert set(family.finished_tools(earlier, "1")) == {"cryocaps-unet"}
    assert family.finished_tools(earlier, "1", redo=["cryocaps-unet"]) == {}
    assert family.finished_tools(earlier, "0.3") == {}
    assert family.finished_tools(earlier | {"error": "simulate failed"}, "1") == {}
    assert family.finished_tools(None, "1") == {}


def test_a_draw_is_finished_when_every_tool_has_a_result_at_every_fraction(family):
    ok = _tool(0.8, {"a": {"f1": 0.8}})
    every = {"deepfinder": ok, "deepfinder-tuned": ok, "cryocaps-unet": ok}
    entry = {"fractions": {"1": {"tools": every}, "0.3": {"tools": {"cryocaps-unet": ok}}}}
    assert family.draw_finished(entry, _args())
    assert not family.draw_finished(entry, _args(annotated_fraction=[1.0, 0.3]))
    assert family.draw_finished(entry, _args(annotated_fraction=[1.0, 0.3], no_deepfinder=True))
    assert not family.draw_finished(entry, _args(models=["unet", "ucaps"]))
    assert family.draw_finished({"error": "simulate failed"}, _args())


def test_resuming_needs_the_same_settings(family, tmp_path):
    import json

    settings = {"family": 5, "minutes": 12.0, "family_shape": (64, 160, 160), "resume": False}
    with pytest.raises(SystemExit, match="does not exist"):
        family.load_partial(tmp_path / "partial_results.json", settings)
    saved = {"settings": json.loads(json.dumps(settings)), "draws": [], "started": "x"}
    (tmp_path / "partial_results.json").write_text(json.dumps(saved))
    resumed = settings | {"resume": True, "reuse_training": True}  # change nothing measured
    assert family.load_partial(tmp_path / "partial_results.json", resumed)["started"] == "x"
    with pytest.raises(SystemExit, match=r"other settings \(minutes\)"):
        family.load_partial(tmp_path / "partial_results.json", settings | {"minutes": 6.0})
    # the fully annotated run extended by a fraction (the finished draws run only the new one)
    saved["settings"]["annotated_fraction"] = [1.0]
    (tmp_path / "partial_results.json").write_text(json.dumps(saved))
    extended = resumed | {"annotated_fraction": [1.0, 0.3]}
    report = family.load_partial(tmp_path / "partial_results.json", extended)
    assert report["settings"]["annotated_fraction"] == [1.0, 0.3]
    with pytest.raises(SystemExit, match="may add fractions, not drop them"):
        family.load_partial(
            tmp_path / "partial_results.json", resumed | {"annotated_fraction": [0.3]}
        )


def test_record_partial_adds_the_finished_draws_marked_unfinished(family, tmp_path, monkeypatch):
    import json

    ok = _tool(0.8, {"a": {"precision": 0.8, "recall": 0.8, "f1": 0.8}})
    every = {"deepfinder": ok, "deepfinder-tuned": ok, "cryocaps-unet": ok}
    spec = {"name": "a", "kind": "map", "contrast": 1.0}
    draw = {"seed": 0, "snr": 0.3, "tilt_range_deg": 60, "defocus_um": 3, "blur_angstrom": 1,
            "crowding": 0.2, "shape": [8, 8, 8], "classes": [spec]}  # fmt: skip
    settings = {"family": 5, "minutes": 12.0, "quick": False}
    report = {
        "command": "benchmarks/vs_deepfinder.py --family 5", "started": "2026-12-07 04:13",
        "settings": settings, "machine": {}, "elapsed_seconds": 3600.0,
        "draws": [{"draw": draw, "fractions": {"1": {"tools": every}}},
                  {"draw": draw | {"seed": 1}, "fractions": {"1": {"tools": {"deepfinder": ok}}}}],
    }  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    (work / "partial_results.json").write_text(json.dumps(report))
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(f"before\n{family.START_MARK}\nOLD SECTION\n{family.END_MARK}\nafter\n")
    monkeypatch.setattr(family, "RESULTS_JSON", tmp_path / "family.json")
    monkeypatch.setattr(family, "RESULTS_MD", results_md)
    monkeypatch.setattr(family, "machine_sentence", lambda machine: "machine")
    args = _args(work=work, record_partial=True, quick=False)
    assert family.record_partial(args, settings) == 0
    (run,) = json.loads((tmp_path / "family.json").read_text())["runs"]
    assert run["partial"] and run["draws_planned"] == 5 and len(run["draws"]) == 1
    assert run["summary"]["1"]["cryocaps-unet"]["mean_macro_f1"] == pytest.approx(0.8)
    text = results_md.read_text()
    assert "Unfinished run" in text and "1 of 5 draws" in text and "OLD SECTION" not in text
    assert text.startswith("before\n") and text.endswith("after\n")


def _draw(seed: int) -> dict:
    spec = {"name": "a", "kind": "map", "contrast": 1.0}
    return {"seed": seed, "snr": 0.3, "tilt_range_deg": 60, "defocus_um": 3, "blur_angstrom": 1,
            "crowding": 0.2, "shape": [8, 8, 8], "classes": [spec]}  # fmt: skip


def test_a_resumed_run_with_fewer_draws_keeps_the_others(family, tmp_path, monkeypatch):
    import json

    import _bench
    import vs_deepfinder

    ok, better = _tool(0.5, {"a": {"f1": 0.5}}), _tool(0.9, {"a": {"f1": 0.9}})
    work = tmp_path / "work"
    args = _args(work=work, family=1, seed=0, resume=True, render=None, record_partial=False,
                 quick=False, no_deepfinder=True, no_write=True, minutes=12.0, argv=[],
                 structures=tmp_path)  # fmt: skip
    settings = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "argv"
    }
    settings |= {"family": 3, "resume": False, "structures": "s"}  # the run resumed
    report = {"command": "c", "started": "s", "settings": settings, "elapsed_seconds": 10.0,
              "draws": [{"draw": _draw(s), "fractions": {"1": {"tools": {"cryocaps-unet": ok}}}}
                        for s in range(3)]}  # fmt: skip
    work.mkdir()
    (work / "partial_results.json").write_text(json.dumps(report))
    ran = []

    def run_draw(draw, args, folder, entry, save, earlier=None):  # the tool run again
        ran.append(draw["seed"])
        entry["fractions"] = {"1": {"tools": {"cryocaps-unet": better}}}
        save()

    monkeypatch.setattr(family, "draw_set", lambda seed, structures: _draw(seed))
    monkeypatch.setattr(family, "run_draw", run_draw)
    monkeypatch.setattr(family, "structures_label", lambda structures: "s")
    monkeypatch.setattr(vs_deepfinder, "conv3d_probe", lambda: {})
    monkeypatch.setattr(_bench, "machine_info", lambda: {})
    monkeypatch.setattr(family, "machine_sentence", lambda machine: "machine")
    assert family.run_family(args) == 0
    assert ran == [0]
    results = json.loads((work / "results.json").read_text())
    assert [d["draw"]["seed"] for d in results["draws"]] == [0, 1, 2]
    macro = [d["fractions"]["1"]["tools"]["cryocaps-unet"]["macro_f1"] for d in results["draws"]]
    assert macro == [0.9, 0.5, 0.5]


def test_lever_runs_are_shown_beside_the_default_run_on_the_same_draws(family, monkeypatch):
    def run(finished, settings, fractions_by_seed):
        def tools(macro):
            return {"tools": {"cryocaps-unet": _tool(macro, {"a": {"f1": macro}})}}

        draws = [
            {"draw": _draw(seed), "fractions": {f: tools(m) for f, m in fractions.items()}}
            for seed, fractions in fractions_by_seed.items()
        ]
        return {"command": f"c {finished}", "started": "s", "finished": finished, "machine": {},
                "resumed": [], "settings": {"minutes": 12.0} | settings,
                "draws": draws, "summary": family.summarize(draws)}  # fmt: skip

    at_defaults = run(
        "T1", {}, {0: {"1": 0.9, "0.3": 0.6}, 1: {"1": 0.8, "0.3": 0.7}, 2: {"1": 0.5}}
    )
    lever = run("T2", {"masks_args": "--unannotated unknown", "no_deepfinder": True},
                {0: {"0.3": 0.85}, 1: {"0.3": 0.75, "1": 0.95}})  # fmt: skip
    history = {"runs": [at_defaults, lever]}
    monkeypatch.setattr(family, "machine_sentence", lambda machine: "machine")
    text = family.render(history)
    assert "### Run T1 UTC" in text and "Run T2" not in text  # the lever run is not the main run
    assert "#### `--masks-args '--unannotated unknown'`: run T2 UTC, draws 0, 1" in text
    lever_part = text.split("### Lever runs", 1)[1]
    assert "0.95 / 0.95 (0.95) (1 draw) | 0.80 / 0.75" in lever_part
    # the default run on the same draws at each fraction: draws 0-1 at 30%, draw 1 only at 100%
    # (not draw 2, which the lever did not run, nor draw 0, which it ran at 30% only)
    assert "| 0.80 / 0.80 (0.80) (1 draw) | 0.65 / 0.60 (0.65) (0.77 × full)" in lever_part
    assert text.rstrip().endswith(family.END_MARK)
    assert "(2 draws)" in text.split("### Lever runs")[0]  # 30% ran on 2 of the 3 draws
    assert family.lever_of(at_defaults) == ""
    deepfinder_alone = run("T3", {"models": []}, {2: {"0.3": 0.4}})
    text = family.render({"runs": [at_defaults, lever, deepfinder_alone]})
    assert "### Run T1 UTC" in text and "#### `--models ''`: run T3 UTC, draws 2" in text
