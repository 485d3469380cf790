"""Stage `export`: ONNX with a dynamic batch axis, checked against PyTorch in onnxruntime.

The model's metadata carries what a server needs to use it without this code base:
class names and the preprocessing recipe. The stage fails, and writes no model, when
onnxruntime and PyTorch disagree by more than export.tolerance at batch 1 or batch N.
"""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import onnx
import torch

from alexops import files, tracking
from alexops.errors import AlexopsError
from alexops.model import load_trained
from alexops.params import ExportParams, Params
from alexops.paths import Paths

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
PARITY_BATCHES = (1, 7)  # batch 1 and a batch that is not the traced one


def to_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """Export in eval mode (dropout off) with the batch dimension left dynamic."""
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's provenance: stack traces naming this checkout's
        del node.metadata_props[:]  # paths, so the same weights made other bytes in another clone
    return proto


def add_metadata(proto: onnx.ModelProto, classes: list[str], recipe: dict, extra: dict) -> None:
    entries = {
        "classes": json.dumps(classes),
        "preprocessing": json.dumps(recipe),
        "output": "logits; apply softmax over the last axis for probabilities",
        **{k: str(v) for k, v in extra.items()},
    }
    for key, value in entries.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    proto.producer_name = "alexops"
    proto.doc_string = "AlexNet (Krizhevsky, Sutskever, Hinton 2012) trained by alexops"


def parity(proto: onnx.ModelProto, model: torch.nn.Module, shape: tuple, seed: int) -> dict[int, float]:
    """Max |onnxruntime − PyTorch| on the logits for each of PARITY_BATCHES."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    diffs = {}
    for n in PARITY_BATCHES:
        x = torch.randn(n, *shape, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        diffs[n] = float(np.abs(got - expected).max())
    return diffs


def run(params: Params, paths: Paths) -> None:
    with tracking.continue_run(params, paths, "export") as mlflow:
        report = export(params, paths)
        with tracking.store_write(mlflow):
            mlflow.log_metrics({k: float(v) for k, v in report.items()})
    worst = max(v for k, v in report.items() if k.startswith("parity_max"))
    print(f"export: {paths.onnx} ({report['onnx_bytes'] / 1e6:.1f} MB), parity max |diff| {worst:.1e}")


def export(params: Params, paths: Paths) -> dict:
    """Export, check parity, write model.onnx and export.json; nothing is written on failure."""
    model, config, recipe, classes = load_trained(paths.model, "cpu")
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    example = torch.zeros(2, *shape)  # traced at batch 2 so that the batch axis stays symbolic
    # how the dataset's images were made (a folder dataset's: squared to its cache size)
    capture = json.dumps(files.read_json(paths.prepared / "stats.json", produced_by="prepare")["capture"])
    try:
        proto = to_onnx(model, example, params.export.opset)
        add_metadata(
            proto,
            classes,
            recipe.as_dict(),
            {"width": config["width"], "dataset": params.base.dataset, "capture": capture},
        )
        onnx.checker.check_model(proto)
    except Exception as exc:  # the exporter and checker raise many kinds; none is the user's data
        raise AlexopsError(
            f"ONNX export at opset {params.export.opset} failed ({exc.__class__.__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:300]}). No ONNX file was written. "
            f"Fix: {opset_fix(params.export.opset)}"
        ) from exc
    diffs = parity(proto, model, shape, params.base.seed)
    worst = max(diffs.values())
    if worst > params.export.tolerance:
        raise AlexopsError(
            f"onnxruntime disagrees with PyTorch: max |diff| {worst:.2e} > export.tolerance "
            f"{params.export.tolerance:g} (per batch size: {diffs}). No ONNX file was written. "
            f"Fix: {tolerance_fix(params.export.tolerance, worst)}"
        )
    files.write_bytes(paths.onnx, proto.SerializeToString())
    report = {f"parity_max_abs_diff_batch{n}": d for n, d in diffs.items()}
    report |= {"parity_passed": True, "parity_tolerance": params.export.tolerance}
    report |= {"onnx_bytes": paths.onnx.stat().st_size, "opset": params.export.opset}
    files.write_json(paths.reports / "export.json", report)
    return report


def opset_fix(opset: int) -> str:
    default = ExportParams().opset
    if opset != default:
        return f"export.opset is {opset}, set in params.yaml; use the tested {default}."
    return f"this is the tested opset {default}: please report it with the torch and onnx versions."


def tolerance_fix(tolerance: float, worst: float) -> str:
    """Name the actual cause: a tolerance the user tightened, or a real disagreement."""
    default = ExportParams().tolerance
    if tolerance < default:
        return (
            f"export.tolerance is {tolerance:g}, set below its default {default:g} in params.yaml; float32 "
            f"arithmetic in two runtimes differs by about {worst:.0e} here. Raise it back to {default:g}."
        )
    return (
        f"at the default export.tolerance {default:g} this is a real disagreement between PyTorch and "
        "onnxruntime: please report it with the torch and onnxruntime versions."
    )
