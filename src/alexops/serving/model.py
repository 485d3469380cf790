"""The exported model as `alexops serve` and `alexops predict` run it.

An onnxruntime session plus what the ONNX metadata carries (class names, the preprocessing
recipe, the dataset's capture recipe); softmax top-k. Models come from a `.onnx` file or from
the MLflow registry (`models:/<name>@<alias>` or `models:/<name>/<version>`). No HTTP here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from alexops import augment, datasets, images
from alexops.errors import AlexopsError

CHANNELS = (1, 3)  # gray or RGB models


@dataclass(frozen=True)
class InputSpec:
    """What the model's input takes: float32 (N, channels, size, size)."""

    name: str
    channels: int
    size: int

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": [None, self.channels, self.size, self.size], "dtype": "float32"}


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One onnxruntime session and its metadata; replaced whole on reload, never mutated."""

    session: ort.InferenceSession = field(repr=False)
    name: str
    version: str | None
    uri: str
    classes: tuple[str, ...]
    recipe: augment.Recipe
    capture: images.Capture
    input: InputSpec
    output_name: str
    provider: str
    threads: int

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input.name: x})[0]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "uri": self.uri,
            "classes": list(self.classes),
            "input": self.input.as_dict(),
            "preprocessing": self.recipe.as_dict(),
            "capture": self.capture.as_dict(),
            "provider": self.provider,
            "threads": self.threads,
        }


def providers() -> list[str]:
    """CUDA first when this onnxruntime build and machine have it; the CPU always."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options(threads: int, spinning: bool = True) -> ort.SessionOptions:
    """onnxruntime's session options for AlexNet. spinning False: the intra-op threads sleep
    between runs instead of spinning, as a server wants, whose requests need those cores:
    alexops serve's CPU time per request fell from 4.5 to 1.9 ms and its throughput rose 2.2×
    with it (benchmarks/bench_serve.py, 2 cores shared with the load generator)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per physical core
    options.inter_op_num_threads = 1  # AlexNet is a chain: nothing runs in parallel between ops
    options.log_severity_level = 3  # warnings such as unused initialisers are not the user's concern
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_model(
    onnx_bytes: bytes, *, name: str, version: str | None, uri: str, threads: int = 0, spinning: bool = True
) -> LoadedModel:
    """A session on the model bytes; its classes, recipe and input read from the model itself."""
    try:
        session = ort.InferenceSession(onnx_bytes, session_options(threads, spinning), providers=providers())
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... kinds
        raise AlexopsError(
            f"{uri} is not an ONNX model onnxruntime can load ({exc.__class__.__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}). Fix: pass the model `alexops export` wrote."
        ) from exc
    metadata = session.get_modelmeta().custom_metadata_map
    classes, recipe = _metadata(metadata, uri)
    capture = capture_recipe(metadata, uri)
    graph_input = session.get_inputs()[0]
    spec = _input_spec(graph_input, uri)
    if spec.size != recipe.image_size:
        raise AlexopsError(
            f"{uri}: its input is {spec.size}×{spec.size} px but its preprocessing crops "
            f"{recipe.image_size} px. Fix: re-export the model with `alexops export`."
        )
    return LoadedModel(
        session=session,
        name=name,
        version=version,
        uri=uri,
        classes=classes,
        recipe=recipe,
        capture=capture,
        input=spec,
        output_name=session.get_outputs()[0].name,
        provider=session.get_providers()[0],
        threads=threads,
    )


def _metadata(metadata: dict[str, str], uri: str) -> tuple[tuple[str, ...], augment.Recipe]:
    try:
        classes = tuple(json.loads(metadata["classes"]))
        recipe = augment.Recipe.from_dict(json.loads(metadata["preprocessing"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise AlexopsError(
            f"{uri} lacks the `classes`/`preprocessing` metadata alexops export writes ({exc!r}). "
            "Fix: serve a model exported by `alexops export`."
        ) from exc
    return classes, recipe


def capture_recipe(metadata: dict[str, str], uri: str) -> images.Capture:
    """The dataset's capture recipe: the model's `capture` metadata; for a model exported before
    alexops wrote it, its `dataset`'s; for a model of no known dataset, none (nothing to apply)."""
    if "capture" in metadata:
        try:
            return images.Capture.from_dict(json.loads(metadata["capture"]))
        except (ValueError, TypeError) as exc:
            raise AlexopsError(
                f"{uri}: its `capture` metadata is not a capture recipe ({exc!r}). "
                "Fix: re-export the model with `alexops export`."
            ) from exc
    known = datasets.SPECS.get(metadata.get("dataset", ""))
    return known.capture if known else images.NO_CAPTURE


def _input_spec(graph_input: Any, uri: str) -> InputSpec:
    shape = graph_input.shape
    if graph_input.type != "tensor(float)" or len(shape) != 4 or shape[1] not in CHANNELS:
        raise AlexopsError(
            f"{uri}: input {graph_input.name} is {graph_input.type} {shape}; alexops serves float "
            "(N, 1 or 3, S, S) image models. Fix: serve a model exported by `alexops export`."
        )
    return InputSpec(graph_input.name, int(shape[1]), int(shape[2]))


# ---- where models come from ---------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """What `--model-uri` names: a file (and the name its model answers to), or a registered model
    at an alias or version."""

    uri: str
    path: Path | None = None
    name: str | None = None
    alias: str | None = None
    version: str | None = None

    @property
    def follows_alias(self) -> bool:
        return self.alias is not None


def parse_model_uri(text: str, name: str | None = None) -> ModelRef:
    """`--model-uri`; `name` (`--model-name`) is what a file's model answers to (default: the
    file's stem). A registered model answers to its registered name."""
    if not text.startswith("models:/"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise AlexopsError(
                f"--model-uri {text}: no such file. Fix: pass a path to an .onnx file "
                "(`make run` writes artifacts/<dataset>/model.onnx) or models:/<name>@<alias>."
            )
        return ModelRef(uri=text, path=path, name=name or path.stem)
    if name is not None:
        raise AlexopsError(
            f"--model-name {name}: a registered model answers to its registered name ({text}). "
            "Fix: leave out --model-name, or pass an .onnx file as --model-uri."
        )
    rest = text.removeprefix("models:/")
    name, at, alias = rest.partition("@")
    if at and name and alias and "/" not in rest:
        return ModelRef(uri=text, name=name, alias=alias)
    name, slash, version = rest.partition("/")
    if slash and name and version.isdigit():
        return ModelRef(uri=text, name=name, version=version)
    raise AlexopsError(
        f"--model-uri {text}: expected models:/<name>@<alias> (e.g. models:/alexnet-fashion-mnist@champion), "
        "models:/<name>/<version>, or a path to an .onnx file."
    )


class ModelSource:
    """Loads the model `--model-uri` names and, for an alias, tells which version it points at."""

    def __init__(self, ref: ModelRef, tracking_uri: str, threads: int = 0, spinning: bool = True) -> None:
        self.ref = ref
        self.tracking_uri = tracking_uri
        self.threads = threads
        self.spinning = spinning  # onnxruntime's threads spin between runs (see session_options)

    def current_version(self) -> str | None:
        """The version the alias points at now (None for a file)."""
        if self.ref.path is not None:
            return None
        if self.ref.version is not None:
            return self.ref.version
        return self._registry_call(  # str: MLflow hands out versions as ints or strings
            lambda client: str(client.get_model_version_by_alias(self.ref.name, self.ref.alias).version)
        )

    def load(self, version: str | None = None) -> LoadedModel:
        if self.ref.path is not None:
            return load_model(
                _read(self.ref.path),
                name=self.ref.name,
                version=None,
                uri=self.ref.uri,
                threads=self.threads,
                spinning=self.spinning,
            )
        version = version or self.current_version()
        data = self._download(version)
        return load_model(
            data,
            name=self.ref.name,
            version=version,
            uri=self.ref.uri,
            threads=self.threads,
            spinning=self.spinning,
        )

    def _download(self, version: str) -> bytes:
        def fetch(client) -> bytes:
            import mlflow
            import onnx

            with tempfile.TemporaryDirectory(prefix="alexops-model-") as tmp:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{self.ref.name}/{version}", dst_path=tmp
                )
                # mlflow.onnx stores weights as external data beside model.onnx: load them in
                return onnx.load(str(_onnx_file(Path(local)))).SerializeToString()

        return self._registry_call(fetch)

    def _registry_call(self, call):
        # Imported here: MLflow takes seconds to import and a file model never needs it.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per reload in the log
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        client = mlflow.MlflowClient()
        try:
            return call(client)
        except MlflowException as exc:
            if self.ref.alias is not None and "alias" in str(exc).lower():
                raise self._no_such_alias(client) from exc
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise AlexopsError(
                    f"{self.ref.uri} is not in the MLflow registry at {self.tracking_uri} "
                    f"({str(exc).splitlines()[0][:200]}). Fix: run `make run` (its register stage sets "
                    "@champion), set MLFLOW_TRACKING_URI to the store that holds it, or pass an .onnx path."
                ) from exc
            raise self._unreachable(exc) from exc
        except AlexopsError:
            raise
        except Exception as exc:  # connection refused, a locked database, a missing artifact
            raise self._unreachable(exc) from exc

    def _no_such_alias(self, client) -> AlexopsError:
        """The model is registered but nothing holds the alias: say which versions there are and why."""
        found = client.search_model_versions(f"name = '{self.ref.name}'")
        versions = sorted(found, key=lambda v: int(v.version))
        if not versions:
            return AlexopsError(
                f"{self.ref.uri}: {self.ref.name} has no versions in {self.tracking_uri}. "
                "Fix: run `make run` (its register stage registers the model)."
            )
        latest = versions[-1]
        decision = latest.tags.get("decision", "no decision recorded")
        first = versions[0].version
        held = f"versions {first}-{latest.version}" if len(versions) > 1 else f"version {first}"
        version_uri = f"models:/{self.ref.name}/{latest.version}"
        return AlexopsError(
            f"{self.ref.uri}: {self.ref.name} has {held} but "
            f"none is @{self.ref.alias} (version {latest.version}: {decision}). Fix: name one anyway, "
            f'--model-uri {version_uri} (with make: `make serve ARGS="--model-uri {version_uri}"`), '
            "or train a better model (a lower "
            "register.min_accuracy, or for a small test set a higher register.significance, lets the next "
            "register promote it)."
        )

    def _unreachable(self, exc: Exception) -> AlexopsError:
        return AlexopsError(
            f"cannot read {self.ref.uri} from the MLflow store {self.tracking_uri} "
            f"({exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:200]}). "
            "Fix: start the tracking server or point MLFLOW_TRACKING_URI at the store that holds the model."
        )


def _onnx_file(model_dir: Path) -> Path:
    """The .onnx file of an `mlflow.onnx` model directory (named in its MLmodel file)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if mlmodel.exists():
        data = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("onnx", {}).get("data")
        if data and (model_dir / data).is_file():
            return model_dir / data
    found = sorted(model_dir.glob("*.onnx"))
    if not found:
        raise AlexopsError(
            f"the registered model at {model_dir} holds no .onnx file; it was not logged by alexops."
        )
    return found[0]


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AlexopsError(
            f"cannot read {path}: {exc.strerror or exc}. Fix: check the path and its permissions."
        ) from exc


# ---- outputs ------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """float64 (N, K) probabilities of (N, K) logits, computed stably (the row's max subtracted)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probabilities = np.exp(z)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, classes: tuple[str, ...], k: int) -> list[list[dict]]:
    """Per row, the k most probable classes (softmax of the logits), most probable first."""
    probabilities = softmax(logits)
    k = min(k, len(classes))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [{"class": classes[i], "index": int(i), "probability": float(row[i])} for i in ranking]
        for row, ranking in zip(probabilities, order, strict=True)
    ]
