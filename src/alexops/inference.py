"""The exported model as `alexops serve` and `alexops predict` run it.

An onnxruntime session plus what the ONNX metadata carries (class names, the
preprocessing recipe); images decoded with Pillow and preprocessed by `alexops.augment`,
the code training evaluated with; softmax top-k. Models come from a `.onnx` file or from
the MLflow registry (`models:/<name>@<alias>` or `models:/<name>/<version>`). No HTTP here.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from alexops import augment
from alexops.errors import AlexopsError

PIL_MODES = {1: "L", 3: "RGB"}  # the model's channel count → the Pillow mode it was trained on


class InputError(AlexopsError):
    """Input the caller sent that the model cannot take; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_input") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # a short label for the metrics


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
            "provider": self.provider,
            "threads": self.threads,
        }


def providers() -> list[str]:
    """CUDA first when this onnxruntime build and machine have it; the CPU always."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per physical core
    options.inter_op_num_threads = 1  # AlexNet is a chain: nothing runs in parallel between ops
    options.log_severity_level = 3  # warnings such as unused initialisers are not the user's concern
    return options


def load_model(
    onnx_bytes: bytes, *, name: str, version: str | None, uri: str, threads: int = 0
) -> LoadedModel:
    """A session on the model bytes; its classes, recipe and input read from the model itself."""
    try:
        session = ort.InferenceSession(onnx_bytes, session_options(threads), providers=providers())
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... kinds
        raise AlexopsError(
            f"{uri} is not an ONNX model onnxruntime can load ({exc.__class__.__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}). Fix: pass the model `alexops export` wrote."
        ) from exc
    metadata = session.get_modelmeta().custom_metadata_map
    classes, recipe = _metadata(metadata, uri)
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


def _input_spec(graph_input: Any, uri: str) -> InputSpec:
    shape = graph_input.shape
    if graph_input.type != "tensor(float)" or len(shape) != 4 or shape[1] not in PIL_MODES:
        raise AlexopsError(
            f"{uri}: input {graph_input.name} is {graph_input.type} {shape}; alexops serves float "
            "(N, 1 or 3, S, S) image models. Fix: serve a model exported by `alexops export`."
        )
    return InputSpec(graph_input.name, int(shape[1]), int(shape[2]))


# ---- where models come from ---------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """What `--model-uri` names: a file, or a registered model at an alias or version."""

    uri: str
    path: Path | None = None
    name: str | None = None
    alias: str | None = None
    version: str | None = None

    @property
    def follows_alias(self) -> bool:
        return self.alias is not None


def parse_model_uri(text: str) -> ModelRef:
    if not text.startswith("models:/"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise AlexopsError(
                f"--model-uri {text}: no such file. Fix: pass a path to an .onnx file "
                "(`make run` writes artifacts/<dataset>/model.onnx) or models:/<name>@<alias>."
            )
        return ModelRef(uri=text, path=path)
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

    def __init__(self, ref: ModelRef, tracking_uri: str, threads: int = 0) -> None:
        self.ref = ref
        self.tracking_uri = tracking_uri
        self.threads = threads

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
                name=self.ref.path.stem,
                version=None,
                uri=self.ref.uri,
                threads=self.threads,
            )
        version = version or self.current_version()
        data = self._download(version)
        return load_model(data, name=self.ref.name, version=version, uri=self.ref.uri, threads=self.threads)

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
        try:
            return call(mlflow.MlflowClient())
        except MlflowException as exc:
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


# ---- inputs -------------------------------------------------------------------------------


def decode_image(data: bytes, channels: int, max_pixels: int, label: str = "image") -> torch.Tensor:
    """Image file bytes (any format and mode Pillow reads) → uint8 (1, channels, H, W)."""
    if not data:
        raise InputError(f"{label} is empty (0 bytes).", reason="empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image.size, max_pixels, label)  # before decoding: the header is enough
            image.load()
            pixels = np.asarray(image.convert(PIL_MODES[channels]))
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(label, max_pixels, str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise InputError(
            f"{label} is not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF, WebP, ...).",
            reason="not_an_image",
        ) from exc
    except Exception as exc:  # truncated data and corrupt chunks raise OSError, ValueError, SyntaxError...
        problem = (str(exc).splitlines() or [""])[0][:200] or exc.__class__.__name__
        raise InputError(
            f"{label} could not be decoded: {problem} (truncated or corrupt file?).",
            reason="corrupt_image",
        ) from exc
    tensor = torch.from_numpy(pixels.copy())
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor[None]


def pixel_count(data: bytes) -> int:
    """Width × height from the image header alone; 0 when Pillow cannot read the header."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Exception:  # whatever it is, decode_image reports it properly
        return 0


def _check_pixels(size: tuple[int, int], max_pixels: int, label: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise _too_many_pixels(label, max_pixels, f"{width}×{height} = {width * height} pixels")


def _too_many_pixels(label: str, max_pixels: int, detail: str) -> InputError:
    return InputError(
        f"{label} is too large to decode ({detail}); this server decodes at most {max_pixels} pixels "
        "(--max-pixels). Fix: send a smaller image.",
        status=413,
        reason="too_many_pixels",
    )


def preprocess(images: list[torch.Tensor], recipe: augment.Recipe) -> np.ndarray:
    """uint8 images of any sizes → float32 (N, C, S, S), each resized on its own as in training."""
    with torch.no_grad():
        return torch.cat([augment.preprocess(image, recipe) for image in images]).numpy()


def array_inputs(inputs: Any, spec: InputSpec) -> np.ndarray:
    """JSON `inputs` (an (N, C, S, S) nested list, or one (C, S, S) image) → float32, checked."""
    expected = f"(N, {spec.channels}, {spec.size}, {spec.size})"
    if not isinstance(inputs, list) or not inputs:
        raise InputError(f'"inputs" must be a non-empty array of shape {expected}.', reason="bad_shape")
    try:
        raw = np.array(inputs, dtype=object)
    except ValueError as exc:
        raise InputError(f'"inputs" is not a rectangular array ({exc}).', reason="bad_shape") from exc
    kinds = {type(v) for v in raw.flat}
    if list in kinds or dict in kinds:
        raise InputError(f'"inputs" is not a rectangular array of shape {expected}.', reason="bad_shape")
    if kinds - {int, float}:
        names = ", ".join(sorted(_json_type(k) for k in kinds - {int, float}))
        raise InputError(f'"inputs" must hold numbers only; found {names}.', reason="bad_dtype")
    if raw.ndim == 3:
        raw = raw[None]
    if raw.ndim != 4 or raw.shape[1:] != (spec.channels, spec.size, spec.size):
        raise InputError(
            f'"inputs" has shape {tuple(raw.shape)}; this model takes {expected}.', reason="bad_shape"
        )
    try:
        with np.errstate(over="ignore"):
            array = raw.astype(np.float32)
    except OverflowError as exc:
        raise InputError('"inputs" holds an integer too large for float32.', reason="not_finite") from exc
    if not np.isfinite(array).all():
        raise InputError('"inputs" holds NaN, ±inf or a value beyond float32\'s range.', reason="not_finite")
    return array


def _json_type(kind: type) -> str:
    return {bool: "true/false", str: "strings", type(None): "null"}.get(kind, kind.__name__)


# ---- outputs ------------------------------------------------------------------------------


def top_k(logits: np.ndarray, classes: tuple[str, ...], k: int) -> list[list[dict]]:
    """Per row, the k most probable classes (softmax of the logits), most probable first."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probabilities = np.exp(z)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    k = min(k, len(classes))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [{"class": classes[i], "index": int(i), "probability": float(row[i])} for i in ranking]
        for row, ranking in zip(probabilities, order, strict=True)
    ]


# ---- `alexops predict` --------------------------------------------------------------------


def predict_images(
    model: LoadedModel, images: list[tuple[str, bytes]], k: int, max_pixels: int, batch: int = 64
) -> list[dict]:
    """One record per (label, file bytes): the label as `path` and the top-k classes.

    Every image is decoded before any is run, so that a bad file stops the command before
    it prints anything.
    """
    decoded = [decode_image(data, model.input.channels, max_pixels, label) for label, data in images]
    records = []
    for start in range(0, len(decoded), batch):
        x = preprocess(decoded[start : start + batch], model.recipe)
        ranked = top_k(model.logits(x), model.classes, k)
        records += [
            {"path": label, "model": {"name": model.name, "version": model.version}, "top_k": best}
            for (label, _), best in zip(images[start : start + batch], ranked, strict=True)
        ]
    return records


def read_image(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AlexopsError(
            f"cannot read image {path}: {exc.strerror or exc}. Fix: check the path and its permissions."
        ) from exc


def configure_pillow(max_pixels: int) -> None:
    """Pillow's own decompression-bomb check at our limit, its warning raised as an error.

    Process-wide on purpose: set once at start-up, never from request threads.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
