"""What each recipe change buys: accuracy from full training runs, cost as interleaved ratios.

    python benchmarks/bench_recipe.py accuracy NAME [--set KEY=VALUE ...] [--seed 42]
    python benchmarks/bench_recipe.py cost NAME=KEY=VALUE,KEY=VALUE ... [--steps 60]
    python benchmarks/bench_recipe.py table

CPU training here is seeded and deterministic (same thread count), so an accuracy run gives
the same figures on a busy machine as on a quiet one; its seconds do not. So each change's
cost is measured apart, as img/s of its training step (augmentation and weight averaging
included) against the baseline recipe's step, the variants taking turns step by step on the
same synthetic batches: a ratio that a shared machine's load slows alike on both sides.
`table` joins the two: the estimated quiet-machine seconds of a variant are the baseline's
measured seconds (a quiet-machine `make bench`, results/recipe/baseline-quiet.json) times the
epoch-count ratio divided by the speed ratio (per-epoch validation counted as training).

Results: benchmarks/results/recipe/<name>-seed<seed>.json (accuracy) and
benchmarks/results/recipe/cost.json; each holds the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_train  # noqa: E402

from alexops import params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "recipe"
DATA = Path("/usr/share/datasets/fashion-mnist")


# The recipe this work started from (commit 1773234: 92.14% after 856 s on a quiet machine);
# its quiet-machine `make bench` result is kept as results/recipe/baseline-quiet.json.
BASELINE_RUN = RESULTS / "baseline-quiet.json"


def baseline_train() -> dict:
    return dict(json.loads(BASELINE_RUN.read_text())["train_params"])


def committed() -> params.TrainParams:
    """params.yaml's train section: the recipe `make bench` times."""
    return params.load(ROOT / "params.yaml").train


def options(changes: list[str]) -> params.TrainParams:
    """The baseline train params with `key=value` changes (YAML values), validated."""
    section = baseline_train()
    for item in changes:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. label_smoothing=0.1")
        section[key.removeprefix("train.")] = yaml.safe_load(value)
    return params.from_dict({"train": section}).train


# The committed recipe (params.yaml's train section) as changes to the baseline: the table's row 18
ROW_18 = ["dropout=0.25", "label_smoothing=0.1", "resize_ratio=1.0707", "val_size=0"]

# `plan`: the runs behind the README's "What bought what" (readme_tables.ABLATION) and the final
# recipe's seed spread, in order; the weight average rides along: it never feeds back into
# training, so a run with it also reports itself without it
PLAN = [
    ("do25", ["dropout=0.25"], 42),
    ("re_ema", ["dropout=0.25", "erasing=0.5", "ema_decay=0.999"], 42),
    ("ls_ema", ["dropout=0.25", "label_smoothing=0.1", "ema_decay=0.999"], 42),
    ("do0_ls", ["dropout=0.0", "label_smoothing=0.1"], 42),
    ("w3125_91", ["dropout=0.25", "label_smoothing=0.1", "width=0.3125", "image_size=91"], 42),
    ("w3125_e21", ["dropout=0.25", "label_smoothing=0.1", "width=0.3125", "epochs=21"], 42),
    ("wd1e4_ls", ["dropout=0.25", "label_smoothing=0.1", "weight_decay=0.0001"], 42),
    ("lr1_ls", ["dropout=0.25", "label_smoothing=0.1", "lr=0.1"], 42),
    ("do0_wd1e4_ls", ["dropout=0.0", "label_smoothing=0.1", "weight_decay=0.0001"], 42),
    ("b64_e28_ls", ["dropout=0.25", "label_smoothing=0.1", "batch_size=64", "lr=0.025", "epochs=28"], 42),
    # smaller random crops' range: the resize before the crop, image_size × resize_ratio
    ("rr107_ls", ["dropout=0.25", "label_smoothing=0.1", "resize_ratio=1.0707"], 42),
    ("rr104_ls", ["dropout=0.25", "label_smoothing=0.1", "resize_ratio=1.0404"], 42),
    ("rr100_ls", ["dropout=0.25", "label_smoothing=0.1", "resize_ratio=1.0"], 42),
    # on row 14's crops: no dropout again, and no validation hold-out (all 60,000 images train)
    ("rr107_do0_ls", ["dropout=0.0", "label_smoothing=0.1", "resize_ratio=1.0707"], 42),
    ("rr107_val0_ls", ["dropout=0.25", "label_smoothing=0.1", "resize_ratio=1.0707", "val_size=0"], 42),
    # row 14 again on the VM that ran rows 17-18 (AVX2, 2026-12-01): their like-for-like reference
    ("rr107_ls_milan", ["dropout=0.25", "label_smoothing=0.1", "resize_ratio=1.0707"], 42),
    # on row 18 (the committed recipe), one thread: more label smoothing, a little random erasing
    ("rr107_val0_ls20", ["dropout=0.25", "label_smoothing=0.2", "resize_ratio=1.0707", "val_size=0"], 42),
    (
        "rr107_val0_ls_re15",
        ["dropout=0.25", "label_smoothing=0.1", "resize_ratio=1.0707", "val_size=0", "erasing=0.15"],
        42,
    ),
    # on row 18, one thread: less regularisation, for a model whose augmented training accuracy
    # (94.5% in row 18's last epoch) is not far above its test accuracy: no PCA lighting, less dropout
    ("rr107_val0_ls_l0", [*ROW_18, "lighting_std=0.0"], 42),
    ("rr107_val0_ls_do10", [*ROW_18, "dropout=0.1"], 42),
    # on row 18, one thread: the schedule's two ways to less time, a larger batch (2.7% more img/s
    # than row 18's step) and fewer epochs (28 of 30 would fit 958 s into 900)
    ("rr107_val0_ls_b256", [*ROW_18, "batch_size=256", "lr=0.1"], 42),
    ("rr107_val0_ls_e28", [*ROW_18, "epochs=28"], 42),
    # on row 18, one thread: the optimiser, the other way from row 10 (weight decay) and more momentum
    ("rr107_val0_ls_wd1e3", [*ROW_18, "weight_decay=0.001"], 42),
    ("rr107_val0_ls_m95", [*ROW_18, "momentum=0.95"], 42),
]
FINAL_SEEDS = (1, 2)


def plan(args) -> None:
    """Run every PLAN entry and the committed recipe at FINAL_SEEDS whose result is missing."""
    runs = [(name, changes, seed) for name, changes, seed in PLAN]
    runs += [("final", None, seed) for seed in FINAL_SEEDS]
    for name, changes, seed in runs:
        if (RESULTS / f"{name}-seed{seed}.json").exists() and not args.force:
            print(f"{name} (seed {seed}): done, skipped (--force reruns it)")
            continue
        accuracy(argparse.Namespace(name=name, set=changes, seed=seed, data=args.data, threads=args.threads))


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def accuracy(args) -> None:
    opts = options(args.set) if args.set is not None else committed()
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    started = time.time()
    save = ROOT / "artifacts" / "bench" / f"{args.name}-seed{args.seed}.pt"  # git-ignored, for bench_int8
    run = bench_train.accuracy_run(args.data, opts, device, args.seed, ten_crop=True, save=save)
    result = {
        "name": args.name,
        "command": command(),
        "changes": args.set if args.set is not None else "params.yaml",
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "train_params": vars(opts),
        "test_accuracy_ten_crop": run["test_accuracy_ten_crop"],
        "test_accuracy_center_crop": run["test_accuracy_center_crop"],
        # on a shared machine these seconds are not the recipe's: see `table`
        "train_seconds_as_run": run["train_seconds"],
        # with train.ema_decay: the same run's raw weights (the average never feeds back into training)
        "without_average": run.get("without_average"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "history": run["history"],
    }
    out = RESULTS / f"{args.name}-seed{args.seed}.json"
    bench_train.write_json_atomic(out, result)
    print(
        f"{args.name} (seed {args.seed}): test accuracy {result['test_accuracy_ten_crop']:.4f} 10-crop, "
        f"{result['test_accuracy_center_crop']:.4f} centre; wrote {out}"
    )


def cost(args) -> None:
    """img/s of each variant's training step against the baseline recipe's, step by step in turns.

    The variants alternate one step at a time, so that other processes slow them alike; each
    variant's speed is its batch over the `--quantile` (default: the lower quartile) of its
    step times, which leaves out the steps that another process interrupted.
    """
    torch.set_num_threads(1 if args.clock == "cpu" else args.threads)
    device = torch.device("cpu")
    images, labels = bench_train.synthetic(4096)
    variants = {"baseline": options([])}
    for spec in args.variants:
        name, _, changes = spec.partition("=")
        variants[name] = options([c for c in changes.split(",") if c])
    steps = {
        name: bench_train.alexops_step(images, labels, opts, device)[:2] for name, opts in variants.items()
    }
    for step, _ in steps.values():  # warm-up: first calls pick kernels and touch fresh memory
        for _ in range(3):
            step()
    # cpu: this thread's own CPU seconds (one thread only), which other processes on the
    # cores do not inflate as they do wall-clock seconds
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, (step, _) in steps.items():
            started = clock()
            step()
            times[name].append(clock() - started)
    speed = {
        name: steps[name][1] / statistics.quantiles(times[name], n=100)[round(100 * args.quantile) - 1]
        for name in variants
    }
    median = {name: steps[name][1] / statistics.median(times[name]) for name in variants}
    result = {
        "command": command(),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "quantile": args.quantile,
        "clock": args.clock,
        "loadavg_1min": os.getloadavg()[0],
        "variants": {},
    }
    for name, opts in variants.items():
        result["variants"][name] = {
            "train_params": vars(opts),
            "img_per_s": speed[name],
            "img_per_s_median_step": median[name],
            "speed_vs_baseline": speed[name] / speed["baseline"],
            "speed_vs_baseline_median_step": median[name] / median["baseline"],
        }
        print(
            f"{name}: {speed[name] / speed['baseline']:.3f}× the baseline step "
            f"(median steps: {median[name] / median['baseline']:.3f}×; {speed[name]:.0f} img/s)"
        )
    out = RESULTS / (args.out or "cost.json")
    bench_train.write_json_atomic(out, result)
    print(f"wrote {out}")


def table(args) -> None:
    quiet = json.loads(BASELINE_RUN.read_text())
    base_seconds, base_epochs = quiet["accuracy_run"]["train_seconds"], quiet["train_params"]["epochs"]
    costs = {}
    for path in sorted(RESULTS.glob("cost*.json")):
        costs |= json.loads(path.read_text())["variants"]
    print("| variant | changes | seed | test acc. (10-crop) | centre crop | est. quiet s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in sorted(RESULTS.glob("*-seed*.json")):
        r = json.loads(path.read_text())
        speed = costs.get(r["name"], {}).get("speed_vs_baseline")
        epochs = r["train_params"]["epochs"]
        seconds = f"{base_seconds * epochs / base_epochs / speed:.0f}" if speed else "?"
        print(
            f"| {r['name']} | {', '.join(r['changes']) or '(baseline)'} | {r['seed']} | "
            f"{r['test_accuracy_ten_crop']:.2%} | {r['test_accuracy_center_crop']:.2%} | {seconds} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    sub = parser.add_subparsers(dest="mode", required=True)
    acc = sub.add_parser("accuracy", help="one training run: the baseline with --set changes")
    acc.add_argument("name")
    acc.add_argument("--set", action="append", default=[])
    acc.add_argument("--committed", dest="set", action="store_const", const=None, help="params.yaml's recipe")
    acc.add_argument("--seed", type=int, default=42)
    acc.add_argument("--data", type=Path, default=DATA)
    cst = sub.add_parser("cost")
    cst.add_argument("variants", nargs="*", help="NAME=KEY=VALUE,KEY=VALUE")
    cst.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    cst.add_argument("--quantile", type=float, default=0.25, help="of the step times (0.5: median)")
    cst.add_argument("--out", default=None, help="file name under results/recipe (default cost.json)")
    cst.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: thread CPU time, 1 thread"
    )
    sub.add_parser("table")
    pln = sub.add_parser("plan", help="every run of PLAN and the final recipe's seeds not yet done")
    pln.add_argument("--data", type=Path, default=DATA)
    pln.add_argument("--force", action="store_true")
    args = parser.parse_args()
    {"accuracy": accuracy, "cost": cost, "table": table, "plan": plan}[args.mode](args)


if __name__ == "__main__":
    main()
