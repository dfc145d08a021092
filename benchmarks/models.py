"""Speed of the two networks on this machine's CPU, next to what a plain conv3d reaches.

For 3D-UCaps and the DeepFinder U-Net at 64³ and 32³ patches, in fp32 and
under bf16 autocast: parameters, FLOPs of one forward and one training step
(``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix
products; elementwise work is not counted), forward (eval, no_grad) and
forward+backward (training loss + backward) time per patch, and the GFLOP/s
they reach. In the same run it measures the ceiling — a plain 64→64 3×3×3
conv3d on a 32³ map — and a memory-copy bandwidth, then breaks the capsule
layers of 3D-UCaps down into their vote convolution and their routing.

    python benchmarks/models.py                 # ~1-2 min on 2 idle cores: 64³ and 32³,
                                                  fp32 and bf16
    python benchmarks/models.py --repeats 3     # steadier numbers, ~3x longer
    python benchmarks/models.py --routing-only  # ceiling, the routing implementations and
                                                  the networks by routing iterations at 2 × 48³

The routing implementations — plain (``capsules.route_voxel_major``), fused in
PyTorch (``routing.fused_routing`` block by block) and the C kernel
(``models.native``, the default) — are timed layer by layer and for the whole
3D-UCaps at DeepFinder's training patch and batch (2 × 48³), forward and
forward+backward, taking turns in the same process so that all see the same load.

Prints markdown tables and writes benchmarks/results/models.json. Times are
the best of ``--repeats`` runs after one warm-up (wall clock, batch 1); on a
machine shared with other jobs they are noisy — the load average before and
after the run is recorded with them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting for each other are ruinous when other
# jobs share the cores (measured: small kernels 10-40x slower); the runtime reads
# this before torch starts. Override with OMP_WAIT_POLICY=ACTIVE on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _bench import append_run  # noqa: E402

from cryocaps.models import create_model, routing  # noqa: E402
from cryocaps.runtime import autocast as runtime_autocast  # noqa: E402
from cryocaps.runtime import keep_freed_blocks  # noqa: E402

N_CLASSES = 4  # background + 3 particle classes, as in the paper's multi-class runs
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def autocast(dtype):
    """The precision segment and train choose on this CPU: bf16 autocast or none (fp32)."""
    return runtime_autocast("cpu", bf16=dtype is not None)


def best_time(fn, repeats: int, warm_up=None) -> float:
    """Best wall-clock seconds of ``repeats`` calls after one warm-up call (``warm_up`` or
    ``fn``)."""
    (warm_up or fn)()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def ceiling(repeats: int) -> dict:
    """GFLOP/s of a plain conv3d (64→64, 3³, 32³ map, channels-last) and copy GB/s."""
    conv = torch.nn.Conv3d(64, 64, 3, padding=1, bias=False).to(
        memory_format=torch.channels_last_3d
    )
    x = torch.randn(1, 64, 32, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    x_first = x.contiguous()
    flops = count_flops(lambda: conv(x))
    result = {"conv": "Conv3d(64, 64, 3) on (1, 64, 32, 32, 32)"}
    with torch.no_grad():
        for name, dtype in DTYPES.items():
            with autocast(dtype):
                seconds = best_time(lambda: conv(x), repeats + 1)
                seconds_first = best_time(lambda: conv(x_first), repeats + 1)
            result[f"{name}_gflops"] = flops / seconds / 1e9
            result[f"{name}_channels_first_gflops"] = flops / seconds_first / 1e9
    big = torch.randn(64 * 2**20 // 4)  # 64 MB
    seconds = best_time(big.clone, repeats + 1)
    result["copy_gbytes_per_s"] = 2 * big.numel() * 4 / seconds / 1e9  # read + write
    return result


def network_rows(name: str, size: int, repeats: int) -> list[dict]:
    model = create_model(name, N_CLASSES)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 1, size, size, size)
    labels = torch.randint(0, N_CLASSES, (1, size, size, size))

    def forward():
        with torch.no_grad():
            model(x)

    def train_step():
        model.zero_grad(set_to_none=True)
        loss, _ = model.compute_loss(x, labels)
        loss.backward()

    flops = {}

    def counted(fn, key):
        # the first (fp32) warm-up call also counts the FLOPs
        def run():
            flops[key] = count_flops(fn)

        return run

    rows = []
    for dtype_name, dtype in DTYPES.items():
        with autocast(dtype):
            model.eval()
            forward_s = best_time(forward, repeats, None if flops else counted(forward, "forward"))
            model.train()
            train_s = best_time(
                train_step, repeats, None if "train" in flops else counted(train_step, "train")
            )
        forward_flops, train_flops = flops["forward"], flops["train"]
        rows.append(
            {
                "network": name,
                "patch": size,
                "dtype": dtype_name,
                "params": params,
                "params_m": params / 1e6,
                "forward_gflop": forward_flops / 1e9,
                "train_step_gflop": train_flops / 1e9,
                "forward_s": forward_s,
                "train_step_s": train_s,
                "forward_gflops": forward_flops / forward_s / 1e9,
                "train_step_gflops": train_flops / train_s / 1e9,
            }
        )
        print(
            f"  {name} {size}³ {dtype_name}: forward {forward_s:.3f} s, train step {train_s:.3f} s",
            flush=True,
        )
    return rows


def capsule_rows(size: int, repeats: int) -> list[dict]:
    """Each capsule layer of 3D-UCaps: vote convolution vs routing, forward, no_grad."""
    model = create_model("ucaps", N_CLASSES).eval()
    x = torch.randn(1, 1, size, size, size).contiguous(memory_format=torch.channels_last_3d)
    rows = []
    with torch.no_grad():
        for dtype_name, dtype in DTYPES.items():
            with autocast(dtype):
                capsules = model.features(x).unsqueeze(1)
                for index, layer in enumerate([model.primary_capsules, *model.encoder]):
                    votes = layer.voxel_major_votes(capsules)
                    vote_flops = count_flops(
                        lambda layer=layer, c=capsules: layer.voxel_major_votes(c)
                    )
                    total_flops = count_flops(lambda layer=layer, c=capsules: layer(c))
                    vote_s = best_time(
                        lambda layer=layer, c=capsules: layer.voxel_major_votes(c), repeats
                    )
                    total_s = best_time(lambda layer=layer, c=capsules: layer(c), repeats)
                    routing_s = max(total_s - vote_s, 1e-9)
                    # every iteration after the first must read the votes at least twice
                    # (agreement, weighted sum); the implementation makes more passes
                    passes = 2 * (layer.routing_iterations - 1)
                    vote_bytes = votes.numel() * votes.element_size()
                    rows.append(
                        {
                            "dtype": dtype_name,
                            "layer": "primary" if index == 0 else f"caps{index}",
                            "shape": layer.extra_repr().split(", kernel")[0],
                            "votes_mb": vote_bytes / 1e6,
                            "vote_gflop": vote_flops / 1e9,
                            "routing_gflop": (total_flops - vote_flops) / 1e9,
                            "vote_s": vote_s,
                            "routing_s": routing_s,
                            "layer_gflops": total_flops / total_s / 1e9,
                            "vote_conv_gflops": vote_flops / vote_s / 1e9,
                            "routing_gbytes_per_s": passes * vote_bytes / routing_s / 1e9,
                        }
                    )
                    capsules = layer(capsules)
    return rows


# Routing implementations compared: (fused_routing, native_routing) of the layers.
# "plain": cryocaps 0.1.0's routing in PyTorch; "fused": PyTorch block by block
# (routing.fused_routing); "native": the C kernel (models.native), the default.
ROUTING_VARIANTS = {"plain": (False, False), "fused": (True, False), "native": (False, True)}


def set_routing(layers, impl: str) -> None:
    """Switch capsule layers to one of ``ROUTING_VARIANTS``."""
    for layer in layers:
        layer.fused_routing, layer.native_routing = ROUTING_VARIANTS[impl]


def capsule_layers(model) -> list:
    return [model.primary_capsules, *model.encoder]


def interleaved(fns: dict, repeats: int) -> dict:
    """Best wall-clock and CPU seconds of each function, called in turn ``repeats`` times.

    Taking turns puts plain and fused under the same load; CPU time (of this
    process, all its threads) is steadier than wall time on a shared machine.
    """
    for fn in fns.values():
        fn()  # warm-up
    wall = {key: float("inf") for key in fns}
    cpu = dict(wall)
    for _ in range(repeats):
        for key, fn in fns.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[key] = min(wall[key], time.perf_counter() - start_wall)
            cpu[key] = min(cpu[key], time.process_time() - start_cpu)
    return {key: (wall[key], cpu[key]) for key in fns}


def routing_rows(batch: int, size: int, repeats: int, dtype_name: str = "bf16") -> list[dict]:
    """The routing implementations: each capsule layer and the whole 3D-UCaps, fwd and fwd+bwd.

    At DeepFinder's training patch and batch (2 × 48³). Forward: eval mode,
    no_grad; forward+backward: a layer's output squared and summed, then
    backward (its input needing gradients, as in training), or for the whole
    model the training loss and its backward.
    """
    model = create_model("ucaps", N_CLASSES)
    x = torch.randn(batch, 1, size, size, size).contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(0, N_CLASSES, (batch, size, size, size))
    rows = []
    with autocast(DTYPES[dtype_name]):
        with torch.no_grad():
            inputs = [model.features(x).unsqueeze(1)]
            for layer in [model.primary_capsules, *model.encoder]:
                inputs.append(layer(inputs[-1]))
        layers = [model.primary_capsules, *model.encoder]
        for index, (layer, capsules) in enumerate(zip(layers, inputs, strict=False)):
            capsules = capsules.detach().requires_grad_()

            def forward(layer=layer, capsules=capsules):
                with torch.no_grad():
                    layer(capsules)

            def step(layer=layer, capsules=capsules):
                capsules.grad = None
                layer.zero_grad(set_to_none=True)
                layer(capsules).float().square().sum().backward()

            name = "primary" if index == 0 else f"caps{index}"
            rows.append(
                _compare(
                    name,
                    layer.extra_repr().split(", kernel")[0],
                    forward,
                    step,
                    lambda impl, layer=layer: set_routing([layer], impl),
                    repeats,
                )
            )

        def model_forward():
            model.eval()
            with torch.no_grad():
                model(x)

        def model_step():
            model.train()
            model.zero_grad(set_to_none=True)
            loss, _ = model.compute_loss(x, labels)
            loss.backward()

        rows.append(total_row(rows, "all capsule layers"))
        rows.append(
            _compare(
                "whole model",
                f"{batch} × {size}³",
                model_forward,
                model_step,
                lambda impl: set_routing(capsule_layers(model), impl),
                repeats,
            )
        )
    for row in rows:
        row["dtype"] = dtype_name
    return rows


# The networks of the iteration table: (row name, model name, options).
ITERATION_VARIANTS = [
    ("ucaps (3 iterations, the paper's)", "ucaps", {}),
    ("ucaps, routing in PyTorch (cryocaps <= 0.2)", "ucaps", {"routing": "plain"}),
    ("ucaps, 2 iterations", "ucaps", {"routing_iterations": 2}),
    ("ucaps-fast (1 iteration)", "ucaps-fast", {}),
    ("unet (DeepFinder's)", "unet", {}),
]


def iteration_rows(batch: int, size: int, repeats: int, dtype_name: str = "bf16") -> list[dict]:
    """Whole networks by routing iterations at DeepFinder's training batch and patch.

    Forward (eval, no_grad) and training step (loss + backward), timed in turn
    (``interleaved``) so that all variants see the same load; training samples/s
    is ``batch`` over the step time.
    """
    x = torch.randn(batch, 1, size, size, size).contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(0, N_CLASSES, (batch, size, size, size))
    fns, step_flops = {}, {}
    for row_name, name, options in ITERATION_VARIANTS:
        options = dict(options)
        impl = options.pop("routing", "native")
        model = create_model(name, N_CLASSES, **options)
        if name.startswith("ucaps"):
            set_routing(capsule_layers(model), impl)

        def forward(model=model):
            model.eval()
            with torch.no_grad(), autocast(DTYPES[dtype_name]):
                model(x)

        def step(model=model):
            model.train()
            model.zero_grad(set_to_none=True)
            with autocast(DTYPES[dtype_name]):
                loss, _ = model.compute_loss(x, labels)
            loss.backward()

        fns[(row_name, "fwd")] = forward
        fns[(row_name, "step")] = step
        step_flops[row_name] = count_flops(step)  # convolutions and matrix products
    times = interleaved(fns, repeats)
    rows = []
    reference = times[(ITERATION_VARIANTS[0][0], "step")][0]
    reference_fwd = times[(ITERATION_VARIANTS[0][0], "fwd")][0]
    for row_name, _, _ in ITERATION_VARIANTS:
        fwd, step = times[(row_name, "fwd")][0], times[(row_name, "step")][0]
        rows.append(
            {
                "network": row_name,
                "dtype": dtype_name,
                "fwd_s": fwd,
                "step_s": step,
                "train_samples_per_s": batch / step,
                "fwd_speedup": reference_fwd / fwd,
                "step_speedup": reference / step,
                "step_gflop": step_flops[row_name] / 1e9,
                "step_gflops": step_flops[row_name] / step / 1e9,
            }
        )
        print(f"  {row_name}: forward {fwd:.3f} s, fwd+bwd {step:.3f} s", flush=True)
    return rows


def _speedups(row: dict) -> None:
    """Plain over native (the default) and plain over fused, wall and CPU time."""
    for kind in ("fwd", "step"):
        for impl in ("native", "fused"):
            row[f"{kind}_speedup_{impl}"] = row[f"plain_{kind}_s"] / row[f"{impl}_{kind}_s"]
            cpu = row[f"plain_{kind}_cpu_s"] / row[f"{impl}_{kind}_cpu_s"]
            row[f"{kind}_speedup_{impl}_cpu"] = cpu


def _compare(name, shape, forward, step, switch, repeats) -> dict:
    """Interleaved timings of the ``ROUTING_VARIANTS`` (vote convolution: oneDNN's)."""

    def under(impl, fn):
        def run():
            switch(impl)
            fn()

        return run

    routing.GEMM_WEIGHT_GRADIENT = False
    fns = {}
    for kind, fn in (("fwd", forward), ("step", step)):
        for impl in ROUTING_VARIANTS:
            fns[(impl, kind)] = under(impl, fn)
    times = interleaved(fns, repeats)
    switch("native")
    row = {"layer": name, "shape": shape}
    for (impl, kind), (wall, cpu) in times.items():
        row[f"{impl}_{kind}_s"] = wall
        row[f"{impl}_{kind}_cpu_s"] = cpu
    _speedups(row)
    print(
        f"  {name}: forward plain {row['plain_fwd_s']:.3f}, fused {row['fused_fwd_s']:.3f}, "
        f"native {row['native_fwd_s']:.3f} s; fwd+bwd {row['plain_step_s']:.3f}, "
        f"{row['fused_step_s']:.3f}, {row['native_step_s']:.3f} s (wall)",
        flush=True,
    )
    return row


def total_row(rows: list[dict], name: str) -> dict:
    """The sum of the capsule layers' rows (times add up; speed-ups are recomputed)."""
    total = {"layer": name, "shape": ""}
    for key in rows[0]:
        if key.endswith("_s"):
            total[key] = sum(row[key] for row in rows)
    _speedups(total)
    return total


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(format(row[key], fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def print_routing(rows: list[dict], patch: str) -> None:
    print(
        f"Routing in PyTorch (plain, fused) vs the C kernel (native, the default), 3D-UCaps, "
        f"{patch}, bf16 autocast (best of interleaved runs):"
    )
    print()
    print(
        markdown(
            rows,
            [
                ("layer", "layer", "s"),
                ("capsules", "shape", "s"),
                ("fwd plain s", "plain_fwd_s", ".3f"),
                ("fwd fused s", "fused_fwd_s", ".3f"),
                ("fwd native s", "native_fwd_s", ".3f"),
                ("fwd speed-up", "fwd_speedup_native", ".2f"),
                ("fwd speed-up (CPU time)", "fwd_speedup_native_cpu", ".2f"),
                ("fwd+bwd plain s", "plain_step_s", ".3f"),
                ("fwd+bwd fused s", "fused_step_s", ".3f"),
                ("fwd+bwd native s", "native_step_s", ".3f"),
                ("fwd+bwd speed-up", "step_speedup_native", ".2f"),
                ("fwd+bwd speed-up (CPU time)", "step_speedup_native_cpu", ".2f"),
            ],
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[64, 32], help="patch sides (default 64 32)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per measurement (default 2)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--no-malloc-reuse",
        action="store_true",
        help="keep glibc's default of unmapping freed large blocks (default: reuse them)",
    )
    parser.add_argument(
        "--routing-only",
        action="store_true",
        help="only the ceiling and the routing implementations (default: also the networks)",
    )
    parser.add_argument(
        "--routing-batch", type=int, default=2, help="batch of the routing comparison (default 2)"
    )
    parser.add_argument(
        "--routing-size", type=int, default=48, help="patch side of the routing comparison (48)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/models.json)")
    args = parser.parse_args(argv)
    if args.out is None:
        name = "routing.json" if args.routing_only else "models.json"
        args.out = REPO / "benchmarks" / "results" / name
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_reuse = False if args.no_malloc_reuse else keep_freed_blocks()
    torch.manual_seed(0)
    load_before = os.getloadavg()
    started = time.perf_counter()

    print("ceiling ...", flush=True)
    ceiling_result = ceiling(args.repeats)
    routing_patch = f"{args.routing_batch} × {args.routing_size}³"
    print(f"routing implementations, {routing_patch}, bf16 ...", flush=True)
    routing = routing_rows(args.routing_batch, args.routing_size, args.repeats + 1)
    print(f"networks by routing iterations, {routing_patch}, bf16 ...", flush=True)
    iterations = iteration_rows(args.routing_batch, args.routing_size, args.repeats + 1)
    for row in iterations:  # a step's FLOPs alone at the ceiling: no implementation is faster
        row["step_s_at_ceiling"] = row["step_gflop"] / ceiling_result["bf16_gflops"]
    rows, capsules = [], []
    if not args.routing_only:
        for size in args.sizes:
            for name in ("unet", "ucaps"):
                rows.extend(network_rows(name, size, args.repeats))
        print("capsule layers ...", flush=True)
        capsules = capsule_rows(max(args.sizes), args.repeats)

    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "malloc_reuse": malloc_reuse,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "seconds": time.perf_counter() - started,
        },
        "ceiling": ceiling_result,
        "networks": rows,
        "capsule_layers_patch": max(args.sizes),
        "capsule_layers": capsules,
        "routing_patch": routing_patch,
        "routing": routing,
        "iterations": iterations,
    }
    append_run(args.out, result)  # earlier runs stay in the file

    print()
    print(
        "Ceiling (plain conv3d 64→64, 3³, 32³, channels-last): "
        f"fp32 {ceiling_result['fp32_gflops']:.0f} GFLOP/s, "
        f"bf16 {ceiling_result['bf16_gflops']:.0f} GFLOP/s (channels-first: "
        f"{ceiling_result['fp32_channels_first_gflops']:.0f} / "
        f"{ceiling_result['bf16_channels_first_gflops']:.0f}); "
        f"copy {ceiling_result['copy_gbytes_per_s']:.1f} GB/s"
    )
    print()
    print_routing(routing, routing_patch)
    print()
    print(f"Networks by routing iterations, {routing_patch}, bf16 autocast (interleaved):")
    print()
    print(
        markdown(
            iterations,
            [
                ("network", "network", "s"),
                ("fwd s", "fwd_s", ".3f"),
                ("fwd speed-up", "fwd_speedup", ".2f"),
                ("fwd+bwd s", "step_s", ".3f"),
                ("fwd+bwd speed-up", "step_speedup", ".2f"),
                ("training samples/s", "train_samples_per_s", ".2f"),
                ("GFLOP / step", "step_gflop", ".0f"),
                ("step GFLOP/s", "step_gflops", ".0f"),
            ],
        )
    )
    print()
    print(
        "A training step at the bf16 ceiling (its GFLOP / the ceiling's GFLOP/s): "
        + ", ".join(f"{row['network']} {row['step_s_at_ceiling']:.2f} s" for row in iterations)
    )
    if args.routing_only:
        print(
            f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
            f"wrote {args.out}"
        )
        return 0
    print()
    print(
        markdown(
            rows,
            [
                ("network", "network", "s"),
                ("patch", "patch", "d"),
                ("dtype", "dtype", "s"),
                ("params (M)", "params_m", ".2f"),
                ("GFLOP fwd", "forward_gflop", ".1f"),
                ("fwd s/patch", "forward_s", ".3f"),
                ("fwd GFLOP/s", "forward_gflops", ".0f"),
                ("GFLOP train step", "train_step_gflop", ".1f"),
                ("fwd+bwd s/patch", "train_step_s", ".3f"),
                ("fwd+bwd GFLOP/s", "train_step_gflops", ".0f"),
            ],
        )
    )
    print()
    print(f"Capsule layers of 3D-UCaps, {max(args.sizes)}³ patch, forward:")
    print()
    print(
        markdown(
            capsules,
            [
                ("dtype", "dtype", "s"),
                ("layer", "layer", "s"),
                ("capsules", "shape", "s"),
                ("votes MB", "votes_mb", ".0f"),
                ("vote GFLOP", "vote_gflop", ".2f"),
                ("routing GFLOP", "routing_gflop", ".2f"),
                ("vote conv + layout s", "vote_s", ".3f"),
                ("routing s", "routing_s", ".3f"),
                ("vote conv GFLOP/s", "vote_conv_gflops", ".0f"),
                ("layer GFLOP/s", "layer_gflops", ".0f"),
                ("routing GB/s (2 reads/iter)", "routing_gbytes_per_s", ".1f"),
            ],
        )
    )
    print()
    print(
        f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"({os.cpu_count()} CPUs); {time.perf_counter() - started:.0f} s; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
