"""Stage `register`: log the ONNX model to the MLflow registry and move `@champion`.

The promotion gate: the new version takes `@champion` only if its ONNX parity check
passed, its test accuracy is at least `register.min_accuracy` and at least the current
champion's (same dataset: each dataset has its own registered model); otherwise it becomes
`@challenger`. The decision and its reason go to `reports/<dataset>/register.json`, onto
the model version (tags, description) and onto the MLflow run.
"""

from __future__ import annotations

import numpy as np
import onnx

from alexops import files, tracking
from alexops.errors import AlexopsError
from alexops.export import INPUT_NAME
from alexops.params import Params
from alexops.paths import Paths

CHAMPION = "champion"
CHALLENGER = "challenger"


def model_name(params: Params) -> str:
    """The registered model of the params' dataset, e.g. `alexnet-fashion-mnist`."""
    return f"{params.register.model_prefix}-{params.base.dataset}"


def parity_passed(export: dict) -> tuple[bool, float]:
    """(passed?, worst |onnxruntime − PyTorch|) from export's report."""
    worst = max((v for k, v in export.items() if k.startswith("parity_max")), default=float("nan"))
    tolerance = float(export.get("parity_tolerance", 0.0))
    return bool(export.get("parity_passed")) and worst <= tolerance, worst


def decide(
    accuracy: float, parity: tuple[bool, float], min_accuracy: float, champion_accuracy: float | None
) -> tuple[bool, str]:
    """The promotion gate: (promote?, reason), every check named in the reason."""
    passed, worst = parity
    if not passed:
        return False, f"ONNX parity check failed (max |diff| {worst:.1e})"
    if accuracy < min_accuracy:
        return False, f"accuracy {accuracy:.4f} < register.min_accuracy {min_accuracy:.4f}"
    if champion_accuracy is None:
        return True, f"no champion yet; parity ok, accuracy {accuracy:.4f} ≥ min {min_accuracy:.4f}"
    if accuracy < champion_accuracy:
        return False, f"accuracy {accuracy:.4f} < champion's {champion_accuracy:.4f}"
    return True, f"parity ok; accuracy {accuracy:.4f} ≥ champion's {champion_accuracy:.4f} and ≥ min"


def run(params: Params, paths: Paths) -> None:
    evaluation = files.read_json(paths.reports / "evaluate.json", produced_by="evaluate")
    export = files.read_json(paths.reports / "export.json", produced_by="export")
    accuracy = float(evaluation["accuracy"])
    name = model_name(params)
    if not paths.onnx.exists():
        raise AlexopsError(f"{paths.onnx} is missing. Fix: run `dvc repro export` first.")
    proto = onnx.load(str(paths.onnx))
    with tracking.continue_run(paths) as mlflow:
        from mlflow import MlflowClient

        client = MlflowClient()
        run_id = mlflow.active_run().info.run_id
        mlflow.set_tags(tracking.dvc_lock_tags(paths.root))
        info = mlflow.onnx.log_model(
            proto,
            name="model",
            registered_model_name=name,
            input_example=example_input(proto),
            signature=signature(proto),
            metadata={"accuracy": accuracy},
        )
        version = str(info.registered_model_version)
        # read the aliases rather than catch a lookup error, which could also be the network
        aliases = client.get_registered_model(name).aliases
        current = client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None
        champion_accuracy = None if current is None else float(current.tags.get("accuracy", "nan"))
        if champion_accuracy is not None and np.isnan(champion_accuracy):
            champion_accuracy = None
        promote, reason = decide(
            accuracy, parity_passed(export), params.register.min_accuracy, champion_accuracy
        )
        alias = CHAMPION if promote else CHALLENGER
        client.set_model_version_tag(name, version, "accuracy", f"{accuracy:.6f}")
        client.set_model_version_tag(name, version, "decision", f"{alias}: {reason}")
        client.set_registered_model_alias(name, alias, version)
        int8_uri = attach_int8(mlflow, client, paths, name, version)
        client.update_model_version(
            name, version, description=describe(params, evaluation, export, alias, reason)
        )
        mlflow.set_tags(
            {"registered_model": name, "registered_version": version, "alias": alias, "decision": reason}
        )
    record = {
        "model_name": name,
        "version": version,
        "alias": alias,
        "reason": reason,
        "min_accuracy": params.register.min_accuracy,
        "accuracy": accuracy,
        "previous_champion": None if current is None else str(current.version),
        "run_id": run_id,
        "model_uri": f"models:/{name}/{version}",
        "int8_uri": int8_uri,
    }
    files.write_json(paths.reports / "register.json", record)
    print(f"register: {name} version {version} → @{alias} ({reason})")


def attach_int8(mlflow, client, paths: Paths, name: str, version: str) -> str | None:
    """The quantize stage's int8 model, as an artifact of the run and tags on the version."""
    if not paths.int8_onnx.exists():
        return None
    report = files.read_json(paths.reports / "quantize.json", produced_by="quantize")
    mlflow.log_artifact(str(paths.int8_onnx), artifact_path="int8")
    numbers = {k: v for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    mlflow.log_metrics({f"quantize_{k}": float(v) for k, v in numbers.items()})
    uri = f"runs:/{mlflow.active_run().info.run_id}/int8/{paths.int8_onnx.name}"
    tags = {"int8.uri": uri} | {f"int8.{k}": str(v) for k, v in report.items() if not isinstance(v, dict)}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return uri


def describe(params: Params, evaluation: dict, export: dict, alias: str, reason: str) -> str:
    """The model version's description: what it is, its metrics, and why it got its alias."""
    crops = "10-crop" if evaluation.get("ten_crop") else "centre crop"
    lines = [
        f"AlexNet on {params.base.dataset}, {params.train.image_size} px, width {params.train.width:g}, "
        f"{params.train.epochs} epochs.",
        f"Test accuracy {evaluation['accuracy']:.4f} ({crops}); centre crop "
        f"{evaluation['accuracy_center_crop']:.4f}; test loss {evaluation['loss_center_crop']:.4f} (centre).",
        f"ONNX parity max |diff| {parity_passed(export)[1]:.1e}.",
        f"@{alias}: {reason}.",
    ]
    return "\n".join(lines)


def signature(proto: onnx.ModelProto):
    """The model's signature from its graph: float32 (-1, C, S, S) in, (-1, classes) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(value_info) -> TensorSpec:
        dims = [d.dim_value or -1 for d in value_info.type.tensor_type.shape.dim]
        return TensorSpec(np.dtype(np.float32), tuple(dims), value_info.name)

    return ModelSignature(Schema([spec(proto.graph.input[0])]), Schema([spec(proto.graph.output[0])]))


def example_input(proto: onnx.ModelProto) -> np.ndarray:
    """One zero image of the model's input shape (batch of 1)."""
    graph_input = next(i for i in proto.graph.input if i.name == INPUT_NAME)
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    return np.zeros([1, *dims[1:]], dtype=np.float32)
