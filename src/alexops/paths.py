"""Where each stage reads and writes; dvc.yaml declares the same paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path
    dataset: str

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw" / self.dataset

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared" / self.dataset

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts" / self.dataset

    @property
    def model(self) -> Path:
        return self.artifacts / "model.pt"

    @property
    def checkpoint(self) -> Path:
        return self.artifacts / "checkpoint.pt"

    @property
    def onnx(self) -> Path:
        return self.artifacts / "model.onnx"

    @property
    def int8_onnx(self) -> Path:
        """The static-QDQ int8 model the quantize stage writes beside model.onnx."""
        return self.artifacts / "model.int8.onnx"

    @property
    def mlflow_run(self) -> Path:
        """The MLflow run id train opened; evaluate, export and register continue it."""
        return self.artifacts / "mlflow_run.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.dataset

    @property
    def prepare_report(self) -> Path:
        """What prepare found: counts per class and split, bad files, duplicates (a DVC output)."""
        return self.reports / "prepare.json"

    @property
    def datasets(self) -> Path:
        """The repository folder whose image folders and archives DVC tracks (`dvc add`)."""
        return self.root / "datasets"
