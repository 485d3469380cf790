"""Stage `register`: log the ONNX model to the MLflow registry and move `@champion`.

The new version takes `@champion` when there is none yet or when its test accuracy is
at least the champion's; otherwise it is tagged `@challenger`. The decision and its
reason go to `reports/<dataset>/register.json` and onto the model version.
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


def decide(new_accuracy: float, champion_accuracy: float | None) -> tuple[bool, str]:
    """The promotion rule: (promote?, reason)."""
    if champion_accuracy is None:
        return True, "no champion yet"
    if new_accuracy >= champion_accuracy:
        return True, f"accuracy {new_accuracy:.4f} ≥ champion's {champion_accuracy:.4f}"
    return False, f"accuracy {new_accuracy:.4f} < champion's {champion_accuracy:.4f}"


def run(params: Params, paths: Paths) -> None:
    evaluation = files.read_json(paths.reports / "evaluate.json", produced_by="evaluate")
    export = files.read_json(paths.reports / "export.json", produced_by="export")
    accuracy = float(evaluation["accuracy"])
    name = params.register.model_name
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
        promote, reason = decide(accuracy, champion_accuracy)
        alias = CHAMPION if promote else CHALLENGER
        client.set_model_version_tag(name, version, "accuracy", f"{accuracy:.6f}")
        client.set_model_version_tag(name, version, "decision", reason)
        client.set_registered_model_alias(name, alias, version)
        client.update_model_version(
            name, version,
            description=f"AlexNet on {params.base.dataset}: test accuracy {accuracy:.4f}; "
            f"ONNX parity diff {max(v for k, v in export.items() if k.startswith('parity_max')):.1e}; "
            f"{alias} ({reason}).",
        )  # fmt: skip
        mlflow.set_tags({"registered_model": name, "registered_version": version, "alias": alias})
    record = {
        "model_name": name,
        "version": version,
        "alias": alias,
        "reason": reason,
        "accuracy": accuracy,
        "previous_champion": None if current is None else str(current.version),
        "run_id": run_id,
        "model_uri": f"models:/{name}/{version}",
    }
    files.write_json(paths.reports / "register.json", record)
    print(f"register: {name} version {version} → @{alias} ({reason})")


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
