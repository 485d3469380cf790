"""The training recipe's parts: random erasing, the weight average, the layer table, and the
pictures train and evaluate leave for their users (look before you train)."""

import math

import pytest
import torch
import yaml

from alexops import augment, evaluate, files, params, train
from alexops.model import AlexNet, count_parameters, layer_summary, summary_text
from alexops.paths import Paths

RECIPE = augment.Recipe.create(67, 256 / 224, [0.5], [0.25])
LIGHTING = augment.Lighting(torch.tensor([0.01]), torch.tensor([[1.0]]), 0.1)


def test_erasing_boxes_are_rectangles_of_the_papers_area_and_share():
    boxes = augment.erasing_boxes(4000, 28, 28, 0.5, torch.device("cpu"), torch.Generator().manual_seed(0))
    erased = boxes.flatten(1).any(1)
    assert 0.45 < erased.float().mean() < 0.55
    area = boxes[erased].flatten(1).float().mean(1)
    # 2-40% of the image; rounding to whole pixels and clipping to the image move the ends a little
    assert area.min() >= 0.01 and area.max() <= 0.42
    assert 0.15 < area.mean() < 0.23  # U(0.02, 0.4) has mean 0.21, clipping trims the long boxes
    for box in boxes[erased][:200]:  # one solid rectangle: its bounding box is all erased
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_erasing_off_draws_nothing_and_on_fills_the_box_with_uniform_noise():
    x = torch.full((64, 1, 28, 28), 0.5)
    generator = torch.Generator().manual_seed(1)
    before = generator.get_state()
    assert augment.random_erasing(x, 0.0, generator) is x
    assert torch.equal(generator.get_state(), before)
    erased = augment.random_erasing(x, 1.0, generator)
    changed = erased != x
    assert changed.flatten(1).any(1).all()
    assert erased[changed].min() >= 0 and erased[changed].max() <= 1
    assert abs(erased[changed].mean().item() - 0.5) < 0.05


def test_a_training_batch_with_erasing_is_erase_then_crop_lighting_normalisation():
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    fused = augment.train_batch(images, RECIPE, LIGHTING, True, torch.Generator().manual_seed(3), 0.5)
    generator = torch.Generator().manual_seed(3)
    x = augment.random_erasing(images.float() / 255, 0.5, generator)
    x = augment.random_crops(x, RECIPE.resize, 67, True, generator)
    stepwise = augment.normalised(augment.pca_lighting(x, LIGHTING, generator), RECIPE)
    assert torch.allclose(fused, stepwise, atol=1e-5)


def tiny_session(**changes):
    opts = params.from_dict(
        {"train": {"image_size": 67, "width": 0.0625, "batch_size": 16, "epochs": 2, **changes}}
    ).train
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (96,), generator=generator)
    stats = {"image_shape": [1, 28, 28], "classes": [str(i) for i in range(10)], "mean": [0.5]}
    stats |= {"std": [0.25], "eigval": [0.01], "eigvec": [[1.0]]}
    torch.manual_seed(0)
    return (
        train.build(opts, stats, torch.device("cpu")),
        opts,
        (images[:80], labels[:80], images[80:], labels[80:]),
    )


def test_the_weight_average_follows_each_step_and_is_what_is_validated_and_shipped():
    session, opts, (images, labels, *_) = tiny_session(ema_decay=0.9)
    x = train.augmented(session, images[:16], opts, torch.Generator().manual_seed(0))
    every = train.EMA_EVERY
    train.train_step(session.model, session, x, labels[:16], opts, False, 0)
    first = [p.detach().clone() for p in session.model.parameters()]
    for index in range(1, every + 1):
        train.train_step(session.model, session, x, labels[:16], opts, False, index)
        if index < every:  # between updates the average stays where it was
            assert torch.equal(next(session.trained.parameters()), first[0])
    # the first update copies the weights, the next (at step EMA_EVERY) moves 1 - d^EMA_EVERY of the
    # way to them, d the warm-up's per-step decay there (below 0.9)
    decay = min(0.9, (1 + every) / (10 + every)) ** every
    expected = [decay * a + (1 - decay) * b for a, b in zip(first, session.model.parameters(), strict=True)]
    assert session.trained is session.average.module
    for got, want in zip(session.trained.parameters(), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_the_weight_average_of_a_short_run_follows_the_training_not_the_initial_weights():
    """TensorFlow's warm-up: a 100-step run (25 updates) averaged at 0.999 per step lands near
    the weights it trained to; plain EMA would still hold 90% of the initial ones."""
    update = train.ema_with_warmup(0.999, train.EMA_EVERY)
    averaged, trained = [torch.zeros(3)], [torch.ones(3)]
    for n in range(1, 26):
        update(averaged, trained, n)
    assert averaged[0].min() > 0.99
    # late in a run the warm-up is over: each update moves 1 - 0.999^EMA_EVERY of the way
    late = [torch.zeros(3)]
    update(late, trained, 10_000)
    assert torch.allclose(late[0], torch.full((3,), 1 - 0.999**train.EMA_EVERY))


def test_the_weight_average_is_torchs_averaged_model_without_its_waits():
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    theirs = AveragedModel(model, multi_avg_fn=train.ema_with_warmup(0.99, train.EMA_EVERY))
    ours = train.WeightAverage(model, train.ema_with_warmup(0.99, train.EMA_EVERY))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        optimizer.zero_grad()
        model(torch.randn(8, 5)).pow(2).mean().backward()
        optimizer.step()
        theirs.update_parameters(model)
        ours.update_parameters(model)
    for got, want in zip(ours.module.parameters(), theirs.module.parameters(), strict=True):
        assert torch.equal(got, want)
    # the same state_dict: a checkpoint written with either reads back into the other
    fresh = train.WeightAverage(model, train.ema_with_warmup(0.99, train.EMA_EVERY))
    fresh.load_state_dict(theirs.state_dict())
    assert int(fresh.n_averaged) == 30 and fresh.n_averaged.device.type == "cpu"


def test_a_resumed_run_gets_its_weight_average_back(tmp_path):
    session, opts, data = tiny_session(ema_decay=0.99, erasing=0.5)
    progress = train.fit(session, data, opts, 0, 64, train.Progress())
    paths = Paths(tmp_path, "fashion-mnist")
    train.save_checkpoint(paths, session, progress, "fp", "run")
    fresh, _, _ = tiny_session(ema_decay=0.99, erasing=0.5)
    resumed, run_id = train.resume(paths, "fp", fresh)
    assert (resumed.epoch, run_id) == (2, "run")
    for got, want in zip(fresh.trained.parameters(), session.trained.parameters(), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(next(fresh.trained.parameters()), next(fresh.model.parameters()))


def test_the_preview_batch_is_the_first_batch_training_takes(monkeypatch):
    session, opts, (images, labels, *_) = tiny_session(erasing=0.5, epochs=1)
    preview, preview_labels = train.first_batch(session, images, labels, opts, seed=7)
    taken = []
    real_step = train.train_step
    monkeypatch.setattr(
        train, "train_step", lambda m, s, x, y, *rest: taken.append((x, y)) or real_step(m, s, x, y, *rest)
    )
    train.train_epoch(session.model, session, images, labels, opts, 1, 7, train.Progress())
    assert torch.equal(taken[0][0], preview) and torch.equal(taken[0][1], preview_labels)


def test_the_layer_table_has_the_papers_shapes_and_totals():
    model = AlexNet(3, 1000)
    rows = {row["layer"]: row for row in layer_summary(model, 3)}
    assert rows["conv1"]["output"] == [96, 55, 55] and rows["pool5"]["output"] == [256, 6, 6]
    assert rows["fc6"]["parameters"] == 256 * 6 * 6 * 4096 + 4096
    assert sum(r["parameters"] for r in rows.values()) == count_parameters(model)
    macs = sum(r["multiply_adds"] for r in rows.values())
    assert 0.70e9 < macs < 0.74e9  # ~0.72 GMAC per RGB image (ALEXNET.md)
    fc_weights = sum(rows[f"fc{i}"]["parameters"] for i in (6, 7, 8))
    assert fc_weights / count_parameters(model) > 0.95  # the fully connected layers hold ~96%
    text = summary_text(list(rows.values()), 3, 227)
    assert text.splitlines()[-1].split()[-2:] == [f"{count_parameters(model):,}", f"{macs:,}"]


def test_train_and_evaluate_leave_pictures_in_reports_and_mlflow(prepared):
    raw = yaml.safe_load((prepared / "params.yaml").read_text())
    raw["train"] |= {"epochs": 1, "erasing": 0.5, "ema_decay": 0.9, "label_smoothing": 0.1}
    (prepared / "params.yaml").write_text(yaml.safe_dump(raw))
    loaded = params.from_dict(raw)
    paths = Paths(prepared, "fashion-mnist")
    train.run(loaded, paths)
    evaluate.run(loaded, paths)
    for name in ("augmented.png", "model_summary.png", "mistakes.png"):
        assert (paths.reports / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (paths.reports / "model_summary.txt").read_text()
    assert table.startswith("layer") and "conv1" in table and "fc8" in table and "total" in table
    import mlflow

    run_id = files.read_json(paths.mlflow_run, produced_by="train")["run_id"]
    client = mlflow.MlflowClient()
    logged = {a.path for folder in ("train", "evaluate") for a in client.list_artifacts(run_id, folder)}
    assert {"train/augmented.png", "train/model_summary.txt", "train/model_summary.png"} <= logged
    assert "evaluate/mistakes.png" in logged


@pytest.mark.parametrize("decay", [0.0, 0.999])
def test_recipe_params_are_validated(decay):
    loaded = params.from_dict({"train": {"ema_decay": decay, "erasing": 0.25}})
    assert loaded.train.ema_decay == decay and loaded.train.erasing == 0.25
    for bad in ({"erasing": 1.5}, {"ema_decay": 1.0}, {"erasing": -0.1}):
        with pytest.raises(params.AlexopsError, match=f"train.{next(iter(bad))}"):
            params.from_dict({"train": bad})
    assert math.isclose(params.TrainParams().ema_decay, 0.0)


def test_float_layers_pick_the_papers_convolutions_and_always_the_lrns():
    from alexops import export, quantize

    proto = export.to_onnx(AlexNet(1, 10, image_size=67, width=0.0625).eval(), torch.zeros(2, 1, 67, 67), 18)
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]  # conv1, sum1, conv2, sum2, conv3-5
    kernels = {t.name: list(t.dims) for t in proto.graph.initializer}
    window_sums = [
        n.name for n in proto.graph.node if n.op_type == "Conv" and kernels[n.input[1]][2:] == [1, 1]
    ]
    assert len(convs) == 7 and len(window_sums) == 2
    assert quantize.float_convs(proto, ()) == window_sums
    assert set(quantize.float_convs(proto, ("conv1",))) == {convs[0], *window_sums}
    assert set(quantize.float_convs(proto)) == {convs[0], convs[2], *window_sums}
    assert set(quantize.float_convs(proto, ("conv5",))) == {convs[-1], *window_sums}
    with pytest.raises(params.AlexopsError, match="quantize.float_layers may list only conv1"):
        params.from_dict({"quantize": {"float_layers": ["fc6"]}})
