"""Cost of tracking: the team stack's MLflow server (PostgreSQL + S3) against the embedded SQLite
store, side by side in one run.

    python benchmarks/bench_tracking.py [--stack-dir DIR] [--rounds 6] [--epochs 30] [--out FILE]

Two measurements, through alexops' own tracking and register code (in this process, so that
the seconds of Python imports every stage pays equally on both sides are left out):

1. per-epoch overhead: train's `mlflow.log_metrics` of one epoch's row (train/val loss and
   accuracy, lr, seconds) inside a run opened by `tracking.new_run`, `--epochs` times per round;
   checkpoints aside. Also as a share of the default recipe's epoch (reports/<dataset>/train.json);
2. register: `register.run` on the default model (99 px, width 0.25, exported to ONNX here):
   `mlflow.onnx.log_model` with signature and input example, registry tags, the @champion
   decision under its lock and the description. Each round registers new weights (one bias
   nudged), since register does not register identical weights twice.

The two stores take turns (server, SQLite, then SQLite, server, ...), so that a machine whose
speed drifts slows both alike; ratios are the median of each round's server/SQLite pair.
Without `--stack-dir` the benchmark starts a stack of its own in a temporary directory on free
ports and stops it at the end. Results are printed and written as JSON (default
benchmarks/results/tracking.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from alexops import export, files, params, register, tracking  # noqa: E402
from alexops.model import AlexNet  # noqa: E402
from alexops.paths import Paths  # noqa: E402
from stack.services import Stack  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "tracking.json"
EPOCH_ROW = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")  # train's row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stack-dir", type=Path, help="a running stack (make stack: .stack); default: a new one"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=30, help="log_metrics calls per round and store")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging_quiet()
    with stack_for(args.stack_dir) as team, tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        base = Path(tmp)
        proto = default_model()
        stores = {
            "server": (team.url("mlflow"), project_root(base / "server", proto)),
            "sqlite": (f"sqlite:///{base}/sqlite/mlflow.db", project_root(base / "sqlite", proto)),
        }
        samples = measure(stores, proto, args.rounds, args.epochs)
        result = summarise(samples, args, team)
    files.write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    print(f"written to {args.out}")


def logging_quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def stack_for(state: Path | None):
    if state is not None:
        team = Stack(state)
        down = [s for s, up in team.status().items() if not up]
        if down:
            raise SystemExit(f"the stack in {state} is not running ({', '.join(down)} down): `make stack`")
        yield team
        return
    directory = Path(tempfile.mkdtemp(prefix="alexops-bench-stack-"))  # reachable by the postgres user
    team = Stack(directory, preferred_ports=None)
    try:
        team.up(log=lambda line: print(line, file=sys.stderr))
        yield team
    finally:
        team.down(log=lambda line: None)
        shutil.rmtree(directory, ignore_errors=True)


def default_model() -> onnx.ModelProto:
    """The default recipe's network (params.yaml: 99 px, width 0.25, Fashion-MNIST) as ONNX."""
    defaults = params.load(REPO / "params.yaml").train
    model = AlexNet(1, 10, image_size=defaults.image_size, width=defaults.width, init=defaults.init)
    proto = export.to_onnx(model, torch.zeros(2, 1, defaults.image_size, defaults.image_size), 18)
    recipe = {"resize": defaults.image_size, "crop": defaults.image_size, "mean": [0.5], "std": [0.25]}
    export.add_metadata(proto, [str(c) for c in range(10)], recipe, {"width": defaults.width})
    return proto


def project_root(root: Path, proto: onnx.ModelProto) -> Paths:
    """What register reads: the ONNX model and evaluate's and export's reports."""
    paths = Paths(root, "fashion-mnist")
    paths.prepared.mkdir(parents=True)
    (paths.prepared / "train.pt").write_bytes(b"stands in for the prepared data (its hash names it)")
    files.write_bytes(paths.onnx, proto.SerializeToString())
    evaluation = {"accuracy": 0.9, "accuracy_center_crop": 0.9, "loss_center_crop": 0.3, "ten_crop": True}
    files.write_json(paths.reports / "evaluate.json", evaluation)
    parity = {"parity_max_abs_diff_batch1": 1e-6, "parity_passed": True, "parity_tolerance": 1e-4}
    files.write_json(paths.reports / "export.json", parity)
    return paths


def nudged(proto: onnx.ModelProto, amount: float) -> bytes:
    """The model with one weight moved by `amount`: new weights, same size and graph."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    weight = next(i for i in copy.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims)
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] += amount
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    return copy.SerializeToString()


def measure(stores: dict, proto: onnx.ModelProto, rounds: int, epochs: int) -> dict:
    run_params = params.load(REPO / "params.yaml")
    samples = {name: {"log_metrics_s": [], "round_log_metrics_s": [], "register_s": []} for name in stores}
    order = list(stores)
    for index in range(-1, rounds):  # round -1 warms up (first connections, lazy imports): not kept
        for name in order if index % 2 == 0 else order[::-1]:
            uri, paths = stores[name]
            os.environ["MLFLOW_TRACKING_URI"] = uri
            calls = log_epochs(run_params, paths, epochs)
            files.write_bytes(paths.onnx, nudged(proto, 1e-3 * (index + 2)))
            started = time.perf_counter()
            register.run(run_params, paths)
            seconds = time.perf_counter() - started
            if not registered_anew(paths):
                raise SystemExit(f"{name}: register did not register new weights; the benchmark needs it to")
            if index >= 0:
                samples[name]["log_metrics_s"] += calls
                samples[name]["round_log_metrics_s"].append(statistics.median(calls))
                samples[name]["register_s"].append(seconds)
        if index < 0:
            continue
        said = [
            f"{n} log {1e3 * s['round_log_metrics_s'][-1]:.1f} ms, register {s['register_s'][-1]:.2f} s"
            for n, s in samples.items()
        ]
        print(f"round {index + 1}/{rounds}: " + "; ".join(said), file=sys.stderr)
    return samples


def registered_anew(paths: Paths) -> bool:
    return bool(json.loads((paths.reports / "register.json").read_text()).get("registered"))


def log_epochs(run_params, paths: Paths, epochs: int) -> list[float]:
    """Seconds of each epoch's log_metrics, in a run opened as train opens it."""
    rng = np.random.default_rng(0)
    durations = []
    with tracking.new_run(run_params, paths) as mlflow:
        for epoch in range(1, epochs + 1):
            row = {key: float(rng.random()) for key in EPOCH_ROW}
            started = time.perf_counter()
            mlflow.log_metrics(row, step=epoch)
            durations.append(time.perf_counter() - started)
    return durations


def summarise(samples: dict, args, team: Stack) -> dict:
    epoch_s = default_epoch_seconds()
    summary = {}
    for name, s in samples.items():
        per_epoch = statistics.median(s["log_metrics_s"])
        summary[name] = {
            "log_metrics_per_epoch_ms_median": round(1e3 * per_epoch, 2),
            "log_metrics_per_epoch_ms_p95": round(1e3 * float(np.percentile(s["log_metrics_s"], 95)), 2),
            "share_of_default_epoch_percent": round(100 * per_epoch / epoch_s, 4) if epoch_s else None,
            "register_s_median": round(statistics.median(s["register_s"]), 3),
            "register_s_range": [round(min(s["register_s"]), 3), round(max(s["register_s"]), 3)],
        }
    server, sqlite = samples["server"], samples["sqlite"]
    log_ratios = [
        a / b for a, b in zip(server["round_log_metrics_s"], sqlite["round_log_metrics_s"], strict=True)
    ]
    register_ratios = [a / b for a, b in zip(server["register_s"], sqlite["register_s"], strict=True)]
    summary["server_vs_sqlite"] = {
        "log_metrics_ratio_median": round(statistics.median(log_ratios), 3),
        "log_metrics_ratio_range": [round(min(log_ratios), 3), round(max(log_ratios), 3)],
        "register_ratio_median": round(statistics.median(register_ratios), 3),
        "register_ratio_range": [round(min(register_ratios), 3), round(max(register_ratios), 3)],
    }
    return {
        "summary": summary,
        "default_epoch_seconds": epoch_s,
        "rounds": args.rounds,
        "epochs_per_round": args.epochs,
        "server": {
            "uri": team.url("mlflow"),
            "backend": "PostgreSQL",
            "artifacts": "SeaweedFS (S3), proxied",
        },
        "sqlite": "sqlite:///<tmp>/mlflow.db, artifacts in a local directory beside it",
        "samples": samples,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def default_epoch_seconds() -> float | None:
    """One epoch of the default recipe, from the committed report of its `make run`."""
    report = REPO / "reports" / "fashion-mnist" / "train.json"
    if not report.exists():
        return None
    train = json.loads(report.read_text())
    return round(train["train_seconds"] / train["epochs"], 2)


if __name__ == "__main__":
    main()
