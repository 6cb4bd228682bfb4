"""What every stage shares: where the data and artifacts are, the dataset (read once), the device."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from fishcomp.cache import Cache
from fishcomp.config import DataConfig
from fishcomp.console import warn
from fishcomp.data.annotations import Annotations, load_annotations
from fishcomp.data.layout import Dataset, load_dataset
from fishcomp.errors import FishcompError


@dataclass
class Context:
    data_dir: Path
    work_dir: Path
    overrides: list[str] = field(default_factory=list)
    # fail: an unreadable test image stops the run; prior: it is predicted as the class prior.
    on_bad_test: str = "fail"
    _dataset: Dataset | None = None
    _annotations: dict[Path, Annotations] = field(default_factory=dict)

    @property
    def cache(self) -> Cache:
        return Cache(self.work_dir)

    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = load_dataset(self.data_dir)
            for note in self._dataset.warnings:
                warn(note)
        return self._dataset

    def annotations_dir(self, data: DataConfig) -> Path:
        return Path(data.annotations) if data.annotations else self.data_dir / "annos"

    def annotations(self, data: DataConfig) -> Annotations:
        folder = self.annotations_dir(data)
        if folder not in self._annotations:
            loaded = self._annotations[folder] = load_annotations(folder)
            for reason, count in sorted(loaded.counts.items()):
                if reason not in ("boxes", "points"):
                    warn(f"annotations in {folder}: {count} {reason}")
        return self._annotations[folder]

    def annotations_digest(self, data: DataConfig) -> str:
        folder = self.annotations_dir(data)
        digest = hashlib.sha256()
        if folder.is_dir():
            for path in sorted([*folder.glob("*_labels.json"), *folder.glob("*_points.json")]):
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()[:16]


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise FishcompError(f"device `{name}` is not a torch device (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FishcompError(f"device `{name}` asked for, but this machine has no usable CUDA GPU (use device: auto or cpu)")
    return device
