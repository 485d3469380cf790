import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alexops import params
from alexops.errors import AlexopsError

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_load_with_every_section():
    loaded = params.load(REPO / "params.yaml")
    assert loaded.base.dataset == "fashion-mnist"
    assert loaded.fetch.mirrors == (params.DEFAULT_MIRRORS,)
    assert loaded.train.image_size >= 67
    flat = loaded.as_flat_dict()
    assert flat["train.epochs"] == loaded.train.epochs
    assert flat["fetch.mirrors"] == list(loaded.fetch.mirrors)


def test_missing_sections_take_defaults():
    loaded = params.from_dict({"train": {"epochs": 3}})
    assert loaded.train.epochs == 3
    assert loaded.prepare.max_train == 0


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"epochs": 2.5}}, "train.epochs"),
        ({"train": {"image_size": 32}}, "train.image_size"),
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"lr": float("inf")}}, "train.lr"),
        ({"train": {"schedule": "step"}}, "train.schedule"),
        ({"train": {"flip": "yes"}}, "train.flip"),
        ({"train": {"epoch": 3}}, "train.epoch"),
        ({"trainer": {}}, "trainer"),
        ({"train": [1, 2]}, "train"),
        ({"base": {"dataset": "imagenet"}}, "base.dataset"),
        ({"base": {"seed": True}}, "base.seed"),
        ({"fetch": {"mirrors": []}}, "fetch.mirrors"),
        ({"fetch": {"mirrors": "/tmp"}}, "fetch.mirrors"),
        ({"fetch": {"checksums": {"train-images-idx3-ubyte": "abc"}}}, "fetch.checksums"),
        ({"prepare": {"max_train": -1}}, "prepare.max_train"),
        ({"register": {"model_prefix": "bad name!"}}, "register.model_prefix"),
    ],
)
def test_bad_values_name_the_key(raw, names):
    with pytest.raises(AlexopsError, match=names.replace(".", r"\.")):
        params.from_dict(raw)


def test_an_int_is_a_valid_float():
    assert params.from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_cli_reports_bad_params_in_one_line_without_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epochs": -3}}))
    done = subprocess.run(
        [sys.executable, "-m", "alexops.cli", "--params", str(bad), "train"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "train.epochs must be ≥ 1" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "artifacts").exists()


def test_cli_reports_unparsable_yaml(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed")
    done = subprocess.run(
        [sys.executable, "-m", "alexops.cli", "--params", str(bad), "fetch"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "not valid YAML" in done.stderr and "Traceback" not in done.stderr


def test_presets_are_valid_params_and_gpu_is_the_papers_recipe():
    from alexops import presets

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in presets.PRESETS:
        params.from_dict(presets.apply(base, name))
    gpu = params.from_dict(presets.apply(base, "gpu")).train
    assert (gpu.image_size, gpu.width, gpu.init, gpu.schedule, gpu.lr) == (227, 1.0, "paper", "plateau", 0.01)
    assert gpu.dropout == params.from_dict(presets.apply(base, "paper")).train.dropout == 0.5  # paper §4.2
    assert gpu.label_smoothing == 0.0  # the CPU default's 0.1 is not the paper's
    for paper_size in ("gpu", "paper"):  # 224 of 256 (§4.1), whatever crop the CPU default takes
        assert params.from_dict(presets.apply(base, paper_size)).train.resize_ratio == 1.142857
    assert presets.dvc_flags("gpu")[:2] == ["-S", "train.image_size=227"]
    for paper_size in ("gpu", "paper"):  # int8 pays at 227 px, width 1 with every convolution int8
        assert params.from_dict(presets.apply(base, paper_size)).quantize.float_layers == ()
        assert "quantize.float_layers=[]" in presets.dvc_flags(paper_size)
    assert params.from_dict(base).quantize.float_layers == ("conv1", "conv2")  # the default model's
    with pytest.raises(AlexopsError, match="unknown preset"):
        presets.overrides("tpu")


def test_dataclass_defaults_equal_the_committed_params_yaml():
    assert params.load(REPO / "params.yaml") == params.Params()
