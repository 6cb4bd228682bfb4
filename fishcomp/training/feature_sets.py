"""Cached features as training and prediction read them.

A `FeatureSet` is a list of rows of a feature array (memory-mapped or in memory) with what goes
with each row: the image-size one-hot, the box target, the augmented copies training draws from,
and the test-time views prediction averages over.
"""

from __future__ import annotations

import os

import numpy as np

from fishcomp.context import autocast
from fishcomp.metrics import KAGGLE_EPS, normalise_rows


def _in_memory(array: np.ndarray) -> np.ndarray:
    # Small arrays (pooled vectors) are worth holding in memory. Maps stay on disk here: a head
    # that trains on them reads them once into `ResidentMaps` (`make_resident`), so a copy made
    # here would only be copied again.
    if isinstance(array, np.memmap) and array.ndim < 4 and array.nbytes < 1 << 30:
        return np.ascontiguousarray(array)
    return array


def as_input(features, device):
    """A batch of cached features as a head reads it: float32 on `device`; a map channels-last,
    the layout in which the CPU's and the GPU's convolution kernels are fastest (a bf16 training
    step of the FCN on 64 maps: about 370 ms in NCHW, 175 ms channels-last, on the build machine)."""
    import torch

    layout = torch.channels_last if features.dim() == 4 else torch.contiguous_format
    return features.to(device=device, dtype=torch.float32, memory_format=layout)


def _gather(array: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    order = np.argsort(rows)  # sorted reads are sequential on a memory map
    out[order] = array[rows[order]]


class ResidentMaps:
    """Maps held in memory as a torch tensor, channels-last and in the dtype the head computes in,
    converted once per run instead of once per batch and epoch: a bf16 training step of the
    `bbox_grid` head on 64 maps took 265 ms from float16 NCHW rows and 149 ms from these (NumPy
    gather, float32 channels-last copy and the 1280-channel normalisation in float32 were most of
    it), the FCN's 337 ms and 255 ms (build machine, one process)."""

    def __init__(self, array: np.ndarray, dtype=None):
        import torch

        dtype = dtype or torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype

        # (N, H, W, C) contiguous, so a row is one map in channels-last order and a batch is a
        # gather of whole rows; filled a slice at a time, so a memory-mapped cache is read once
        # without a second full copy in its own dtype.
        n, channels, height, width = array.shape
        self.nhwc = torch.empty((n, height, width, channels), dtype=dtype)
        for start in range(0, n, 64):
            chunk = torch.from_numpy(np.array(array[start : start + 64]))
            self.nhwc[start : start + 64] = chunk.permute(0, 2, 3, 1)
        self.shape = tuple(array.shape)
        self.dtype = dtype

    @classmethod
    def from_tensor(cls, nchw) -> ResidentMaps:
        """Maps computed in this process (an (N, C, H, W) tensor), held as they are."""
        maps = cls.__new__(cls)
        maps.nhwc = nchw.permute(0, 2, 3, 1).contiguous()
        maps.shape, maps.dtype = tuple(nchw.shape), nchw.dtype
        return maps

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray):
        """These rows as an (N, C, H, W) tensor with channels-last strides."""
        import torch

        return self.nhwc.index_select(0, torch.from_numpy(np.asarray(rows, dtype=np.int64))).permute(0, 3, 1, 2)


def resident_budget() -> int:
    """Bytes of maps a training run may hold in memory: a quarter of the machine's (the rest for
    the process, the page cache and whatever else runs); beyond it maps are read from disk."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): what _in_memory holds
        return 1 << 30


def resident_dtype(compute_dtype, device):
    """What maps are held as: the head's half type on a CPU that autocasts to bf16 (each step then
    reads them as they are), else None: as they are stored (the cache's float16, or float32 once
    projected), converted to float32 per batch."""
    import torch

    from fishcomp.context import torch_device_type

    if compute_dtype == torch.bfloat16 and torch_device_type(device) == "cpu":
        return torch.bfloat16
    return None


class FeatureSet:
    """Rows of cached features, fetched a batch at a time as float32 tensors.

    - `copies`: augmented versions of `array` (same row layout); training picks one per image and
      epoch, `copy_boxes[k]` holding copy k+1's moved boxes (aligned with this set's positions);
    - `views`: test-time views of `array` (same row layout), averaged by `predict`.
    """

    def __init__(self, array, rows, sizes=None, boxes=None, copies=(), copy_boxes=None, views=()):
        self.array, self.rows, self.sizes, self.boxes = _in_memory(array), rows, sizes, boxes
        self.copies = [_in_memory(c) for c in copies]
        self.copy_boxes = copy_boxes
        self.views = [_in_memory(v) for v in views]

    def add_mirrored_copies(self, points: bool = False) -> None:
        """The test-time views, each the photo mirrored left-right, as training copies too (the
        same arrays), their boxes mirrored; head/tail points (`points`: columns 4:8, as
        `geometry_targets` lays them out) are dropped for a copy."""
        if self.copies:
            raise ValueError("mirrored copies replace augmented ones; this set has both")
        self.copies = list(self.views)
        if self.boxes is not None:
            # Every box column (4k: x) moved; the points, when any, are not (they stay NaN).
            mirrored = self.boxes.copy()
            box_columns = np.ones(mirrored.shape[1], dtype=bool)
            if points:
                box_columns[4:8] = False
                mirrored[:, 4:8] = np.nan
            x = np.flatnonzero(box_columns & (np.arange(mirrored.shape[1]) % 4 == 0))
            mirrored[:, x] = 1 - self.boxes[:, x] - self.boxes[:, x + 2]
            self.copy_boxes = np.stack([mirrored] * len(self.copies))

    def make_resident(self, dtype, budget: int) -> int:
        """Hold this set's maps (with their copies and views) as `ResidentMaps` of `dtype` (None:
        their own) if they fit in `budget` bytes; the bytes taken (0: left as they were). An
        array that is both a copy and a view is held once."""
        distinct = {id(a): a for a in [self.array, *self.copies, *self.views]}
        if any(isinstance(a, ResidentMaps) or a.ndim != 4 for a in distinct.values()):
            return 0  # done already, or not maps
        needed = sum(a.size * (dtype.itemsize if dtype is not None else a.dtype.itemsize) for a in distinct.values())
        if needed > budget:
            return 0
        held = {key: ResidentMaps(a, dtype) for key, a in distinct.items()}
        self.array = held[id(self.array)]
        self.copies = [held[id(c)] for c in self.copies]
        self.views = [held[id(v)] for v in self.views]
        return needed

    def subset(self, positions: np.ndarray) -> FeatureSet:
        pick = (lambda a: None if a is None else a[positions])  # noqa: E731
        copy_boxes = None if self.copy_boxes is None else self.copy_boxes[:, positions]
        return FeatureSet(self.array, self.rows[positions], pick(self.sizes), pick(self.boxes), self.copies, copy_boxes, self.views)

    def with_rows(self, array: np.ndarray, sizes: np.ndarray | None, copies: list[np.ndarray], views: list[np.ndarray]) -> FeatureSet:
        """This set in memory with more rows after its own (their copies and views as this set
        has them), positions 0.. still this set's; the new rows' boxes unknown (NaN). Pooled
        features only (read into memory: train-sized)."""
        stack = lambda own, more: np.concatenate([np.asarray(own[self.rows], dtype=np.float16), np.asarray(more, dtype=np.float16)])  # noqa: E731
        unknown = lambda boxes, axis: None if boxes is None else np.concatenate(  # noqa: E731
            [boxes, np.full((*boxes.shape[:axis], len(array), *boxes.shape[axis + 1:]), np.nan, dtype=boxes.dtype)], axis=axis)
        return FeatureSet(
            stack(self.array, array), np.arange(len(self.rows) + len(array)),
            None if self.sizes is None else np.concatenate([self.sizes, sizes]), unknown(self.boxes, 0),
            copies=[stack(c, more) for c, more in zip(self.copies, copies, strict=True)], copy_boxes=unknown(self.copy_boxes, 1),
            views=[stack(v, more) for v, more in zip(self.views, views, strict=True)],
        )

    def view(self, number: int) -> FeatureSet:
        """View 0 is the original; views 1.. are the test-time augmentations."""
        array = self.array if number == 0 else self.views[number - 1]
        return FeatureSet(array, self.rows, self.sizes, self.boxes)

    @property
    def view_count(self) -> int:
        return 1 + len(self.views)

    @property
    def copy_count(self) -> int:
        return 1 + len(self.copies)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def batch(self, positions: np.ndarray, device, copies: np.ndarray | None = None) -> tuple:
        """(features, size one-hot, boxes) of these positions; `copies` picks, per position, the
        original (0) or an augmented copy (k), whose boxes then come from that copy."""
        import torch

        rows = self.rows[positions]
        boxes = None if self.boxes is None else self.boxes[positions].copy()
        if copies is None or not self.copies:
            data = _rows_of(self.array, rows)
        else:
            data = None
            for k in np.unique(copies):
                chosen = np.flatnonzero(copies == k)
                part = _rows_of(self.array if k == 0 else self.copies[k - 1], rows[chosen])
                data = _empty_like_rows(part, len(rows)) if data is None else data
                data[torch.from_numpy(chosen) if isinstance(data, torch.Tensor) else chosen] = part
                if k > 0 and boxes is not None and self.copy_boxes is not None:
                    # The copy's moved geometry: an augmented copy knows only its largest box
                    # (4 columns), so the rest (points, other fish) is unknown for it.
                    moved = self.copy_boxes[k - 1][positions[chosen]]
                    boxes[chosen, :moved.shape[1]] = moved
                    boxes[chosen, moved.shape[1]:] = np.nan
        size = None if self.sizes is None else torch.from_numpy(self.sizes[positions]).to(device)
        box = None if boxes is None else torch.from_numpy(boxes).to(device)
        if isinstance(data, torch.Tensor):
            # bf16 maps go to the head as they are (it autocasts to bf16); others as float32.
            return data.to(device=device, dtype=torch.bfloat16 if data.dtype == torch.bfloat16 else torch.float32), size, box
        return as_input(torch.from_numpy(data), device), size, box


def _rows_of(array, rows: np.ndarray):
    """Rows of a cached array (NumPy, in its dtype) or of `ResidentMaps` (a tensor)."""
    if isinstance(array, ResidentMaps):
        return array.take(rows)
    # Gathered in the cache's dtype and converted by torch (`as_input`): float16 -> float32 is
    # about twice as fast there as in NumPy, and a map comes out channels-last in the same copy.
    out = np.empty((len(rows),) + tuple(array.shape[1:]), dtype=array.dtype)
    _gather(array, rows, out)
    return out


def _empty_like_rows(part, count: int):
    import torch

    if isinstance(part, torch.Tensor):
        return torch.empty((count,) + tuple(part.shape[1:]), dtype=part.dtype).to(memory_format=torch.channels_last)
    return np.empty((count,) + part.shape[1:], dtype=part.dtype)


def concat(parts: list[FeatureSet]) -> FeatureSet:
    """Several test splits as one set (rows copied into memory: such sets are test-sized)."""
    if len(parts) == 1:
        return parts[0]
    array = np.concatenate([np.asarray(p.array[p.rows], dtype=np.float16) for p in parts])
    return FeatureSet(array, np.arange(len(array)), np.concatenate([p.sizes for p in parts]))


def combine_views(probabilities: list[np.ndarray], method: str) -> np.ndarray:
    """Average the views' probabilities: arithmetic mean, or geometric mean renormalised."""
    stacked = np.stack(probabilities).astype(np.float64)
    if method == "geometric":
        return normalise_rows(np.exp(np.log(np.clip(stacked, KAGGLE_EPS, 1.0)).mean(axis=0)))
    return stacked.mean(axis=0)


def predict(model, features: FeatureSet, device, tta: str | None = None, batch_size: int = 256, dtype=None) -> dict[str, np.ndarray]:
    """Softmax probabilities, and boxes/heatmaps when the head makes them (from the original view).

    With `tta` ("mean" or "geometric") and views present, `probs` combines every view and
    `probs_original` keeps the original view's alone, so the gain can be measured. `dtype`: the
    autocast dtype the head trained in (None: float32).
    """
    import torch

    model.eval()

    # The grid locator's cells of every view: the mirrored ones flipped back (`head.box_tta`), and
    # the cell map kept (`cells`), where the crops' further candidate boxes come from.
    mirror_boxes = getattr(model, "box_tta", None) == "mirror" and features.view_count > 1
    cell_outputs = ("box_cells", "box_geometry")

    def run(view: FeatureSet, keep_extras: bool) -> dict[str, np.ndarray]:
        outputs: dict[str, list] = {}
        with torch.inference_mode(), autocast(dtype, device):
            for start in range(0, len(view), batch_size):
                x, size, _ = view.batch(np.arange(start, min(start + batch_size, len(view))), device)
                result = model(x, size=size)
                outputs.setdefault("probs", []).append(torch.softmax(result["logits"].float(), dim=1).cpu().numpy())
                for name in (*(("box", "points", "heatmaps") if keep_extras else ()), *cell_outputs):
                    if name in result:
                        outputs.setdefault(name, []).append(result[name].float().cpu().numpy())
        return {name: np.concatenate(parts) for name, parts in outputs.items()}

    predicted = run(features.view(0), keep_extras=True)
    others = [run(features.view(v), keep_extras=False) for v in range(1, features.view_count)] if (tta or mirror_boxes) else []
    if tta and others:
        # Boxes and heatmaps of a flipped view are in flipped coordinates: probabilities are
        # combined as they are; the grid locator's cells only flipped back (below).
        predicted["probs_original"] = predicted["probs"]
        predicted["probs"] = combine_views([predicted["probs"], *(other["probs"] for other in others)], tta)
    if "box_cells" in predicted:
        from fishcomp.models.heads.dense import GridLocator

        cells, geometry = _mirror_averaged_cells(predicted, others if mirror_boxes else [])
        if mirror_boxes:
            predicted["box_original"] = predicted["box"]
            predicted["box"] = GridLocator.decode(cells, geometry).numpy()
        predicted["cells"] = GridLocator.cell_map(cells, geometry).numpy()
    for name in cell_outputs:
        predicted.pop(name, None)
    return predicted


def _mirror_averaged_cells(original: dict, mirrored: list[dict]):
    """The grid locator's cell scores and geometry averaged over the original view and the
    mirrored ones flipped back: the two looks together."""
    import torch

    from fishcomp.models.heads.dense import GridLocator

    cells, geometry = [torch.from_numpy(original["box_cells"])], [torch.from_numpy(original["box_geometry"])]
    for view in mirrored:
        flipped_cells, flipped_geometry = GridLocator.mirrored_back(torch.from_numpy(view["box_cells"]), torch.from_numpy(view["box_geometry"]))
        cells.append(flipped_cells), geometry.append(flipped_geometry)
    return torch.stack(cells).mean(0), torch.stack(geometry).mean(0)
