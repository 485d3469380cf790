"""Stage `evaluate`: test accuracy (centre crop and the paper's 10-crop), per-class
accuracy, the confusion matrix as data for `dvc plots` and as a PNG, all in the MLflow run.
"""

from __future__ import annotations

import io

import torch

from alexops import augment, figures, files, tracking
from alexops.model import load_trained, pick_device
from alexops.params import Params
from alexops.paths import Paths
from alexops.prepare import load_split


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    images: torch.Tensor,
    recipe: augment.Recipe,
    batch_size: int,
    device: torch.device | str,
    ten_crop: bool,
) -> torch.Tensor:
    """Softmax probabilities (N, classes) on CPU; with ten_crop the mean over 10 views."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        if ten_crop:
            views = augment.ten_crop_views(batch, recipe)  # (10, B, C, S, S)
            logits = model(views.flatten(0, 1)).float().view(10, len(batch), -1)
            out.append(logits.softmax(-1).mean(0).cpu())
        else:
            out.append(model(augment.preprocess(batch, recipe)).float().softmax(-1).cpu())
    model.train(was_training)
    return torch.cat(out)


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(actual, predicted) counts."""
    flat = labels * num_classes + predicted
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def metrics_from(probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    predicted = probs.argmax(1)
    matrix = confusion_matrix(labels, predicted, len(classes))
    per_class = matrix.diag().float() / matrix.sum(1).clamp_min(1).float()
    return {
        "accuracy": (predicted == labels).float().mean().item(),
        "loss": torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item(),
        "per_class_accuracy": dict(zip(classes, per_class.tolist(), strict=True)),
        "confusion": matrix,
        "predicted": predicted,
    }


def majority_baseline(labels: torch.Tensor, classes: list[str]) -> dict:
    """The test set's most common class and the accuracy of answering it for every image: the
    score a model that learned nothing about the images can reach (register's chance check)."""
    counts = torch.bincount(labels, minlength=len(classes))
    most = int(counts.argmax())
    return {"majority_class": classes[most], "majority_class_accuracy": counts[most].item() / len(labels)}


def run(params: Params, paths: Paths) -> None:
    with tracking.continue_run(params, paths, "evaluate") as mlflow:
        report = evaluate(params, paths)
        with tracking.store_write(mlflow):
            mlflow.log_metrics({f"test_{k}": v for k, v in report.items() if isinstance(v, float)})
            mlflow.log_metrics(
                {f"test_class_{i}_accuracy": v for i, v in enumerate(report["per_class_accuracy"].values())}
            )
        for name in ("evaluate.json", "confusion.png", "confusion.csv", "mistakes.png"):
            mlflow.log_artifact(str(paths.reports / name), artifact_path="evaluate")
    print(
        f"evaluate: test accuracy {report['accuracy']:.4f} "
        f"({'10-crop' if params.evaluate.ten_crop else 'centre'}), "
        f"centre crop {report['accuracy_center_crop']:.4f}"
    )


def evaluate(params: Params, paths: Paths) -> dict:
    """Test the trained model; write evaluate.json, confusion.csv, confusion.png and mistakes.png."""
    device = pick_device(params.base.device)
    model, _, recipe, classes = load_trained(paths.model, device)
    images, labels = load_split(paths.prepared / "test.pt")
    opts = params.evaluate
    probs = predict_probabilities(model, images, recipe, opts.batch_size, device, False)
    centre = metrics_from(probs, labels, classes)
    report = {"accuracy_center_crop": centre["accuracy"], "loss_center_crop": centre["loss"]}
    best = centre
    if opts.ten_crop:
        probs = predict_probabilities(model, images, recipe, opts.batch_size, device, True)
        ten = metrics_from(probs, labels, classes)
        report |= {"accuracy_ten_crop": ten["accuracy"], "loss_ten_crop": ten["loss"]}
        best = ten
    # `accuracy` is the headline figure: the paper's 10-crop test when enabled
    report |= {"accuracy": best["accuracy"], "test_images": len(labels), "ten_crop": opts.ten_crop}
    report["per_class_accuracy"] = best["per_class_accuracy"]
    report |= majority_baseline(labels, classes)
    write_reports(paths, report, best, labels, classes)
    worst = figures.worst_mistakes(probs, labels)
    how = "10-crop" if opts.ten_crop else "centre crop"
    grid = figures.mistakes_grid(
        augment.preprocess(images[worst], recipe), labels[worst], probs[worst], classes, recipe, how
    )
    files.write_bytes(paths.reports / "mistakes.png", grid)
    return report


def write_reports(paths: Paths, report: dict, best: dict, labels: torch.Tensor, classes: list[str]) -> None:
    files.write_json(paths.reports / "evaluate.json", report)
    # one row per test image, as DVC's confusion-matrix templates read it; the classes' indices
    # order the axes as the dataset orders them (.dvc/plots/confusion_matrix.json), not by name
    rows = ["actual,predicted,actual_index,predicted_index"] + [
        f'"{classes[a]}","{classes[p]}",{a},{p}'
        for a, p in zip(labels.tolist(), best["predicted"].tolist(), strict=True)
    ]
    files.write_text(paths.reports / "confusion.csv", "\n".join(rows) + "\n")
    files.write_bytes(
        paths.reports / "confusion.png", confusion_png(best["confusion"], classes, report["accuracy"])
    )


def confusion_png(matrix: torch.Tensor, classes: list[str], accuracy: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    rates = (matrix.float() / matrix.sum(1, keepdim=True).clamp_min(1)).numpy()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(matrix.tolist()):
        for j, count in enumerate(row):
            color = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"Confusion matrix, test accuracy {accuracy:.2%}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
