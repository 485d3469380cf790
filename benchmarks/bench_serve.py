"""Serving speed: PyTorch eager vs onnxruntime fp32 vs int8, `alexops serve` under load, and
`alexops serve` against `mlflow models serve` on the same registered model.

    python benchmarks/bench_serve.py [--root .] [--seconds 30] [--clients 16] [--payload png|json]
        [--serve-model fp32|int8] [--skip-models] [--skip-load] [--skip-mlflow]
        [--registered-model models:/NAME@ALIAS] [--rounds 3] [--round-seconds 10] [--out FILE]

1. models, on the pipeline's trained artifacts (artifacts/<dataset>/model.pt, model.onnx,
   model.int8.onnx when the quantize stage has run): batch-1 latency (median) and
   batch-64 throughput of each, on real test images, with centre-crop test accuracy on the
   whole prepared test set; speed-ups as the median of each round's pair (min and max too);
2. load: `alexops serve` on loopback with `--clients` concurrent keep-alive connections
   posting real Fashion-MNIST test images as PNG files (or preprocessed JSON arrays) for
   `--seconds`: requests/s, p50/p99 latency, errors, the server's mean batch size;
3. against MLflow: `mlflow models serve` (MLflow's own scoring server, its default one
   worker) and `alexops serve` both on `--registered-model` (default the params' model at
   @champion, from MLFLOW_TRACKING_URI or ./mlflow.db), both answering the same
   `POST /invocations` bodies (one preprocessed test image each, JSON `{"inputs": ...}`).
   Closed loop: `--clients` keep-alive connections, each sending its next request when the
   last is answered. Open loop: requests sent on a fixed schedule at a constant rate (80% of
   MLflow's closed-loop rate), latency counted from when each request was due, so that a
   slow answer is not hidden by the requests it delayed. The two servers take turns in
   `--rounds` rounds of `--round-seconds` each; ratios are per round, then the median.

The load generator is a minimal HTTP/1.1 client on asyncio streams, so that on a small
machine as little CPU as possible goes to the clients rather than the server. Results are
printed and written as JSON (default benchmarks/results/serve.json).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from alexops import augment, files, params, tracking  # noqa: E402
from alexops.model import load_trained  # noqa: E402
from alexops.paths import Paths  # noqa: E402
from alexops.prepare import load_split  # noqa: E402
from alexops.serving.model import session_options  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serve.json"
GOALS = {
    "onnxruntime_vs_eager": "≥ 1.5×",
    "int8_vs_fp32": "≥ 2× at ≤ 0.5 points accuracy drop",
    "load": "≥ 500 req/s at p99 ≤ 50 ms, 0 errors",
    "vs_mlflow": "alexops ≥ 5× mlflow models serve's req/s (closed loop) at a lower p99",
}


# ---- 1. the models side by side -----------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def timed(run, repeats: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def settle() -> None:
    """Let the last model's idle threads park before the next model is timed.

    onnxruntime's pool threads spin for a while after each run; on a 2-core machine they
    halved the speed of a PyTorch run started right after them (2,543 vs 5,165 img/s).
    """
    time.sleep(0.2)


def runners(paths: Paths) -> dict:
    """name → a function from a float (N, C, S, S) array to logits, for each model present."""
    model, _, _, _ = load_trained(paths.model, "cpu")
    # PyTorch at its best here: channels-last ran 1.5× faster than NCHW at batch 64 (2-core CPU)
    model = model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def eager(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    found = {"pytorch_eager": eager}
    for name, path in (("onnxruntime_fp32", paths.onnx), ("onnxruntime_int8", paths.int8_onnx)):
        if path.exists():
            # the server's settings, but onnxruntime's threads spinning (the server's sleep between
            # runs, which costs a batch-1 call its threads' wake-up: here the model alone is timed)
            options = session_options(0)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            found[name] = lambda x, s=session: s.run(None, {"image": x})[0]
    return found


def measure_models(paths: Paths, quick: bool, rounds: int = 10) -> dict:
    _, _, recipe, _ = load_trained(paths.model, "cpu")
    images, labels = load_split(paths.prepared / "test.pt")
    one = augment.preprocess(images[:1], recipe).numpy()
    batch = augment.preprocess(images[1:65], recipe).numpy()
    found = runners(paths)
    latency, throughput = {name: [] for name in found}, {name: [] for name in found}
    for run in found.values():  # warm up once, outside the timed rounds
        for _ in range(5):
            run(one), run(batch)
    # Rounds interleave the models, and ratios are taken within a round, so that the drift of
    # a shared machine's speed (±30% here over minutes) slows both sides of a ratio alike
    single_calls, batch_calls = (5, 1) if quick else (30, 10)
    for _ in range(rounds):
        for name, run in found.items():
            settle()
            latency[name].append(statistics.median(timed(lambda run=run: run(one), single_calls, 1)))
            settle()
            seconds = statistics.median(timed(lambda run=run: run(batch), batch_calls, 1))
            throughput[name].append(len(batch) / seconds)
    results = {}
    for name, run in found.items():
        results[name] = {
            "batch1_latency_ms_median": 1e3 * statistics.median(latency[name]),
            "batch1_latency_ms_by_round": [1e3 * t for t in latency[name]],
            "batch64_images_per_s": statistics.median(throughput[name]),
            "batch64_images_per_s_by_round": throughput[name],
            "test_accuracy_center_crop": accuracy(run, images, labels, recipe),
        }
        print(f"{name:18s} {table_row(results[name])}", flush=True)
    return results


def accuracy(run, images: torch.Tensor, labels: torch.Tensor, recipe: augment.Recipe) -> float:
    correct = 0
    for start in range(0, len(images), 256):
        x = augment.preprocess(images[start : start + 256], recipe).numpy()
        correct += int((run(x).argmax(1) == labels[start : start + 256].numpy()).sum())
    return correct / len(labels)


def table_row(r: dict) -> str:
    return (
        f"batch-1 {r['batch1_latency_ms_median']:7.3f} ms   "
        f"batch-64 {r['batch64_images_per_s']:8.0f} img/s   accuracy {r['test_accuracy_center_crop']:.4f}"
    )


STATS = {"": statistics.median, "_min": min, "_max": max}


def paired(fast: dict, slow: dict) -> dict:
    """Speed-ups of `fast` over `slow`, one per round from that round's two measurements."""
    latency, speed = "batch1_latency_ms_by_round", "batch64_images_per_s_by_round"
    by_round = {
        "batch1": [s / f for f, s in zip(fast[latency], slow[latency], strict=True)],
        "batch64": [f / s for f, s in zip(fast[speed], slow[speed], strict=True)],
    }
    return {f"{batch}{stat}": fn(values) for batch, values in by_round.items() for stat, fn in STATS.items()}


def ratios(results: dict) -> dict:
    eager, fp32, int8 = (results.get(k) for k in ("pytorch_eager", "onnxruntime_fp32", "onnxruntime_int8"))
    out = {}
    if fp32:
        out |= {f"onnxruntime_vs_eager_{k}": v for k, v in paired(fp32, eager).items()}
    if fp32 and int8:
        out |= {f"int8_vs_fp32_{k}": v for k, v in paired(int8, fp32).items()}
        drop = fp32["test_accuracy_center_crop"] - int8["test_accuracy_center_crop"]
        out["int8_accuracy_drop_points"] = 100 * drop
    return out


# ---- 2. the server under load -------------------------------------------------------------


def png_bodies(images: torch.Tensor, boundary: str) -> list[bytes]:
    bodies = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
        bodies.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + buffer.getvalue()
            + f"\r\n--{boundary}--\r\n".encode()
        )
    return bodies


def requests_for(images: torch.Tensor, recipe: augment.Recipe, payload: str, host: str) -> list[bytes]:
    """Complete HTTP/1.1 requests (head and body), built once before the clock starts."""
    if payload == "png":
        boundary = "alexopsbench"
        bodies, content_type = png_bodies(images, boundary), f"multipart/form-data; boundary={boundary}"
    else:
        x = augment.preprocess(images, recipe).numpy()
        bodies, content_type = (
            [json.dumps({"inputs": [row.tolist()]}).encode() for row in x],
            "application/json",
        )
    head = "POST /v1/predict?top_k=1 HTTP/1.1\r\nHost: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n"
    return [head.format(host, content_type, len(body)).encode() + body for body in bodies]


def run(coroutine):
    """asyncio.run on uvloop: the load generator shares the cores with the server it loads, so the
    less CPU it spends per request, the less it holds the server back (both servers alike)."""
    import uvloop

    return uvloop.run(coroutine)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    return status, await reader.readexactly(length)


async def client(
    host: str, port: int, requests: list[bytes], offset: int, until: float, record: dict
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            try:
                status, body = await read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                record["errors"].append(repr(exc))
                return
            record["latencies"].append(time.perf_counter() - started)
            if status != 200 or b'"predictions"' not in body:
                record["errors"].append(f"{status}: {body[:200]!r}")
    finally:
        writer.close()


async def load(host: str, port: int, requests: list[bytes], clients: int, seconds: float) -> dict:
    record = {"latencies": [], "errors": []}
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(client(host, port, requests, 7 * i, until, record) for i in range(clients)))
    elapsed = time.perf_counter() - started
    latencies = record["latencies"]
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "latency_ms_p50": 1e3 * percentile(latencies, 50) if latencies else None,
        "latency_ms_p99": 1e3 * percentile(latencies, 99) if latencies else None,
        "errors": len(record["errors"]),
        "first_errors": record["errors"][:5],
    }


def start_server(
    model: Path | str, log: Path, extra: list[str], env: dict | None = None
) -> tuple[subprocess.Popen, str, int]:
    command = [sys.executable, "-m", "alexops.cli", "serve", "--model-uri", str(model), "--port", "0", *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if found := re.search(r"listening on http://([\d.]+):(\d+)", log.read_text()):
            return process, found.group(1), int(found.group(2))
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"bench_serve: the server did not start:\n{log.read_text()}")


def server_batch_mean(host: str, port: int) -> float | None:
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    total = re.search(r"^alexops_batch_size_sum (\S+)$", text, re.MULTILINE)
    count = re.search(r"^alexops_batch_size_count (\S+)$", text, re.MULTILINE)
    return (
        float(total.group(1)) / float(count.group(1)) if total and count and float(count.group(1)) else None
    )


def measure_load(paths: Paths, args: argparse.Namespace) -> dict:
    model = paths.int8_onnx if args.serve_model == "int8" else paths.onnx
    _, _, recipe, _ = load_trained(paths.model, "cpu")
    images, _ = load_split(paths.prepared / "test.pt")
    extra = ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    with tempfile.TemporaryDirectory() as tmp:
        process, host, port = start_server(model, Path(tmp) / "serve.log", extra)
        try:
            requests = requests_for(images[:512], recipe, args.payload, f"{host}:{port}")
            run(load(host, port, requests, args.clients, 3.0))  # warm-up, not reported
            result = run(load(host, port, requests, args.clients, args.seconds))
            result["server_mean_batch_size"] = server_batch_mean(host, port)
        finally:
            process.terminate()
            process.wait(timeout=30)
    result |= {"clients": args.clients, "payload": args.payload, "model": model.name}
    result |= {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms}
    return result


# ---- 3. against `mlflow models serve` -------------------------------------------------------


def invocation_requests(x: np.ndarray, host: str) -> list[bytes]:
    """POST /invocations requests, one image each, JSON {"inputs": [[C × S × S]]} rounded to 4
    decimals (as a client would send them; it changes no prediction here)."""
    head = "POST /invocations HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n"
    head += "Content-Length: {}\r\n\r\n"
    bodies = [
        json.dumps({"inputs": np.round(row[None].astype(np.float64), 4).tolist()}).encode() for row in x
    ]
    return [head.format(host, len(body)).encode() + body for body in bodies]


async def open_loop(host: str, port: int, requests: list[bytes], rate: float, seconds: float) -> dict:
    """Requests due at a constant `rate`, each on an idle keep-alive connection (a new one when
    none is idle); latency counts from when a request was due, not from when it could be sent."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened: list[asyncio.StreamWriter] = []
    record = {"latencies": [], "errors": []}
    started = time.perf_counter() + 0.1
    count = int(rate * seconds)

    async def connect():
        reader, writer = await asyncio.open_connection(host, port)
        opened.append(writer)
        return reader, writer

    async def one(i: int) -> None:
        due = started + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        reused = bool(idle)
        reader, writer = idle.pop() if reused else await connect()
        writer.write(requests[i % len(requests)])
        try:
            status, body = await read_response(reader)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not reused:
                record["errors"].append(repr(exc))
                return
            # the server closed an idle keep-alive connection (uvicorn: after 5 s): resend on a new
            # one, as HTTP clients do; the time lost still counts, from when the request was due
            reader, writer = await connect()
            writer.write(requests[i % len(requests)])
            try:
                status, body = await read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as again:
                record["errors"].append(f"{exc!r}, then {again!r}")
                return
        record["latencies"].append(time.perf_counter() - due)
        if status != 200 or b'"predictions"' not in body:
            record["errors"].append(f"{status}: {body[:200]!r}")
        idle.append((reader, writer))

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    done, late = await asyncio.wait(tasks, timeout=seconds + 30)  # what is not answered by then failed
    for task in late:
        task.cancel()
    for writer in opened:
        writer.close()
    latencies = record["latencies"]
    return {
        "rate_per_s": rate,
        "requests": count,
        "answered": len(latencies),
        "unanswered_after_30s": len(late),
        "latency_ms_p50": 1e3 * percentile(latencies, 50) if latencies else None,
        "latency_ms_p99": 1e3 * percentile(latencies, 99) if latencies else None,
        "errors": len(record["errors"]) + len(late),
        "first_errors": record["errors"][:3],
    }


def start_mlflow(model_uri: str, log: Path, env: dict, workers: int) -> tuple[subprocess.Popen, str, int]:
    """`mlflow models serve` as a user runs it: the local environment, its scoring server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mlflow = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow, "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return process, "127.0.0.1", port
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"bench_serve: mlflow models serve did not start:\n{log.read_text()[-3000:]}")


def registered_version(model_uri: str, tracking_uri: str) -> tuple[str, str]:
    """(name, version) that a models:/name@alias or models:/name/version names now."""
    from alexops.serving.model import ModelSource, parse_model_uri

    ref = parse_model_uri(model_uri)
    if ref.path is not None:
        raise SystemExit(
            "bench_serve: --registered-model must be models:/<name>@<alias> or models:/<name>/<version>"
        )
    return ref.name, ModelSource(ref, tracking_uri).current_version()


def measure_vs_mlflow(paths: Paths, args: argparse.Namespace, tracking_uri: str) -> dict:
    from alexops.serving.model import ModelSource, parse_model_uri

    name, version = registered_version(args.registered_model, tracking_uri)
    uri = f"models:/{name}/{version}"  # both serve exactly this version
    model = ModelSource(parse_model_uri(uri), tracking_uri).load()
    images, _ = load_split(paths.prepared / "test.pt")
    x = augment.preprocess(images[:256], model.recipe).numpy()
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=tracking_uri,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    results = {"model": uri, "mlflow_workers": args.mlflow_workers, "closed": {}, "open": {}}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {
            "mlflow": start_mlflow(uri, Path(tmp) / "mlflow.log", env, args.mlflow_workers),
            "alexops": start_server(uri, Path(tmp) / "alexops.log", ["--reload-interval", "0"], env),
        }
        try:
            requests = {k: invocation_requests(x, f"{host}:{port}") for k, (_, host, port) in servers.items()}
            for key, (_, host, port) in servers.items():  # warm-up, not reported
                run(load(host, port, requests[key], args.clients, 3.0))
            for r in range(args.rounds):
                for key in sorted(servers, reverse=r % 2 == 1):  # alternate who goes first
                    process, host, port = servers[key]
                    settle()
                    result = measured(
                        process.pid, load(host, port, requests[key], args.clients, args.round_seconds)
                    )
                    results["closed"].setdefault(key, []).append(result)
                    print(f"  closed loop, round {r + 1}, {key:7s}: {summary(result)}", flush=True)
            rate = 0.8 * statistics.median(r["requests_per_s"] for r in results["closed"]["mlflow"])
            results["open_rate_per_s"] = rate
            for r in range(args.rounds):
                for key in sorted(servers, reverse=r % 2 == 1):
                    process, host, port = servers[key]
                    settle()
                    result = measured(
                        process.pid, open_loop(host, port, requests[key], rate, args.round_seconds)
                    )
                    results["open"].setdefault(key, []).append(result)
                    print(
                        f"  open loop at {rate:.0f}/s, round {r + 1}, {key:7s}: {summary(result)}", flush=True
                    )
        finally:
            for process, _, _ in servers.values():
                process.terminate()
                process.wait(timeout=60)
    results["summary"] = vs_mlflow_summary(results)
    return results


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants (a server's whole tree)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measured(pid: int, coroutine) -> dict:
    """The load `coroutine`'s result, with the server's CPU time per answered request: a figure
    that other processes on a shared machine slow down far less than requests per second."""
    before = cpu_seconds(pid)
    result = run(coroutine)
    answered = result.get("answered", result.get("requests", 0))
    result["server_cpu_ms_per_request"] = 1e3 * (cpu_seconds(pid) - before) / max(answered, 1)
    return result


def summary(result: dict) -> str:
    rate = f"{result['requests_per_s']:.0f} req/s, " if "requests_per_s" in result else ""
    p50, p99 = result["latency_ms_p50"], result["latency_ms_p99"]
    times = f"p50 {p50:.1f} ms, p99 {p99:.1f} ms" if p50 is not None else "no answers"
    cpu = f", server CPU {result['server_cpu_ms_per_request']:.2f} ms/request"
    return f"{rate}{times}, {result['errors']} errors{cpu}"


def vs_mlflow_summary(results: dict) -> dict:
    closed, opened = results["closed"], results["open"]
    med = statistics.median

    def per_round(table: dict, key: str) -> list[float]:
        return [a[key] / m[key] for a, m in zip(table["alexops"], table["mlflow"], strict=True)]

    out = {}
    for side in ("alexops", "mlflow"):
        out[f"closed_{side}_requests_per_s"] = med(r["requests_per_s"] for r in closed[side])
        out[f"closed_{side}_p50_ms"] = med(r["latency_ms_p50"] for r in closed[side])
        out[f"closed_{side}_p99_ms"] = med(r["latency_ms_p99"] for r in closed[side])
        out[f"closed_{side}_errors"] = sum(r["errors"] for r in closed[side])
        out[f"closed_{side}_cpu_ms_per_request"] = med(r["server_cpu_ms_per_request"] for r in closed[side])
        answered = [r for r in opened[side] if r["latency_ms_p99"] is not None]
        out[f"open_{side}_p50_ms"] = med(r["latency_ms_p50"] for r in answered) if answered else None
        out[f"open_{side}_p99_ms"] = med(r["latency_ms_p99"] for r in answered) if answered else None
        out[f"open_{side}_errors"] = sum(r["errors"] for r in opened[side])
    ratios = per_round(closed, "requests_per_s")
    out |= {"closed_speedup_median": med(ratios), "closed_speedup_min": min(ratios)}
    out["closed_speedup_max"] = max(ratios)
    pairs = zip(closed["alexops"], closed["mlflow"], strict=True)
    cpu = [m["server_cpu_ms_per_request"] / a["server_cpu_ms_per_request"] for a, m in pairs]
    out["closed_cpu_per_request_ratio_median"] = med(cpu)  # mlflow's CPU per request / alexops'
    out["open_rate_per_s"] = results["open_rate_per_s"]
    return out


# ---- main ---------------------------------------------------------------------------------


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],  # other processes skew every figure here
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="project root (default: .)")
    parser.add_argument("--params", type=Path, default=None, help="params file (default: ROOT/params.yaml)")
    parser.add_argument("--seconds", type=float, default=30.0, help="load test length (default 30)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent connections (default 16)")
    parser.add_argument("--payload", choices=("png", "json"), default="png")
    parser.add_argument("--serve-model", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--skip-models", action="store_true", help="no eager/onnxruntime/int8 comparison")
    parser.add_argument("--skip-load", action="store_true", help="no /v1 load test")
    parser.add_argument("--skip-mlflow", action="store_true", help="no comparison with mlflow models serve")
    parser.add_argument(
        "--registered-model", default=None,
        help="models:/<name>@<alias> or /<version> to compare with MLflow (default: the params' @champion)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="turns each server takes (default 3)")
    parser.add_argument("--round-seconds", type=float, default=10.0, help="length of a turn (default 10)")
    parser.add_argument(
        "--mlflow-workers", type=int, default=1, help="mlflow models serve -w (default 1, its own)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    loaded = params.load(args.params or root / "params.yaml")
    paths = Paths(root, loaded.base.dataset)
    needed = [paths.prepared / "test.pt"] + (
        [] if args.skip_models and args.skip_load else [paths.model, paths.onnx]
    )
    missing = [p for p in needed if not p.exists()]
    if missing:
        print(f"bench_serve: {', '.join(map(str, missing))} missing. Run `make run` first.", file=sys.stderr)
        return 2
    if args.serve_model == "int8" and not args.skip_load and not paths.int8_onnx.exists():
        print(f"bench_serve: {paths.int8_onnx} missing. Run `dvc repro quantize` first.", file=sys.stderr)
        return 2
    # sections not measured in this run keep their figures from the last run that measured them
    payload = json.loads(args.out.read_text()) if args.out.exists() else {}
    payload |= {"machine": machine(), "goals": GOALS}
    if not args.skip_models:
        print(f"models on {machine()['cpu']}, {os.cpu_count()} CPUs:")
        models = measure_models(paths, args.quick)
        compared = ratios(models)
        for name, value in compared.items():
            if not name.endswith(("_min", "_max")):
                spread = (
                    f" ({compared[name + '_min']:.2f}–{compared[name + '_max']:.2f} by round)"
                    if name + "_min" in compared
                    else ""
                )
                print(f"  {name}: {value:.2f}{spread}")
        payload |= {"models": models, "ratios": compared}
    if not args.skip_load:
        payload["load"] = measure_load(paths, args)
        r = payload["load"]
        print(
            f"load ({r['clients']} clients, {r['payload']}, {r['seconds']:.0f} s): "
            f"{r['requests_per_s']:.0f} req/s, "
            f"p50 {r['latency_ms_p50']:.1f} ms, p99 {r['latency_ms_p99']:.1f} ms, {r['errors']} errors, "
            f"mean batch {r['server_mean_batch_size']}"
        )
    if not args.skip_mlflow:
        registered = (
            args.registered_model or f"models:/{loaded.register.model_prefix}-{loaded.base.dataset}@champion"
        )
        args.registered_model = registered
        print(f"against mlflow models serve ({registered}, POST /invocations, {args.clients} clients):")
        compared = measure_vs_mlflow(paths, args, tracking.tracking_uri(root))
        payload["vs_mlflow"] = compared | {"machine": machine()}
        r = payload["vs_mlflow"]["summary"]
        print(
            f"  closed loop: alexops {r['closed_alexops_requests_per_s']:.0f} req/s "
            f"(p99 {r['closed_alexops_p99_ms']:.1f} ms) "
            f"vs mlflow {r['closed_mlflow_requests_per_s']:.0f} req/s "
            f"(p99 {r['closed_mlflow_p99_ms']:.1f} ms): {r['closed_speedup_median']:.1f}× "
            f"({r['closed_speedup_min']:.1f}–{r['closed_speedup_max']:.1f}× by round)"
        )
        print(
            f"  open loop at {r['open_rate_per_s']:.0f} req/s: p99 alexops {r['open_alexops_p99_ms']} ms, "
            f"mlflow {r['open_mlflow_p99_ms']} ms"
        )
    files.write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
