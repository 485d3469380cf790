"""Stage `prepare`: the uint8 cache that training augments from, batch by batch, on its device.

Every dataset goes through its reader (`alexops.datasets.get`): a built-in's published arrays,
or a declared image folder or archive, decoded on all cores with the server's decoder. Then
the problems found (bad files, classes without images, exact duplicates across train and test)
stop the stage or are left out, as `prepare.bad_files` says, and either way are listed in
`reports/<dataset>/prepare.json`; seeded subsets (`prepare.max_train/max_test`); the cache
(`alexops.cache`: one memory-mapped images file, each split's rows and labels); and the
statistics augmentation needs (per-channel mean/std, the channel covariance's
eigen-decomposition for PCA lighting) with the classes and the capture recipe.
"""

from __future__ import annotations

import numpy as np
import torch

from alexops import cache, datasets, files
from alexops.cache import IMAGES
from alexops.errors import AlexopsError
from alexops.params import Params
from alexops.paths import Paths

load_split = cache.load_split  # what train, evaluate and quantize read the cache with
SHOWN_PROBLEMS = 8  # in the error message; the report lists them all


def run(params: Params, paths: Paths) -> None:
    decoded = datasets.get(params).decode(params, paths)
    try:
        write_cache(params, paths, decoded)
    finally:
        if decoded.images is not None:
            decoded.images.discard()  # a no-op once committed


def write_cache(params: Params, paths: Paths, decoded: datasets.Decoded) -> None:
    # no images: the reader stopped at what listing the source found (prepare.bad_files: fail)
    classes, labels, problems = (
        keep_classes_with_images(decoded)
        if decoded.images is not None
        else (decoded.classes, decoded.labels, decoded.problems)
    )
    report = {
        "dataset": params.base.dataset,
        "source": decoded.source,
        "bad_files": params.prepare.bad_files,
        "problems": problems,
        "notes": decoded.notes,
    }
    if problems and params.prepare.bad_files == "fail":
        files.write_json(paths.prepare_report, report | {"classes": list(decoded.classes)})
        raise AlexopsError(problem_message(params, paths, problems))
    if len(classes) < 2:
        raise AlexopsError(
            f"prepare: {params.base.dataset} has {len(classes)} class(es) with images left; a classifier "
            f"needs 2 or more. Fix: see reports/{params.base.dataset}/prepare.json."
        )
    usable = decoded.usable & (labels >= 0)
    splits = {}
    for index, (split, limit) in enumerate(
        (("train", params.prepare.max_train), ("test", params.prepare.max_test))
    ):
        rows = np.flatnonzero(usable & (decoded.test == (split == "test")))
        # one generator per split: the test subset must not depend on prepare.max_train
        generator = torch.Generator().manual_seed(params.base.seed * 2 + index)
        splits[split] = subset_rows(rows, limit, generator)
    digest = decoded.images.commit()
    for split, rows in splits.items():
        cache.write_split(paths.prepared / f"{split}.pt", rows, labels[rows], digest)
        print(f"prepare: {split} {len(rows)} images")
    mapped = np.load(paths.prepared / IMAGES, mmap_mode="r")
    stats = {
        "dataset": params.base.dataset,
        "classes": list(classes),
        "num_train": len(splits["train"]),
        "num_test": len(splits["test"]),
        "image_shape": list(mapped.shape[1:]),
        "capture": decoded.capture.as_dict(),
        **cache.channel_statistics(mapped, splits["train"], decoded.moments),
    }
    files.write_json(paths.prepared / "stats.json", stats)
    report |= {
        "classes": list(classes),
        "image_shape": stats["image_shape"],
        "images": {split: len(rows) for split, rows in splits.items()},
        "per_class": {
            name: {split: int((labels[rows] == label).sum()) for split, rows in splits.items()}
            for label, name in enumerate(classes)
        },
        "left_out": len(problems),
    }
    files.write_json(paths.prepare_report, report)
    if problems:
        print(f"prepare: {len(problems)} problem(s) left out (prepare.bad_files: skip), listed in "
              f"reports/{params.base.dataset}/prepare.json")  # fmt: skip


def keep_classes_with_images(decoded: datasets.Decoded) -> tuple[tuple[str, ...], np.ndarray, list[dict]]:
    """The classes that have a usable training image, the labels renumbered to them (-1: a class
    left out), and the problems with every class left out added."""
    problems = list(decoded.problems)
    trained = decoded.usable & ~decoded.test
    present = set(np.unique(decoded.labels[trained]).tolist())
    listed = {p["path"] for p in problems if p["reason"] == "empty_class"}
    for label, name in enumerate(decoded.classes):
        if label not in present and f"{name}/" not in listed:
            problems.append(
                {"path": f"{name}/", "reason": "empty_class", "detail": "no usable training image"}
            )
    kept = [label for label in range(len(decoded.classes)) if label in present]
    renumber = np.full(len(decoded.classes) + 1, -1, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    labels = renumber[decoded.labels] if len(decoded.labels) else decoded.labels
    return tuple(decoded.classes[label] for label in kept), labels, problems


def problem_message(params: Params, paths: Paths, problems: list[dict]) -> str:
    # "path (reason): detail", without the detail's own full stop: ours follows it
    shown = "; ".join(
        f"{p['path']} ({p['reason']}): {p['detail'].rstrip('.')}" for p in problems[:SHOWN_PROBLEMS]
    )
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return (
        f"{len(problems)} problem(s) in dataset {params.base.dataset}: {shown}{more}. Fix: remove or "
        "replace those files (a class folder needs images), or set prepare.bad_files: skip to train "
        f"without them; all are listed in reports/{params.base.dataset}/prepare.json."
    ).replace("\n", " ")


def subset_rows(rows: np.ndarray, limit: int, generator: torch.Generator) -> np.ndarray:
    """A seeded random subset of `limit` rows (all when limit is 0), order kept."""
    if limit == 0 or limit >= len(rows):
        return rows
    keep = torch.randperm(len(rows), generator=generator)[:limit].sort().values.numpy()
    return rows[keep]


def subset(
    images: torch.Tensor, labels: torch.Tensor, limit: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of `limit` samples (all when limit is 0), order kept."""
    keep = subset_rows(np.arange(len(labels)), limit, generator)
    return images[keep], labels[keep]


def channel_statistics(images: torch.Tensor) -> dict:
    """Mean, std and covariance eigen-decomposition of pixel values scaled to [0, 1]: (N, C, H, W)."""
    return cache.channel_statistics(images.numpy(), np.arange(len(images)))
