"""The pure pieces: augmentation, statistics, schedules, the promotion rule, the confusion matrix."""

import io
import math
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from alexops import augment, datasets, figures, params, prepare, register, tracking, train
from alexops.evaluate import confusion_matrix, majority_baseline

RECIPE = augment.Recipe.create(67, 256 / 224, [0.5], [0.25])


def test_random_crops_pick_real_windows_and_mirror_about_half():
    x = torch.arange(2 * 1 * 10 * 10, dtype=torch.float32).view(2, 1, 10, 10).repeat(200, 1, 1, 1)
    crops = augment.random_crops(x, 10, 4, flip=True, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (400, 1, 4, 4)
    mirrored = 0
    for crop, image in zip(crops, x, strict=True):
        row0 = crop[0, 0]
        top, left = divmod(int(min(row0[0], row0[-1]).item()) % 100, 10)
        window = image[0, top : top + 4, left : left + 4]
        assert torch.equal(crop[0], window) or torch.equal(crop[0], window.flip(-1))
        mirrored += not torch.equal(crop[0], window)
    assert 120 < mirrored < 280


@pytest.mark.parametrize(
    "height, width, resize, size",
    [
        (28, 28, 113, 99),
        (32, 32, 37, 32),
        (40, 40, 30, 24),
        (64, 64, 20, 16),
        (28, 36, 40, 32),
        (40, 40, 40, 32),
    ],
)
def test_random_crops_equal_cropping_the_resized_image(height, width, resize, size):
    """Up- and down-sizing (by more than 2× too), non-square images, and images already at the
    resize size (cut as windows): what resizing, then cropping gives."""
    images = torch.randint(0, 256, (64, 3, height, width), dtype=torch.uint8)
    crops = augment.random_crops(images.float() / 255, resize, size, True, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)  # the same draws: top, left, then mirrors
    top, left = (torch.randint(0, resize - size + 1, (64,), generator=generator) for _ in range(2))
    mirrored = torch.rand(64, generator=generator) < 0.5
    full = augment.resized(images, resize)
    for i in range(64):
        window = full[i, :, top[i] : top[i] + size, left[i] : left[i] + size]
        expected = window.flip(-1) if mirrored[i] else window
        assert torch.allclose(crops[i], expected, atol=1e-5)


def test_windows_of_a_cache_at_the_resize_size_are_the_resampling_path_bit_for_bit():
    """A folder cache is made at the resize size: its crops are cut out, in uint8, with the same
    draws; they must equal the matrix products' result exactly, and so must the training batch."""
    images = torch.randint(0, 256, (32, 3, 40, 40), dtype=torch.uint8)
    cut = augment.random_crops(images, 40, 32, True, torch.Generator().manual_seed(2))
    assert cut.dtype == torch.uint8
    generator = torch.Generator().manual_seed(2)
    top, left = (torch.randint(0, 9, (32,), generator=generator) for _ in range(2))
    mirrored = torch.rand(32, generator=generator) < 0.5
    steps = torch.arange(32)
    cols = torch.where(mirrored[:, None], (left[:, None] + steps).flip(-1), left[:, None] + steps)
    identity = augment.interpolation_matrix(40, 40, torch.float32, images.device)
    products = identity[top[:, None] + steps][:, None] @ (images.float() / 255) @ identity[cols][:, None].mT
    assert torch.equal(cut.float() / 255, products)
    recipe = augment.Recipe(32, 40, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
    lighting = augment.Lighting(torch.tensor([0.3, 0.2, 0.1]), torch.eye(3), 0.1)
    batch = augment.train_batch(images, recipe, lighting, True, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    x = augment.random_crops(images.float() / 255, 40, 32, True, generator)
    expected = augment.normalised(augment.pca_lighting(x, lighting, generator), recipe)
    assert torch.allclose(batch, expected, atol=1e-5)  # fused: the rounding differs


def test_pca_lighting_shifts_each_image_along_the_eigenvectors():
    eigvec = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    lighting = augment.Lighting(torch.tensor([0.5, 0.1]), eigvec, std=0.1)
    x = torch.zeros(4000, 2, 3, 3)
    shifted = augment.pca_lighting(x, lighting, torch.Generator().manual_seed(0))
    per_image = shifted[:, :, 0, 0]
    assert torch.equal(shifted, per_image[:, :, None, None].expand_as(shifted))  # same shift per image
    coords = per_image @ eigvec  # back to the eigen-basis: α_i λ_i, α ~ N(0, 0.1)
    assert coords.std(0).tolist() == pytest.approx([0.05, 0.01], rel=0.1)
    assert augment.pca_lighting(x, augment.Lighting(lighting.eigval, eigvec, 0.0), None) is x


def test_a_training_batch_is_crop_flip_lighting_then_normalisation():
    """train_batch fuses lighting and normalisation; it must equal the steps one by one."""
    recipe = augment.Recipe.create(67, 256 / 224, [0.5, 0.4, 0.3], [0.25, 0.2, 0.3])
    eigvec = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
    lighting = augment.Lighting(torch.tensor([0.3, 0.2, 0.1]), eigvec, 0.1)
    images = torch.randint(0, 256, (16, 3, 28, 28), dtype=torch.uint8)
    fused = augment.train_batch(images, recipe, lighting, True, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    x = augment.random_crops(images.float() / 255, recipe.resize, 67, True, generator)
    stepwise = augment.normalised(augment.pca_lighting(x, lighting, generator), recipe)
    assert torch.allclose(fused, stepwise, atol=1e-5)


def test_channel_statistics_recover_a_known_covariance():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[0.2, 0.0, 0.0], [0.1, 0.1, 0.0], [0.0, 0.05, 0.02]])
    pixels = (torch.randn(200_000, 3, generator=generator) @ mixing.T + 0.5).clamp(0, 1)
    images = (pixels * 255).round().to(torch.uint8).T.reshape(3, 2000, 10, 10).permute(1, 0, 2, 3)
    stats = prepare.channel_statistics(images)
    expected = torch.linalg.eigvalsh((mixing @ mixing.T).double())
    assert stats["eigval"] == pytest.approx(expected.tolist(), rel=0.05, abs=1e-4)
    assert stats["mean"] == pytest.approx([0.5, 0.5, 0.5], abs=0.01)


@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_moments_are_the_exact_integer_sums(channels):
    """Each channel's sum, then every channel pair's sum of products, row-major: the same integers
    as int64 arithmetic, for an image and for a float64 chunk of many images' pixels."""
    from alexops import cache

    image = torch.randint(
        0, 256, (channels, 113, 97), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    flat = image.reshape(channels, -1).to(torch.int64)
    expected = torch.cat([flat.sum(1), (flat[:, None, :] * flat[None, :, :]).sum(-1).ravel()]).numpy()
    assert (cache.pixel_moments(image.numpy()) == expected).all()
    chunk = flat.double().repeat(1, 300).numpy()  # 3.3 million pixels a channel
    assert (cache.pixel_moments(chunk) == expected * 300).all()


def test_ten_crop_views_are_corners_centre_and_mirrors():
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    views = augment.ten_crop_views(images, RECIPE)
    assert views.shape == (10, 3, 1, 67, 67)
    assert torch.equal(views[5:], views[:5].flip(-1))
    assert torch.allclose(views[4], augment.preprocess(images, RECIPE))


def test_schedules():
    opts = params.from_dict(
        {"train": {"epochs": 10, "lr": 0.1, "schedule": "cosine", "warmup_epochs": 1}}
    ).train
    lrs = [train.lr_at(opts, step, 100, 1.0) for step in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1) and lrs[-1] < 1e-3
    onecycle = params.from_dict({"train": {"epochs": 10, "lr": 0.1}}).train
    lrs = [train.lr_at(onecycle, step, 100, 1.0) for step in range(100)]
    assert lrs[0] == pytest.approx(0.004) and max(lrs) == pytest.approx(0.1) and lrs[-1] < 1e-3
    plateau = params.from_dict({"train": {"lr": 0.01, "schedule": "plateau", "val_size": 100}}).train
    assert train.lr_at(plateau, 50, 100, 0.1) == pytest.approx(0.001)


def test_plateau_divides_by_ten_after_patience_runs_out():
    state = train.PlateauState()
    for error in (0.5, 0.4, 0.4, 0.4):
        state.update(error)
    assert state.scale == pytest.approx(0.1) and state.best_error == 0.4
    state.update(0.3)
    assert state.scale == pytest.approx(0.1) and state.bad_epochs == 0


PARITY_OK = (True, 1e-6)


@pytest.mark.parametrize(
    ("new", "parity", "floor", "champion", "promote", "named"),
    [
        (0.9, PARITY_OK, 0.5, None, True, "no champion yet"),
        (0.9, PARITY_OK, 0.5, 0.9, True, "≥ champion's"),
        (0.91, PARITY_OK, 0.5, 0.9, True, "≥ champion's"),
        (0.89, PARITY_OK, 0.5, 0.9, False, "< champion's"),
        (0.4, PARITY_OK, 0.5, None, False, "register.min_accuracy"),
        (0.95, PARITY_OK, 0.96, 0.9, False, "register.min_accuracy"),
        (0.99, (False, 0.3), 0.5, None, False, "parity"),
    ],
)
def test_promotion_gate(new, parity, floor, champion, promote, named):
    promoted, reason = register.decide(new, parity, floor, champion)
    assert promoted is promote and named in reason


@pytest.mark.parametrize(
    ("right", "test_images", "majority", "promote"),
    [
        (9, 18, 1 / 3, False),  # 50% of 18 in three balanced classes: p = 0.11
        (11, 18, 1 / 3, True),  # p = 0.014
        (10, 18, 1 / 2, False),  # two classes: 56% is above the 0.5 floor, p = 0.41
        (12, 18, 1 / 2, False),  # p = 0.12
        (13, 18, 1 / 2, True),  # p = 0.048
        (1100, 10000, 1 / 10, True),  # a large test set: 11% is already better than a constant answer
        (1000, 10000, 1 / 10, False),
        (18, 18, 1.0, False),  # a test set of one class shows nothing
    ],
)
def test_the_gate_holds_back_an_accuracy_a_constant_answer_explains(right, test_images, majority, promote):
    chance = register.Chance(test_images, "coat", majority, significance=0.05)
    promoted, reason = register.decide(right / test_images, PARITY_OK, 0.5 * majority, None, chance)
    assert promoted is promote
    if not promote:
        assert "'coat' for every image" in reason and "register.significance 0.05" in reason
        assert ("one class only" in reason) is (majority == 1.0)
    else:
        assert "better than answering 'coat'" in reason
    off = register.Chance(test_images, "coat", majority, significance=1.0)
    assert register.decide(right / test_images, PARITY_OK, 0.0, None, off)[0]


def test_every_passing_reason_says_what_the_chance_check_found():
    """A champion decided again (its weights registered once more, or the gate rerun) keeps
    @champion with a reason of its own: it repeats the chance check like a first promotion's."""
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    champion = ModelVersion("m", "2", 0, tags=[ModelVersionTag("accuracy", "0.6")])
    chance = register.Chance(18, "coat", 1 / 3, significance=0.05)
    again = register.promotion_reason(0.6, 0.5, chance, champion, champion, register.CHAMPION)
    first = register.promotion_reason(0.6, 0.5, chance, None, champion, register.CHAMPION)
    for reason in (again, first):
        assert "better than answering 'coat' every time (p = 0.0" in reason
    assert "still the best that passed" in again
    large = register.Chance(10000, "coat", 0.1, significance=0.05)
    assert register.decide(0.92, PARITY_OK, 0.5, None, large)[1].endswith("every time (p < 0.0001)")


def test_an_evaluation_from_before_the_chance_check_is_one_clear_error():
    with pytest.raises(params.AlexopsError, match=r"no 'majority_class'.*dvc repro evaluate"):
        register.Chance.of({"accuracy": 0.9, "test_images": 10000}, 0.05)


def test_evaluate_names_the_majority_class_and_what_answering_it_scores():
    labels = torch.tensor([2, 0, 2, 1, 2, 0])
    assert majority_baseline(labels, ["a", "b", "c"]) == {
        "majority_class": "c",
        "majority_class_accuracy": 0.5,
    }


def test_parity_from_the_export_report():
    report = {"parity_max_abs_diff_batch1": 2e-7, "parity_max_abs_diff_batch7": 5e-5, "parity_passed": True}
    assert register.parity_passed(report | {"parity_tolerance": 1e-4}) == (True, 5e-5)
    assert register.parity_passed(report | {"parity_tolerance": 1e-5})[0] is False
    assert register.parity_passed({"parity_passed": True, "parity_tolerance": 1e-4})[0] is False


def test_confusion_matrix_counts_actual_by_predicted():
    matrix = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_dataset_choices_match_the_known_datasets():
    assert set(params.DATASETS) == set(datasets.SPECS)


def test_plateau_without_validation_is_rejected():
    with pytest.raises(params.AlexopsError, match="val_size"):
        params.from_dict({"train": {"schedule": "plateau", "val_size": 0}})
    assert math.isfinite(params.from_dict({"train": {"schedule": "cosine", "val_size": 0}}).train.lr)


def test_git_dirty_ignores_what_the_pipeline_writes_but_not_code_or_params(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name in ("dvc.lock", "reports/m.json", "params.yaml", "src.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("committed\n")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "c")
    (tmp_path / "dvc.lock").write_text("a run rewrote it\n")
    (tmp_path / "reports" / "m.json").write_text("new metrics\n")
    assert tracking.lineage_tags(tmp_path)["git.dirty"] == "false"
    for edited in ("params.yaml", "src.py"):
        (tmp_path / edited).write_text("edited\n")
        assert tracking.lineage_tags(tmp_path)["git.dirty"] == "true"
        git("checkout", edited)


def test_make_runs_headline_is_three_short_lines():
    from alexops.summary import headline

    evaluation = {"accuracy": 0.9236, "accuracy_center_crop": 0.917, "ten_crop": True}
    record = {"model_name": "alexnet-shoes", "version": "3", "alias": "challenger"}
    record["reason"] = "accuracy 0.4 < 0.5"
    lines = headline("shoes", evaluation, record).split("\n")
    assert lines[0] == "shoes: test accuracy 0.9236 (10-crop), 0.9170 (centre crop)"
    assert lines[1] == "registered alexnet-shoes version 3 as @challenger: accuracy 0.4 < 0.5"
    assert "dvc metrics show" in lines[2] and "reports/shoes" in lines[2]
    centre = headline("shoes", evaluation | {"accuracy": 0.917, "ten_crop": False}, record).split("\n")[0]
    assert centre == "shoes: test accuracy 0.9170 (centre crop)"


def test_a_progress_bar_in_a_log_writes_whole_lines(monkeypatch, capsys):
    """Where stderr is no terminal (a queued experiment's log, Prefect, CI), each state a bar
    draws is a line of its own, never a carriage-return redraw: every LOG_INTERVAL_S and at the
    end, whatever the loop sets on the bar in between."""
    from alexops import progress

    with progress.bar(range(5), desc="short") as short:
        for step in short:  # a loop that sets its loss on the bar: no line until the interval ends
            short.set_postfix(loss=f"{1 / (step + 1):.3f}")
            short.set_description(f"short {step}")
    (final,) = capsys.readouterr().err.splitlines()  # the final state alone
    assert final.startswith("short 4:") and "5/5" in final and "loss=0.200" in final
    for _ in progress.bar(range(5), desc="gone", leave=False):
        pass
    assert capsys.readouterr().err == ""

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    for _ in progress.bar(range(3), desc="decode", unit="img"):
        pass
    written = capsys.readouterr().err
    assert "\r" not in written and written.endswith("\n")
    lines = written.splitlines()
    assert all(line.startswith("decode:") for line in lines) and "0/3" not in written
    assert len(set(lines)) == len(lines) and "3/3" in lines[-1]


@pytest.mark.parametrize("val_size", [5000, 0])
def test_the_epoch_line_reads_back_with_or_without_validation(val_size):
    """train prints one line per epoch and the Prefect flow parses it back; with train.val_size
    0 there is no validation to print (the history holds NaN), and no `nan` reaches the line."""
    from alexops import progress

    val = (0.3561, 0.8634) if val_size else (math.nan, math.nan)
    rows = [
        {"epoch": e, "train_loss": 0.4123, "train_accuracy": 0.8512, "val_loss": val[0],
         "val_accuracy": val[1], "lr": 0.032, "seconds": 26.0 + e}
        for e in (1, 2, 3)
    ]  # fmt: skip
    line = progress.format_epoch(rows, 30)
    assert ("val_acc 0.8634" in line) == bool(val_size) and "nan" not in line
    epoch = progress.parse_epoch(line)
    assert (epoch.epoch, epoch.epochs, epoch.loss, epoch.accuracy) == (3, 30, 0.4123, 0.8512)
    assert epoch.seconds == 29 and epoch.eta_s == 27 * 28
    if val_size:
        assert (epoch.val_loss, epoch.val_accuracy) == val
    else:
        assert math.isnan(epoch.val_loss) and math.isnan(epoch.val_accuracy)
    assert progress.parse_epoch("epoch 3/30: 50%|#####") is None


@pytest.mark.parametrize(
    "recorded, otherwise",
    [
        ({"data.prepared": "md5-a", "test.crops": "10-crop"}, False),
        ({"data.prepared": "md5-b", "test.crops": "10-crop"}, True),
        ({"data.prepared": "md5-a", "test.crops": "centre"}, True),
        ({"test.crops": "10-crop"}, False),  # recorded before the data was: counted the same
        ({}, False),
    ],
)
def test_a_version_tested_on_other_data_or_crops_is_tested_otherwise(recorded, otherwise):
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    version = ModelVersion("m", "1", 0, tags=[ModelVersionTag(k, v) for k, v in recorded.items()])
    today = {register.DATA_TAG: "md5-a", register.CROPS_TAG: "10-crop"}
    assert register.tested_otherwise(version, today) is otherwise


def test_a_version_remembers_its_newest_tests_with_nan_as_null():
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    def key(n: int) -> str:  # as dvc.lock names a prepared directory: 32 hex digits and .dir
        return f"{n:032x}.dir 10-crop"

    tests: dict = {}
    for n in range(register.TESTS_KEPT + 8):
        register.remember(tests, key(n), 1 / (n + 3))  # full float precision: the longest numbers
    register.remember(tests, key(8), None)  # tested again: now the newest
    tag = register.kept(tests)
    assert len(tag) < 5000  # what a model version tag holds
    version = ModelVersion("m", "1", 0, tags=[ModelVersionTag(register.TESTS_TAG, tag)])
    remembered = register.tests_of(version)
    assert len(remembered) == register.TESTS_KEPT and list(remembered)[-1] == key(8)
    assert remembered[key(8)] is None and key(7) not in remembered  # the oldest went
    assert remembered[key(register.TESTS_KEPT + 7)] == 1 / (register.TESTS_KEPT + 10)
    today = {register.DATA_TAG: "md5-a", register.CROPS_TAG: "centre"}
    assert register.which_test(today, today) == "md5-a centre"
    assert register.recall({"md5-a centre": 0.5}, today) == (True, 0.5)
    assert register.recall({"md5-a centre": None}, today) == (True, None)
    assert register.recall({"md5-b centre": 0.5}, today) == (False, None)
    assert register.recall({"centre": 0.5}, {register.CROPS_TAG: "centre"})[0] is False  # which data?
    assert register.which_test({register.CROPS_TAG: "centre"}, today) == "- centre"  # no data recorded
    not_written = ("[1, 2", "[1, 2]", '{"a b": "0.5", "c d": 0.5, "e f": true, "g h": NaN, "i j": Infinity}')
    for text in not_written:  # not what register writes
        broken = ModelVersion("m", "1", 0, tags=[ModelVersionTag(register.TESTS_TAG, text)])
        assert register.tests_of(broken) == ({"c d": 0.5} if "c d" in text else {})


@pytest.mark.parametrize("wrong", [0, 3])
def test_the_mistakes_picture_shows_the_mistakes_or_says_there_are_none(wrong):
    """evaluate's mistakes.png: a grid of the worst mistakes; with none (a folder dataset the
    model learned perfectly), a line that says so, not a title over an empty canvas."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    probs = torch.nn.functional.one_hot(labels, 3).float()
    probs[:wrong] = probs[:wrong].roll(1, dims=1)  # the first `wrong` images predicted one class off
    worst = figures.worst_mistakes(probs, labels)
    assert sorted(worst.tolist()) == list(range(wrong))
    views = torch.full((6, 1, 8, 8), -2.0)[worst]  # black once the normalisation is undone
    png = figures.mistakes_grid(views, labels[worst], probs[worst], ["a", "b", "c"], RECIPE, "centre crop")
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    lower_half = picture[picture.shape[0] // 2 :]
    assert (lower_half < 128).any(), "below the title: the images, or the line saying there are none"
