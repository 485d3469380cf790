import gzip
import http.server
import threading
from pathlib import Path

import pytest

from alexops import fetch, params
from alexops.datasets import read_split
from alexops.errors import AlexopsError
from alexops.paths import Paths


def fetch_params(mirrors, checksums, **extra):
    return params.from_dict(
        {"fetch": {"mirrors": [str(m) for m in mirrors], "checksums": checksums, "retries": 1, **extra}}
    )


def test_fetch_from_a_local_mirror_verifies_and_decompresses(tmp_path, tiny_mirror):
    mirror, checksums = tiny_mirror
    paths = Paths(tmp_path, "fashion-mnist")
    fetch.run(fetch_params([mirror], checksums), paths)
    images, labels = read_split(paths.raw, "train")
    assert images.shape == (240, 1, 28, 28) and labels.shape == (240,)
    assert sorted(p.name for p in paths.raw.iterdir()) == sorted(checksums)


def test_a_checksum_mismatch_is_a_clear_error_and_keeps_no_file(tmp_path, tiny_mirror):
    mirror, checksums = tiny_mirror
    wrong = dict(checksums, **{"train-labels-idx1-ubyte": "0" * 64})
    paths = Paths(tmp_path, "fashion-mnist")
    with pytest.raises(AlexopsError) as caught:
        fetch.run(fetch_params([mirror], wrong), paths)
    message = str(caught.value)
    assert "train-labels-idx1-ubyte" in message and "checksum mismatch" in message
    assert "fetch.mirrors" in message  # names the fix
    assert not (paths.raw / "train-labels-idx1-ubyte").exists()
    assert not [p for p in paths.raw.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_file_already_present_is_replaced(tmp_path, tiny_mirror):
    mirror, checksums = tiny_mirror
    paths = Paths(tmp_path, "fashion-mnist")
    paths.raw.mkdir(parents=True)
    (paths.raw / "t10k-labels-idx1-ubyte").write_bytes(b"garbage")
    fetch.run(fetch_params([mirror], checksums), paths)
    assert (paths.raw / "t10k-labels-idx1-ubyte").read_bytes() != b"garbage"


def test_falls_through_mirrors_in_order_and_lists_all_when_none_work(tmp_path, tiny_mirror):
    _, checksums = tiny_mirror
    paths = Paths(tmp_path, "fashion-mnist")
    missing = tmp_path / "nowhere"
    # port 9 on loopback: nothing listens, so the connection is refused at once
    with pytest.raises(AlexopsError) as caught:
        fetch.run(fetch_params([missing, "http://127.0.0.1:9/x"], checksums, timeout_s=2), paths)
    message = str(caught.value)
    assert str(missing) in message and "127.0.0.1:9" in message
    assert "dataset-fashion-mnist" in message


def test_corrupt_gzip_from_a_mirror_is_rejected(tmp_path, tiny_mirror):
    mirror, checksums = tiny_mirror
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in checksums:
        data = (mirror / f"{name}.gz").read_bytes()
        (broken / f"{name}.gz").write_bytes(data[: len(data) // 2])
    paths = Paths(tmp_path, "fashion-mnist")
    fetch.run(fetch_params([broken, mirror], checksums), paths)  # falls back to the good one
    assert (paths.raw / "train-images-idx3-ubyte").exists()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_fetch_over_http_from_a_loopback_server(tmp_path, tiny_mirror):
    mirror, checksums = tiny_mirror

    def handler(*args, **kwargs):
        return _Quiet(*args, directory=str(mirror), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        paths = Paths(tmp_path, "fashion-mnist")
        fetch.run(fetch_params([tmp_path / "absent", url], checksums), paths)
    finally:
        server.shutdown()
    raw = (paths.raw / "t10k-images-idx3-ubyte").read_bytes()
    assert raw == gzip.decompress((Path(mirror) / "t10k-images-idx3-ubyte.gz").read_bytes())


def test_checksums_for_unknown_files_are_rejected(tmp_path, tiny_mirror):
    mirror, _ = tiny_mirror
    with pytest.raises(AlexopsError, match="not files of fashion-mnist"):
        fetch.run(fetch_params([mirror], {"cats.idx": "0" * 64}), Paths(tmp_path, "fashion-mnist"))
