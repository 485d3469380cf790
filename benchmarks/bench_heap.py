"""A CPU training step with glibc's default malloc against `train.keep_freed_memory`, side by side.

    python benchmarks/bench_heap.py [--rounds 5] [--steps 20] [--paper-steps 3]

Each round starts one child process of each kind, taking turns (mallopt(3) settings hold for a
whole process, so the two cannot share one). A child builds the model as `train.build` does,
with the allocator settings or without them, trains `--warmup` untimed steps, then times
`--steps` steps of the training loop's own `train_step` on random uint8 images, augmentation
included. Two models: the default params (99 px, width 0.25) and the `paper` preset (227 px,
width 1.0, fp32). The ratio is taken round by round; the children's last losses are compared
to the bit, since the allocator must not change what is computed.

Writes benchmarks/results/heap.json with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = {"default": ["--params", "params.yaml"], "paper": ["--preset", "paper", "--set", "amp=false"]}
KINDS = ("glibc default", "keep_freed_memory")


def cpu() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model (one name covers several)."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():
            break
    avx512 = "AVX-512" if "avx512f" in fields.get("flags", "").split() else "no AVX-512"
    family, model = fields.get("cpu family"), fields.get("model")
    return f"{fields.get('model name')} (family {family} model {model}, {avx512})"


def child(args) -> None:
    """One process: time the steps and print one JSON line."""
    import torch

    from alexops import train

    if args.child == KINDS[0]:
        train.keep_freed_memory = lambda: False  # build's call then leaves glibc as it is
    import bench_train

    opts = bench_train.train_params(args)
    side = round(opts.image_size * opts.resize_ratio)
    generator = torch.Generator().manual_seed(0)
    shape = (4 * opts.batch_size, 1, side, side)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (len(images),), generator=generator)
    step, per_step, session = bench_train.alexops_step(images, labels, opts, torch.device("cpu"))
    for _ in range(args.warmup):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - started
    weights = sum(float(p.double().sum()) for p in session.model.parameters())
    print(json.dumps({
        "img_per_s": args.steps * per_step / seconds,
        "weights_sum": repr(weights),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))  # fmt: skip


def run_child(kind: str, model: str, steps: int, args) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--steps", str(steps), "--warmup", str(args.warmup),
               *MODELS[model]]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(model: str, steps: int, args) -> dict:
    rounds = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            rounds[kind].append(run_child(kind, model, steps, args))
        last = [rounds[kind][-1]["img_per_s"] for kind in KINDS]
        print(f"{model}: {last[0]:.0f} img/s with glibc's defaults, {last[1]:.0f} with keep_freed_memory "
              f"(×{last[1] / last[0]:.3f})", flush=True)  # fmt: skip
    ratios = [b["img_per_s"] / a["img_per_s"] for a, b in zip(*rounds.values(), strict=True)]
    return {
        "steps": steps,
        "img_per_s": {kind: statistics.median(r["img_per_s"] for r in runs) for kind, runs in rounds.items()},
        "speedup": statistics.median(ratios),
        "speedup_by_round": ratios,
        "same_weights": len({r["weights_sum"] for runs in rounds.values() for r in runs}) == 1,
        "max_rss_mib": {kind: max(r["max_rss_mib"] for r in runs) for kind, runs in rounds.items()},
        "by_round": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the default model per child")
    parser.add_argument("--paper-steps", type=int, default=3, help="timed steps of the paper-size model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "heap.json")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    # a child's model, as bench_train.train_params reads it
    parser.add_argument("--params", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.epochs, args.compile = 0, False
        return child(args)
    result = {
        "command": shlex.join(["python", "benchmarks/bench_heap.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "cpu": cpu(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rounds": args.rounds,
        "models": {
            "default": compare("default", args.steps, args),
            "paper": compare("paper", args.paper_steps, args),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
