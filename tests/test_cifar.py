"""CIFAR-10 at the data layer: fetch the published archive, read it without trusting pickle."""

import dataclasses
import hashlib
import http.server
import os
import pickle
import pickletools
import threading

import numpy as np
import pytest
import torch
from conftest import (
    CIFAR10_CLASSES,
    CIFAR10_FOLDER,
    cifar10_batch_pickle,
    cifar10_members,
    cifar10_meta_pickle,
    cifar10_synthetic_split,
    cifar10_tar_gz,
    py2_pickle,
)

from alexops import datasets, fetch, params
from alexops.datasets import CIFAR10, read_split
from alexops.errors import AlexopsError
from alexops.paths import Paths
from alexops.prepare import channel_statistics

ARCHIVE = "cifar-10-python.tar.gz"


def cifar_params(mirrors, checksums=None, **extra):
    fetch_section = {"mirrors": [str(m) for m in mirrors], "checksums": checksums or {}, "retries": 1}
    return params.from_dict({"base": {"dataset": "cifar10"}, "fetch": fetch_section | extra})


def raw_is_empty(paths: Paths) -> bool:
    return not paths.raw.exists() or not any(paths.raw.iterdir())


def install_archive(paths: Paths, archive: bytes) -> None:
    """Put an archive where fetch keeps it, as if fetched with an overridden checksum."""
    paths.raw.mkdir(parents=True)
    (paths.raw / ARCHIVE).write_bytes(archive)


# --- fetch -------------------------------------------------------------------------------------


def test_fetch_keeps_the_verified_archive_as_published(tmp_path, tiny_cifar10_mirror):
    mirror, checksums = tiny_cifar10_mirror
    paths = Paths(tmp_path, "cifar10")
    fetch.run(cifar_params([mirror], checksums), paths)
    assert [p.name for p in paths.raw.iterdir()] == [ARCHIVE]
    assert (paths.raw / ARCHIVE).read_bytes() == (mirror / ARCHIVE).read_bytes()  # not decompressed


def test_the_published_md5_is_checked_against_the_tar_gz_itself(tmp_path, tiny_cifar10_mirror, monkeypatch):
    mirror, _ = tiny_cifar10_mirror
    md5 = hashlib.md5((mirror / ARCHIVE).read_bytes()).hexdigest()
    raw = dataclasses.replace(CIFAR10.files[ARCHIVE], checksum=md5)
    monkeypatch.setitem(datasets.SPECS, "cifar10", dataclasses.replace(CIFAR10, files={ARCHIVE: raw}))
    paths = Paths(tmp_path, "cifar10")
    fetch.run(cifar_params([mirror]), paths)
    assert (paths.raw / ARCHIVE).exists()


def test_a_checksum_mismatch_is_a_clear_error_and_writes_nothing(tmp_path, tiny_cifar10_mirror):
    mirror, _ = tiny_cifar10_mirror  # no override: the synthetic archive is not the published one
    paths = Paths(tmp_path, "cifar10")
    with pytest.raises(AlexopsError) as caught:
        fetch.run(cifar_params([mirror]), paths)
    message = str(caught.value)
    assert "checksum mismatch (md5" in message and ARCHIVE in message and "fetch.mirrors" in message
    assert raw_is_empty(paths)


def test_a_mirror_may_be_the_archive_itself_under_any_name(tmp_path, tiny_cifar10_mirror):
    mirror, checksums = tiny_cifar10_mirror
    renamed = tmp_path / "cifar-10-python (1).tar.gz"
    renamed.write_bytes((mirror / ARCHIVE).read_bytes())
    paths = Paths(tmp_path, "cifar10")
    fetch.run(cifar_params([renamed], checksums), paths)
    assert (paths.raw / ARCHIVE).read_bytes() == renamed.read_bytes()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.parametrize("path", ["", f"/{ARCHIVE}"], ids=["base-url", "archive-url"])
def test_fetch_over_http_from_a_loopback_server(tmp_path, tiny_cifar10_mirror, path):
    mirror, checksums = tiny_cifar10_mirror

    def handler(*args, **kwargs):
        return _Quiet(*args, directory=str(mirror), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        paths = Paths(tmp_path, "cifar10")
        url = f"http://127.0.0.1:{server.server_port}{path}"
        fetch.run(cifar_params([tmp_path / "absent", url], checksums), paths)
    finally:
        server.shutdown()
    assert (paths.raw / ARCHIVE).read_bytes() == (mirror / ARCHIVE).read_bytes()


def test_offline_without_a_mirror_says_how_to_provide_the_archive(tmp_path):
    paths = Paths(tmp_path, "cifar10")
    with pytest.raises(AlexopsError) as caught:
        fetch.run(cifar_params([tmp_path / "nowhere", "http://127.0.0.1:9/kriz"], timeout_s=2), paths)
    message = str(caught.value)
    assert str(tmp_path / "nowhere") in message and "127.0.0.1:9" in message
    assert "/usr/share/datasets/cifar10" in message and "fetch.mirrors" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert raw_is_empty(paths)


def test_default_in_the_mirror_list_stands_for_the_dataset_s_own_mirrors():
    def expanded(dataset, mirrors):
        loaded = params.from_dict({"base": {"dataset": dataset}, "fetch": {"mirrors": mirrors}})
        return fetch.mirror_list(loaded.fetch.mirrors, datasets.spec(dataset))

    assert params.FetchParams().mirrors == ("default",)
    assert expanded("cifar10", ["default"]) == [
        "/usr/share/datasets/cifar10",
        "https://www.cs.toronto.edu/~kriz",
    ]
    assert expanded("fashion-mnist", ["/mine", "default", "/mine"]) == [
        "/mine",
        "/usr/share/datasets/fashion-mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    ]


@pytest.mark.parametrize(
    ("symlinks", "extra", "reason"),
    [
        ({f"{CIFAR10_FOLDER}/data_batch_1": "/etc/passwd"}, {}, "link"),
        ({f"{CIFAR10_FOLDER}/notes": "../../../etc/passwd"}, {}, "link"),
        ({}, {f"{CIFAR10_FOLDER}/../../evil.py": b"x"}, "outside"),
        ({}, {"/tmp/evil.py": b"x"}, "outside"),
    ],
    ids=["symlinked-batch", "symlink", "dot-dot", "absolute"],
)
def test_an_archive_with_a_link_or_an_escaping_member_is_refused(tmp_path, symlinks, extra, reason):
    members = cifar10_members(20, 10)
    if symlinks:
        members = {name: data for name, data in members.items() if name not in symlinks}
    archive = cifar10_tar_gz(members | extra, symlinks)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / ARCHIVE).write_bytes(archive)
    checksums = {ARCHIVE: hashlib.sha256(archive).hexdigest()}  # the checksum passes: the check must not

    fetched = Paths(tmp_path / "fetched", "cifar10")
    with pytest.raises(AlexopsError, match=f"refused: .*{reason}"):
        fetch.run(cifar_params([mirror], checksums), fetched)
    assert raw_is_empty(fetched)

    placed = Paths(tmp_path / "placed", "cifar10")  # the reader checks again
    install_archive(placed, archive)
    with pytest.raises(AlexopsError, match=reason):
        read_split(placed.raw, "test", CIFAR10)
    assert not (tmp_path / "evil.py").exists()


def test_an_archive_missing_a_batch_is_refused(tmp_path):
    members = cifar10_members(20, 10)
    del members[f"{CIFAR10_FOLDER}/data_batch_3"]
    paths = Paths(tmp_path, "cifar10")
    install_archive(paths, cifar10_tar_gz(members))
    with pytest.raises(AlexopsError, match="lacks cifar-10-batches-py/data_batch_3"):
        read_split(paths.raw, "test", CIFAR10)


# --- reading -----------------------------------------------------------------------------------


def test_read_split_returns_the_batches_as_uint8_images_and_int64_labels(tmp_path, tiny_cifar10_mirror):
    mirror, checksums = tiny_cifar10_mirror
    paths = Paths(tmp_path, "cifar10")
    fetch.run(cifar_params([mirror], checksums), paths)
    for split, (n, seed) in {"train": (100, 5), "test": (20, 6)}.items():
        images, labels = read_split(paths.raw, split, CIFAR10)
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        expected_images, expected_labels = cifar10_synthetic_split(n, seed)
        assert torch.equal(images, torch.from_numpy(expected_images))  # data_batch_1..5 in order
        assert torch.equal(labels, torch.from_numpy(expected_labels))


def test_a_row_is_1024_red_then_1024_green_then_1024_blue_row_major(tmp_path):
    row = np.zeros(3072, np.uint8)
    row[:1024], row[1024:2048], row[2048:] = 10, 20, 30
    row[1] = 99  # red, image row 0, column 1
    row[1024 + 32] = 77  # green, image row 1, column 0
    row[2048 + 31 * 32 + 31] = 55  # blue, the bottom-right pixel
    members = cifar10_members(5, 5)
    members[f"{CIFAR10_FOLDER}/test_batch"] = cifar10_batch_pickle(row[None], [4], "testing batch 1 of 1")
    paths = Paths(tmp_path, "cifar10")
    install_archive(paths, cifar10_tar_gz(members))
    images, labels = read_split(paths.raw, "test", CIFAR10)
    image = images[0]
    assert (image[0, 0, 1], image[1, 1, 0], image[2, 31, 31]) == (99, 77, 55)
    assert (image[0, 5, 5], image[1, 5, 5], image[2, 5, 5]) == (10, 20, 30)
    assert labels.tolist() == [4]


def test_the_builder_pickles_like_the_published_batches():
    data = cifar10_members(5, 5)[f"{CIFAR10_FOLDER}/data_batch_1"]
    names = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert names == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert next(pickletools.genops(data))[1] == 2  # protocol 2
    assert pickle.loads(data, encoding="bytes")[b"data"].shape == (1, 3072)  # the CIFAR page's recipe


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("member", ["test_batch", "batches.meta"])
def test_a_pickle_naming_a_forbidden_global_is_refused_without_running_it(tmp_path, member):
    marker = tmp_path / "pwned"
    evil = py2_pickle({b"data": _RunsCode(marker), b"labels": [0]})  # os.system is its first global
    members = cifar10_members(5, 5) | {f"{CIFAR10_FOLDER}/{member}": evil}
    paths = Paths(tmp_path, "cifar10")
    install_archive(paths, cifar10_tar_gz(members))
    with pytest.raises(AlexopsError) as caught:
        read_split(paths.raw, "test", CIFAR10)
    message = str(caught.value)
    assert "system" in message and "refused" in message and "dvc repro -f fetch" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("batch", "complaint"),
    [
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, "rows of 3000 bytes"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "must be 2 integers"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "not 0..9"),
        ({b"pixels": np.zeros((2, 3072), np.uint8)}, "not a CIFAR-10 batch"),
    ],
    ids=["short-rows", "float", "label-count", "label-range", "keys"],
)
def test_a_batch_that_breaks_the_format_is_a_clear_error(tmp_path, batch, complaint):
    members = cifar10_members(5, 5) | {f"{CIFAR10_FOLDER}/test_batch": py2_pickle(batch)}
    paths = Paths(tmp_path, "cifar10")
    install_archive(paths, cifar10_tar_gz(members))
    with pytest.raises(AlexopsError, match=complaint):
        read_split(paths.raw, "test", CIFAR10)


def test_class_names_in_batches_meta_must_match(tmp_path):
    members = cifar10_members(5, 5)
    members[f"{CIFAR10_FOLDER}/batches.meta"] = cifar10_meta_pickle(CIFAR10_CLASSES[::-1])
    paths = Paths(tmp_path, "cifar10")
    install_archive(paths, cifar10_tar_gz(members))
    with pytest.raises(AlexopsError, match="names the classes"):
        read_split(paths.raw, "train", CIFAR10)


def test_a_truncated_archive_is_a_clear_error(tmp_path, tiny_cifar10_mirror):
    mirror, _ = tiny_cifar10_mirror
    paths = Paths(tmp_path, "cifar10")
    data = (mirror / ARCHIVE).read_bytes()
    install_archive(paths, data[: len(data) // 2])
    with pytest.raises(AlexopsError, match="not a readable tar.gz"):
        read_split(paths.raw, "train", CIFAR10)


def test_a_missing_archive_asks_for_fetch(tmp_path):
    with pytest.raises(AlexopsError, match="dvc repro fetch"):
        read_split(tmp_path, "train", CIFAR10)


# --- PCA lighting statistics ------------------------------------------------------------------


def test_channel_statistics_recover_a_known_rgb_covariance():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    eigval = np.array([0.001, 0.004, 0.012])  # distinct, as natural images' are (in [0, 1] units)
    mean = np.array([0.45, 0.5, 0.55])
    n_images = 64
    noise = rng.standard_normal((3, n_images * 32 * 32))
    pixels = mean[:, None] + rotation @ (np.sqrt(eigval)[:, None] * noise)  # covariance Q diag(λ) Qᵀ
    quantised = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)
    images = torch.from_numpy(quantised.reshape(3, n_images, 32, 32)).permute(1, 0, 2, 3)

    stats = channel_statistics(images)

    np.testing.assert_allclose(stats["mean"], mean, atol=2e-3)
    covariance = rotation @ np.diag(eigval) @ rotation.T
    np.testing.assert_allclose(stats["std"], np.sqrt(np.diag(covariance)), rtol=0.02)
    np.testing.assert_allclose(stats["eigval"], eigval, rtol=0.05)  # eigh: ascending, like eigval
    got = np.array(stats["eigvec"])  # columns are eigenvectors, each up to its sign
    alignment = np.abs(np.sum(got * rotation, axis=0))
    assert alignment.min() > 0.99, alignment
