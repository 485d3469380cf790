"""`alexops serve` and `alexops predict`: the commands that are not pipeline stages.

Their arguments live here so that `alexops --help` and the stages never import the
serving stack (FastAPI, onnxruntime, torch, MLflow); each command imports it when run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAMES = ("serve", "predict")
DEFAULT_MAX_PIXELS = 4096 * 4096
CAPTURE_MODES = ("auto", "dataset", "none")  # alexops.images.CAPTURE_MODES, without importing it here
MODEL_URI_HELP = (
    "models:/<name>@<alias>, models:/<name>/<version> or a path to an .onnx file "
    "(default: models:/<the params' registered model>@champion, from MLFLOW_TRACKING_URI or ./mlflow.db)"
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a model over HTTP with onnxruntime")
    _model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port (default: 8000; 0: any free port)")
    serve.add_argument(
        "--max-batch-size", type=_positive(int), default=64, help="inputs merged into one onnxruntime call"
    )
    serve.add_argument(
        "--max-wait-ms", type=_non_negative(float), default=5.0, help="longest wait for a batch to fill (ms)"
    )
    serve.add_argument(
        "--reload-interval", type=_non_negative(float), default=2.0,
        help="seconds between checks of a models:/<name>@<alias> for a new version (0: never)",
    )  # fmt: skip
    serve.add_argument(
        "--max-body-mb", type=_positive(float), default=16.0, help="largest request body (MiB; 413 beyond)"
    )

    predict = sub.add_parser("predict", help="top-k classes of image files, one JSON line per image")
    _model_arguments(predict)
    predict.add_argument("--top-k", type=_positive(int), default=5, help="classes per image (default: 5)")
    predict.add_argument(
        "--capture", choices=CAPTURE_MODES, default="auto",
        help="bring photos into the dataset's form (its capture recipe, in the model's metadata): "
        "auto (when an image is not in that form already; default), dataset (always), none (never)",
    )  # fmt: skip
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, ...)")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-uri", default=None, help=MODEL_URI_HELP)
    parser.add_argument(
        "--model-name", default=None, metavar="NAME",
        help="the name an .onnx file's model answers to, in every response and in /v2/models/<name> "
        "(default: the file's name without .onnx; a registered model keeps its registered name)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=_non_negative(int), default=0,
        help="onnxruntime intra-op threads (default 0: one per physical core)",
    )  # fmt: skip
    parser.add_argument(
        "--max-pixels", type=_positive(int), default=DEFAULT_MAX_PIXELS,
        help=f"largest image decoded, width × height (default {DEFAULT_MAX_PIXELS}); beyond: refused",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    return {"serve": _serve, "predict": _predict}[args.command](args)


def _serve(args: argparse.Namespace) -> int:
    from alexops.serving import app, state

    options = state.ServeOptions(
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        reload_interval=args.reload_interval,
        max_pixels=args.max_pixels,
        max_body_mb=args.max_body_mb,
    )
    try:
        app.serve(model_source(args, spinning=False), options)  # a server's cores are its requests' too
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down gracefully
        print("alexops serve: stopped", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from alexops.serving import inputs

    images = [(str(path), inputs.read_image(path)) for path in args.images]  # unreadable: fail first
    inputs.configure_pillow(args.max_pixels)
    model = model_source(args).load()
    for record in inputs.predict_images(model, images, args.top_k, args.max_pixels, args.capture):
        print(json.dumps(record), flush=True)
    return 0


def model_source(args: argparse.Namespace, spinning: bool = True):
    from alexops import tracking
    from alexops.serving import model

    uri = args.model_uri or default_model_uri(Path(args.params))
    tracking_uri = tracking.tracking_uri(Path(args.root))
    return model.ModelSource(
        model.parse_model_uri(uri, args.model_name), tracking_uri, threads=args.threads, spinning=spinning
    )


def default_model_uri(params_path: Path) -> str:
    """`models:/<registered name>@champion` for the dataset of params.yaml."""
    from alexops import params as params_module
    from alexops import register

    return f"models:/{register.model_name(params_module.load(params_path))}@champion"


def _port(text: str) -> int:
    value = _parse(int, text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text}")
    return value


def _positive(kind: type):
    def check(text: str):
        value = _parse(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return check


def _non_negative(kind: type):
    def check(text: str):
        value = _parse(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
        return value

    return check


def _parse(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value
