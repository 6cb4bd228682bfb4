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
    # MLflow tracking of every artifact this run builds (None: off); see fishcomp/tracking.py.
    tracking: object | None = None
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


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX): there autocast to bf16
    is about twice as fast as float32; elsewhere it is emulated and slower."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is not None for probe in probes):
        return any(bool(probe()) for probe in probes if probe is not None)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe_machine() -> str:
    """One line on what a benchmark ran on: its seconds and ratios depend on the CPU (whether it
    computes bf16 natively above all: `precision: auto` runs the backbone and the map heads in it
    there), its cores and torch's threads, so every benchmark prints this beside its numbers."""
    import os

    import torch

    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    bf16 = f"native bf16 ({'AMX' if amx else 'AVX-512 BF16'})" if cpu_has_bf16() else "bf16 only emulated (precision auto runs float32)"
    return (f"{model or 'CPU'}, {os.cpu_count()} cores, {bf16}; torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads{gpu}")


def autocast_dtype(precision: str, device):
    """The dtype to autocast to for `precision` (auto | fp32 | bf16) on `device`, or None for fp32.

    auto: float16 on a GPU (with fp32 master weights), bfloat16 on a CPU that has it natively,
    float32 elsewhere. bf16 asked for on a CPU without native support is honoured (slowly)."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None


def precision_name(dtype) -> str:
    import torch

    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def autocast(dtype, device):
    """A context that autocasts to `dtype` on `device` (a no-op for None: float32)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def training_precision(loaded, device):
    """The autocast dtype a head trains and predicts in (see TrainConfig.precision)."""
    from fishcomp.models.heads import head_uses_map

    setting = loaded.config.train.precision
    if setting == "auto":
        # Measured on a CPU with AMX (docs/results.md): the FCN's five folds on 1280-channel maps
        # trained 1.9x faster in bf16 (channels-last, no learnable input norm) at the same log
        # loss within noise, and a fine-tuning epoch was no faster. So heads on the map autocast
        # wherever a fast half type exists, fine-tuning only on a GPU, pooled heads never (their
        # steps are too small to gain).
        if loaded.config.train.finetune is not None:
            if torch_device_type(device) != "cuda":
                return None
        elif loaded.config.head.kind == "linear" or not head_uses_map(loaded.config.head):
            return None  # (the probe pools a map once and is fitted in float64)
    return autocast_dtype(setting, device)


def torch_device_type(device) -> str:
    import torch

    return torch.device(device).type
