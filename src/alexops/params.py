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
# Names a declared dataset cannot take: the built-ins, and what the Prefect flow's `dataset` choice
# means by "every dataset" and "the one params.yaml names".
RESERVED_NAMES = (*DATASETS, "all", "params.yaml")
# A declared dataset's name goes into paths, DVC's `-S datasets.<name>.source=...`, the MLflow
# experiment `alexops-<name>` and the registered model `alexnet-<name>`: letters, digits, - and _.
DATASET_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
# In fetch.mirrors, stands for the chosen dataset's own mirrors (alexops.datasets: default_mirrors).
DEFAULT_MIRRORS = "default"


def _rule(default: Any, **rules: Any) -> Any:
    if isinstance(default, dict):  # a mutable default needs a factory
        return field(default_factory=lambda: dict(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class BaseParams:
    # a built-in dataset (DATASETS) or one declared under `datasets:`; checked in from_dict
    dataset: str = _rule("fashion-mnist")
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
    # A declared dataset's cache side in px: each image's shorter side is resized to it and the
    # centre square kept (paper §2). 0: train's resize, image_size × resize_ratio (106 px with
    # params.yaml's), so that training crops the cache without resampling it. Never larger than the
    # largest image: a cache beyond every image would hold upscaled pixels only.
    image_size: int = _rule(0, min=0, max=1024)
    # Files that are not usable images (corrupt, truncated, not an image, empty, a link in an
    # archive), classes left with no image and exact duplicates across train and test: `fail`
    # stops prepare naming them; `skip` leaves them out. Either way reports/<dataset>/prepare.json
    # lists them.
    bad_files: str = _rule("fail", choices=("fail", "skip"))
    # processes decoding images; 0: one per CPU core
    workers: int = _rule(0, min=0, max=256)


@dataclass(frozen=True)
class DatasetParams:
    """One dataset declared under `datasets:` in params.yaml (see alexops.datasets)."""

    # a directory laid out <class>/<image> (optionally under train/ and test/ or val/), or an
    # archive of one (.tar, .tar.gz, .tgz, .zip): a path (relative to params.yaml's directory)
    # or an http(s) URL
    source: str = _rule("")
    # the archive's SHA-256 (64 hex digits, optionally `sha256:` first); required for a URL
    checksum: str = _rule("")
    # 1 (gray), 3 (RGB) or auto: 1 when every image is gray, else 3
    channels: str = _rule("auto", choices=("auto", "1", "3"))
    # held out as the test split, per class and seeded by base.seed, when the source has no
    # test/ or val/ subtree
    test_fraction: float = _rule(0.2, min=0.01, max=0.9)
    # the colour under transparent pixels: one gray value or [r, g, b], 0-255
    background: tuple[int, ...] = _rule((255,))

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    @property
    def is_archive(self) -> bool:
        path = self.source.split("?", 1)[0].split("#", 1)[0] if self.is_url else self.source
        return path.lower().endswith(ARCHIVE_SUFFIXES)

    @property
    def sha256(self) -> str:
        return self.checksum.lower().removeprefix("sha256:")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = _rule(30, min=1, max=1000)
    batch_size: int = _rule(128, min=2, max=8192)
    # resize = image_size * resize_ratio, then random image_size crops. The paper crops 224 (227
    # with its geometry) from 256, 1.142857 (the gpu and paper presets); 1.0707 crops less of
    # Fashion-MNIST's garments away: +0.6 to +0.85 points at seed 42 (README, "What bought what").
    image_size: int = _rule(99, min=67, max=512)
    resize_ratio: float = _rule(1.0707, min=1.0, max=2.0)
    # Scales every hidden width (convs and fc); 1.0 is the paper's network, 0.25 fits a 2-core CPU.
    width: float = _rule(0.25, min=0.05, max=4.0)
    init: str = _rule("kaiming", choices=("paper", "kaiming"))
    lr: float = _rule(0.05, min=1e-6, max=10.0)
    momentum: float = _rule(0.9, min=0.0, max=0.999)
    weight_decay: float = _rule(5e-4, min=0.0, max=0.1)
    schedule: str = _rule("onecycle", choices=("plateau", "onecycle", "cosine", "constant"))
    warmup_epochs: float = _rule(0.0, min=0.0, max=100.0)
    # Cross-entropy against (1 - ε) one-hot + ε uniform (Szegedy et al. 2016, §7).
    label_smoothing: float = _rule(0.1, min=0.0, max=0.5)
    # Random erasing (Zhong et al. 2020): the probability that an image gets a random rectangle
    # (2-40% of its area) replaced by noise, after the paper's augmentation; 0 turns it off.
    erasing: float = _rule(0.0, min=0.0, max=1.0)
    # Per-step decay of an exponential moving average of the weights, which is then what is
    # validated and shipped (w_avg ← d·w_avg + (1 - d)·w; horizon ≈ 1/(1 - d) steps, warmed up as
    # TensorFlow's: train.ema_with_warmup); 0: off.
    ema_decay: float = _rule(0.0, min=0.0, max=0.99999)
    # Held out of the training set for per-epoch validation and the plateau schedule; 0: none,
    # every training image trains (the one-cycle and cosine schedules never look at validation).
    val_size: int = _rule(0, min=0)
    flip: bool = _rule(True)
    lighting_std: float = _rule(0.1, min=0.0, max=1.0)
    # Before fc6 and fc7; the paper's 0.5 costs the quarter-width default accuracy (README, "What
    # bought what"): it underfits, so the presets of the paper-size network set 0.5 again.
    dropout: float = _rule(0.25, min=0.0, max=0.95)
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
    # ... and a version must beat answering the test set's most common class for every image:
    # the one-sided binomial test's p-value must be ≤ this (small test sets); 1.0 = off
    significance: float = _rule(0.05, min=0.0, max=1.0)


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
    # name → declaration; a mapping of sections rather than a section (see `_build_datasets`)
    datasets: dict[str, DatasetParams] = field(default_factory=dict)

    def as_flat_dict(self) -> dict[str, Any]:
        """`section.key` → value, the form MLflow params and DVC `-S` overrides use."""
        flat = {}
        sections = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "datasets"]
        sections += [(f"datasets.{name}", declared) for name, declared in self.datasets.items()]
        for prefix, section in sections:
            for key, value in dataclasses.asdict(section).items():
                if isinstance(value, dict):
                    flat.update({f"{prefix}.{key}.{k}": v for k, v in value.items()})
                else:
                    flat[f"{prefix}.{key}"] = list(value) if isinstance(value, tuple) else value
        return flat

    @property
    def dataset(self) -> DatasetParams | None:
        """base.dataset's declaration; None for a built-in dataset."""
        return self.datasets.get(self.base.dataset)


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
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise AlexopsError(f"{source}: `{name}` must be a mapping, got {_kind(values)}.")
        if name == "datasets":
            built[name] = _build_datasets(values, source)
        else:
            section_cls = section_field.default_factory  # type: ignore[misc]
            built[name] = _build_section(section_cls, values, source, name)
    loaded = Params(**built)
    known = (*DATASETS, *loaded.datasets)
    if loaded.base.dataset not in known:
        raise AlexopsError(
            f"{source}: base.dataset must be one of {' | '.join(known)}, got {loaded.base.dataset!r}. "
            f"Fix: pick one of those, or declare it under `datasets:` "
            f"(datasets: {{{printable(loaded.base.dataset)}: {{source: path/to/folder}}}})."
        )
    if loaded.train.schedule == "plateau" and loaded.train.val_size == 0:
        raise AlexopsError(
            f"{source}: train.schedule plateau lowers the learning rate on validation error, but "
            "train.val_size is 0 (the default: every training image trains). Fix: hold out validation "
            "images with it (-S train.val_size=5000, as the gpu preset does) or pick another schedule."
        )
    return loaded


def _build_datasets(values: dict, source: str) -> dict[str, DatasetParams]:
    """`datasets:` → name → DatasetParams, each as strictly checked as a section."""
    declared = {}
    for name, entry in values.items():
        shown = printable(str(name))
        if not isinstance(name, str) or not re.fullmatch(DATASET_NAME, name):
            raise AlexopsError(
                f"{source}: datasets.{shown}: a dataset's name must be 1-64 letters, digits, - or _, "
                "starting with a letter or digit. Fix: rename it."
            )
        if name in RESERVED_NAMES:
            what = "a built-in dataset" if name in DATASETS else "reserved by the Prefect flow"
            raise AlexopsError(f"{source}: datasets.{name}: the name is {what}. Fix: choose another name.")
        if not isinstance(entry, dict):
            raise AlexopsError(
                f"{source}: datasets.{name} must be a mapping with at least `source:`, got {_kind(entry)}."
            )
        if isinstance(entry.get("channels"), int) and not isinstance(entry.get("channels"), bool):
            entry = entry | {"channels": str(entry["channels"])}  # YAML's 1 and 3 are numbers
        checked = _build_section(DatasetParams, entry, source, f"datasets.{name}")
        declared[name] = _check_source(checked, f"{source}: datasets.{name}")
    return declared


def _check_source(declared: DatasetParams, key: str) -> DatasetParams:
    """What can be told of a source without touching it (fetch checks that it is there)."""
    if not declared.source:
        raise AlexopsError(
            f"{key}.source is missing. Fix: give the folder (<class>/<image>), an archive of it "
            "or an archive's URL."
        )
    if declared.is_url and not declared.is_archive:
        raise AlexopsError(
            f"{key}.source {declared.source!r} is a URL but not of an archive. Fix: a URL ending in "
            f"{', '.join(ARCHIVE_SUFFIXES)} (with `checksum:`), or download it and give the folder."
        )
    if declared.checksum and not re.fullmatch(r"[0-9a-f]{64}", declared.sha256):
        raise AlexopsError(
            f"{key}.checksum must be a SHA-256: 64 hex digits, optionally after `sha256:`, got "
            f"{printable(declared.checksum[:80])!r}. Fix: paste what `sha256sum ARCHIVE` prints."
        )
    if declared.is_url and not declared.checksum:
        raise AlexopsError(
            f"{key}.checksum is missing: a downloaded archive is checked before it is read. "
            "Fix: add `checksum: <the archive's SHA-256>` (sha256sum prints it)."
        )
    if declared.checksum and not declared.is_archive:
        raise AlexopsError(
            f"{key}.checksum applies to an archive, and {declared.source!r} is a folder. Fix: remove it."
        )
    return declared


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
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is int:  # a colour
        values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not (
            isinstance(values, list)
            and len(values) in (1, 3)
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values)
        ):
            raise AlexopsError(f"{key} must be a gray value 0-255 or [r, g, b], got {_kind(value)}.")
        return tuple(values)
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


def dataset_names(path: Path | str = "params.yaml") -> tuple[str, ...]:
    """The datasets a params file offers: the built-ins, then those it declares. Only the
    built-ins when the file cannot be read or is not valid: for choices computed at import time
    (the Prefect flow's `dataset` parameter), where an error would break the import."""
    try:
        return (*DATASETS, *load(path).datasets)
    except AlexopsError:
        return DATASETS
