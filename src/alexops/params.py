"""params.yaml as frozen dataclasses, validated before any stage does work.

Each field's rules live in its metadata (`min`, `max`, `choices`), so the error for a bad
value can always name the key, what it must be and what it got.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alexops.errors import AlexopsError

DATASETS = ("fashion-mnist", "cifar10")  # the keys of alexops.datasets.SPECS (a test holds them together)
# In fetch.mirrors, stands for the chosen dataset's own mirrors (alexops.datasets: default_mirrors).
DEFAULT_MIRRORS = "default"


def _rule(default: Any, **rules: Any) -> Any:
    if isinstance(default, dict):  # a mutable default needs a factory
        return field(default_factory=lambda: dict(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class BaseParams:
    dataset: str = _rule("fashion-mnist", choices=DATASETS)
    seed: int = _rule(42, min=0, max=2**31 - 1)
    # "auto" picks CUDA when present, else the CPU.
    device: str = _rule("auto", choices=("auto", "cpu", "cuda"))


@dataclass(frozen=True)
class FetchParams:
    # Tried in order: a local directory holding the files (gzipped or not), the path of a file
    # itself, or an http(s) base URL; `default` expands to base.dataset's own mirrors.
    mirrors: tuple[str, ...] = _rule((DEFAULT_MIRRORS,), min_len=1)
    timeout_s: float = _rule(30.0, min=1.0, max=600.0)
    retries: int = _rule(3, min=1, max=10)  # attempts per URL, with back-off between them
    # file name → SHA-256, replacing the published checksum (a re-packaged or synthetic dataset),
    # of the bytes that checksum covers: a decompressed IDX file, the CIFAR-10 .tar.gz as is.
    # Empty means: trust only the official files.
    checksums: dict[str, str] = _rule({}, sha256_values=True)


@dataclass(frozen=True)
class PrepareParams:
    # 0 keeps every image; a positive number keeps a seeded random subset (quick runs).
    max_train: int = _rule(0, min=0)
    max_test: int = _rule(0, min=0)


@dataclass(frozen=True)
class TrainParams:
    epochs: int = _rule(30, min=1, max=1000)
    batch_size: int = _rule(128, min=2, max=8192)
    # The paper crops 224 (227 with its geometry) from 256: resize = image_size * resize_ratio.
    image_size: int = _rule(99, min=67, max=512)
    resize_ratio: float = _rule(1.142857, min=1.0, max=2.0)  # 256 / 224
    # Scales every hidden width (convs and fc); 1.0 is the paper's network, 0.25 fits a 2-core CPU.
    width: float = _rule(0.25, min=0.05, max=4.0)
    init: str = _rule("kaiming", choices=("paper", "kaiming"))
    lr: float = _rule(0.05, min=1e-6, max=10.0)
    momentum: float = _rule(0.9, min=0.0, max=0.999)
    weight_decay: float = _rule(5e-4, min=0.0, max=0.1)
    schedule: str = _rule("onecycle", choices=("plateau", "onecycle", "cosine", "constant"))
    warmup_epochs: float = _rule(0.0, min=0.0, max=100.0)
    # Cross-entropy against (1 - ε) one-hot + ε uniform (Szegedy et al. 2016, §7).
    label_smoothing: float = _rule(0.0, min=0.0, max=0.5)
    # Random erasing (Zhong et al. 2020): the probability that an image gets a random rectangle
    # (2-40% of its area) replaced by noise, after the paper's augmentation; 0 turns it off.
    erasing: float = _rule(0.0, min=0.0, max=1.0)
    # Per-step decay of an exponential moving average of the weights, which is then what is
    # validated and shipped (w_avg ← d·w_avg + (1 - d)·w; horizon ≈ 1/(1 - d) steps); 0: off.
    ema_decay: float = _rule(0.0, min=0.0, max=0.99999)
    # Held out of the training set for per-epoch validation and the plateau schedule.
    val_size: int = _rule(5000, min=0)
    flip: bool = _rule(True)
    lighting_std: float = _rule(0.1, min=0.0, max=1.0)
    dropout: float = _rule(0.5, min=0.0, max=0.95)
    # bf16 autocast on CUDA, and on a CPU with native bf16 (AVX512-BF16/AMX): +52% at 227 px and
    # width 1.0 on a 2-core EPYC, but no gain at the 99 px × 0.25 default, hence off by default.
    # channels_last (NHWC) and torch.compile apply on both devices.
    amp: bool = _rule(False)
    channels_last: bool = _rule(True)
    compile: bool = _rule(False)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _rule(256, min=1, max=8192)
    # The paper's test: mean softmax over 4 corners + centre and their mirror images.
    ten_crop: bool = _rule(True)


@dataclass(frozen=True)
class ExportParams:
    opset: int = _rule(18, min=17, max=23)
    # onnxruntime must match PyTorch within this max absolute difference on the logits.
    tolerance: float = _rule(1e-4, min=0.0, max=1.0)


@dataclass(frozen=True)
class QuantizeParams:
    # Training images (a seeded sample, centre-crop view) whose activations set the int8 ranges.
    calibration_images: int = _rule(512, min=1, max=100000)
    # The stage fails when int8 test accuracy is below fp32's by more than this (0.005 = 0.5 points).
    max_accuracy_drop: float = _rule(0.005, min=0.0, max=1.0)
    # The paper's convolutions kept in float (the LRNs always are); [] quantises every one.
    float_layers: tuple[str, ...] = _rule(
        ("conv1", "conv2"), items=("conv1", "conv2", "conv3", "conv4", "conv5")
    )


@dataclass(frozen=True)
class RegisterParams:
    # registered as `<model_prefix>-<dataset>` (alexnet-fashion-mnist) in MLflow experiment
    # `<experiment>-<dataset>`: each dataset has its own model, aliases and runs
    model_prefix: str = _rule("alexnet", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    experiment: str = _rule("alexops", pattern=r"^\S.*$")
    # the promotion gate's floor: below it a new version never becomes @champion
    min_accuracy: float = _rule(0.5, min=0.0, max=1.0)


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    fetch: FetchParams = field(default_factory=FetchParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    quantize: QuantizeParams = field(default_factory=QuantizeParams)
    register: RegisterParams = field(default_factory=RegisterParams)

    def as_flat_dict(self) -> dict[str, Any]:
        """`section.key` → value, the form MLflow params and DVC `-S` overrides use."""
        flat = {}
        for section in dataclasses.fields(self):
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                if isinstance(value, dict):
                    flat.update({f"{section.name}.{key}.{k}": v for k, v in value.items()})
                else:
                    flat[f"{section.name}.{key}"] = list(value) if isinstance(value, tuple) else value
        return flat


def load(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; raise one AlexopsError naming the bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise AlexopsError(
            f"{path} not found. Fix: run from the project root, or pass --params PATH."
        ) from exc
    except yaml.YAMLError as exc:
        raise AlexopsError(f"{path} is not valid YAML: {exc}. Fix the file's syntax.") from exc
    return from_dict(raw, source=str(path))


def from_dict(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise AlexopsError(f"{source}: expected a mapping of sections, got {_kind(raw)}.")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    _reject_unknown(raw, sections, source, where="")
    built = {}
    for name, section_field in sections.items():
        section_cls = section_field.default_factory  # type: ignore[misc]
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise AlexopsError(f"{source}: `{name}` must be a mapping, got {_kind(values)}.")
        built[name] = _build_section(section_cls, values, source, name)
    loaded = Params(**built)
    if loaded.train.schedule == "plateau" and loaded.train.val_size == 0:
        raise AlexopsError(
            f"{source}: train.schedule plateau lowers the learning rate on validation error, but "
            "train.val_size is 0. Fix: hold out validation images (train.val_size) or pick another schedule."
        )
    return loaded


def _build_section(cls: type, values: dict, source: str, section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(values, fields, source, where=f"{section}.")
    hints = typing.get_type_hints(cls)
    checked = {
        name: _check(f"{source}: {section}.{name}", values[name], hints[name], fields[name].metadata)
        for name in fields
        if name in values
    }
    return cls(**checked)


def _reject_unknown(values: dict, known: dict, source: str, where: str) -> None:
    for key in values:
        if key not in known:
            shown = printable(f"{where}{key}")
            raise AlexopsError(
                f"{source}: unknown key `{shown}`. Fix: remove it or use one of: {', '.join(sorted(known))}."
            )


def printable(text: str) -> str:
    """`text`, with control characters escaped so that an error stays one readable line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _check(key: str, value: Any, hint: Any, rules: typing.Mapping[str, Any]) -> Any:
    value = _coerce(key, value, hint)
    if "choices" in rules and value not in rules["choices"]:
        choices = " | ".join(map(str, rules["choices"]))
        raise AlexopsError(f"{key} must be one of {choices}, got {value!r}.")
    if "min" in rules and value < rules["min"]:
        raise AlexopsError(f"{key} must be ≥ {rules['min']}, got {value!r}.")
    if "max" in rules and value > rules["max"]:
        raise AlexopsError(f"{key} must be ≤ {rules['max']}, got {value!r}.")
    if "items" in rules and any(item not in rules["items"] for item in value):
        bad = next(item for item in value if item not in rules["items"])
        raise AlexopsError(f"{key} may list only {', '.join(rules['items'])}; got {printable(str(bad))!r}.")
    if "min_len" in rules and len(value) < rules["min_len"]:
        raise AlexopsError(f"{key} must list at least {rules['min_len']} item(s).")
    if rules.get("sha256_values"):
        for name, digest in value.items():
            if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise AlexopsError(f"{key}.{name} must be a 64-digit hex SHA-256, got {digest!r}.")
    if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
        raise AlexopsError(f"{key} must match {rules['pattern']}, got {value!r}.")
    return value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Accept exactly the YAML types that mean the annotated type (an int for a float)."""
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise AlexopsError(f"{key} must be a mapping of names to strings, got {_kind(value)}.")
        return dict(value)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise AlexopsError(f"{key} must be a list of non-empty strings, got {_kind(value)}.")
        return tuple(value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise AlexopsError(f"{key} must be a finite number, got {value!r}.")
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str) and value != ""
    else:  # pragma: no cover - a new annotation needs a rule here
        raise TypeError(f"no validation rule for {hint}")
    if not ok:
        raise AlexopsError(f"{key} must be {_type_name(hint)}, got {_kind(value)}.")
    return value


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict | list):
        return f"a {type(value).__name__}"
    return f"{value!r} ({type(value).__name__})"
