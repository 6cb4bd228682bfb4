"""The feature-artifact format that precompute and crops write and every head reads, and the one
backbone pass both of them run.

An artifact holds `index.csv` (one row per image: image, split, label, path, width, height, ok,
the largest box and that fish's head and tail in original pixels), `<split>_pooled.npy` and
`<split>_map.npy` (float16), `train_aug_*.npy` (augmented copies), `<split>_tta_*.npy` (test-time
views) and `meta.json`.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.cache import MANIFEST, Artifact, resumed_seconds
from fishcomp.config import PrecomputeConfig
from fishcomp.context import autocast, autocast_dtype, precision_name, resolve_device
from fishcomp.data.annotations import Annotations, Box, clip_box
from fishcomp.data.images import UnreadableImage, load_rgb
from fishcomp.distributed import device_for, world
from fishcomp.errors import FishcompError

# index.csv's geometry, in original pixels: the largest box, and that fish's head and tail.
BOX_COLUMNS = ["box_x", "box_y", "box_w", "box_h"]


POINT_COLUMNS = ["head_x", "head_y", "tail_x", "tail_y"]


class DecodedImages:
    """A map-style dataset of decoded, resized uint8 images (normalised later, on the device).

    With a `transform` (an albumentations Compose), each image is augmented after resizing with a
    seed made from (`seed`, its index), so every copy is reproducible whatever the worker layout;
    `boxes` (original pixels, NaN for none) then come back transformed, as fractions of the image.
    """

    def __init__(
        self, root: Path, paths: list[str], size: tuple[int, int], transform=None, seed: int = 0,
        boxes: np.ndarray | None = None, positions: np.ndarray | None = None,
    ):
        self.root, self.paths, self.size = root, paths, size
        self.transform, self.seed, self.boxes = transform, seed, boxes
        # This process's share of the paths (all by default); an item's seed and returned index
        # are its position in `paths`, so a share gives exactly what the whole run gives there.
        self.positions = np.arange(len(paths)) if positions is None else np.asarray(positions)
        self._thread_transforms: dict[tuple[int, int], object] = {}

    def _own(self, transform):
        """This thread's own copy of `transform`: seeding a shared one from two decoding threads
        at once would make augmentation depend on thread timing."""
        import copy
        import threading

        key = (threading.get_ident(), id(transform))
        if key not in self._thread_transforms:
            self._thread_transforms[key] = copy.deepcopy(transform)
        return self._thread_transforms[key]

    def __len__(self) -> int:
        return len(self.positions)

    def _decoded(self, index: int) -> tuple[np.ndarray, int, int, bool]:
        """The image at `paths[index]` resized to `size` (black and not ok when unreadable), with
        its original width and height."""
        from PIL import Image

        height, width = self.size
        try:
            image, (orig_w, orig_h) = load_rgb(self.root / self.paths[index], target=(width, height))
            return np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.uint8), orig_w, orig_h, True
        except UnreadableImage:
            return np.zeros((height, width, 3), np.uint8), 0, 0, False

    def _transformed(self, transform, seed: int, number: int, array: np.ndarray, raw_box: np.ndarray | None, orig_w: int, orig_h: int):
        """`array` through this thread's copy of `transform`, seeded by (`seed`, the image's
        `number`), and `raw_box` (original pixels) moved with it, as fractions of the image (NaN for none)."""
        from fishcomp.data.augment import apply_transform

        height, width = self.size
        pixels = None
        if raw_box is not None and not np.isnan(raw_box).any():
            clipped = clip_box(Box(*raw_box), orig_w, orig_h)
            if clipped is not None:
                pixels = np.array([clipped.x * width / orig_w, clipped.y * height / orig_h, clipped.w * width / orig_w, clipped.h * height / orig_h], dtype=np.float32)
        array, moved = apply_transform(self._own(transform), array, pixels, seed=seed * 1_000_003 + number)
        return array, moved / np.array([width, height, width, height], dtype=np.float32)

    def __getitem__(self, item: int):
        import torch

        index = int(self.positions[item])
        array, orig_w, orig_h, ok = self._decoded(index)
        box = np.full(4, np.nan, dtype=np.float32)
        if self.transform is not None and ok:
            raw_box = self.boxes[index] if self.boxes is not None else None
            array, box = self._transformed(self.transform, self.seed, index, array, raw_box, orig_w, orig_h)
        # Height x width x channels, as decoded: batched, it is already the channels_last layout the
        # backbone runs fastest on (see `to_model_input`), so no copy is spent reordering it.
        return torch.from_numpy(np.array(array, order="C")), index, orig_w, orig_h, ok, torch.from_numpy(box)


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class View:
    """One way a pass shows the images to the backbone: as they are (`transform` None), or
    through `transform` seeded per image with (`seed`, the image's `numbering`), for the images
    `wanted` marks (all when None). `moves_boxes`: the view returns each image's box moved with it."""

    transform: object = None
    seed: int = 0
    wanted: np.ndarray | None = None
    numbering: np.ndarray | None = None
    moves_boxes: bool = False


class DecodedViews(DecodedImages):
    """Every view of an image from one decode: item i is (views, index, width, height, ok, boxes,
    wanted), `views` (V, H, W, 3) uint8 with zeros where a view does not want the image.

    Each view's pixels are what `DecodedImages` with that view's transform, seed and numbering
    gives (same resize, same per-image seed), so splitting the passes by image instead of by view
    changes no feature; it only decodes each photo once instead of once per view."""

    def __init__(self, root: Path, paths: list[str], size: tuple[int, int], views: list[View], boxes: np.ndarray | None = None, positions: np.ndarray | None = None):
        super().__init__(root, paths, size, boxes=boxes, positions=positions)
        self.views = views

    def __getitem__(self, item: int):
        import torch

        index = int(self.positions[item])
        array, orig_w, orig_h, ok = self._decoded(index)
        height, width = self.size
        pixels = np.zeros((len(self.views), height, width, 3), np.uint8)
        boxes = np.full((len(self.views), 4), np.nan, dtype=np.float32)
        wanted = np.array([view.wanted is None or bool(view.wanted[index]) for view in self.views])
        for number, view in enumerate(self.views):
            if not wanted[number]:
                continue
            if view.transform is None or not ok:
                pixels[number] = array
                continue
            numbered = int(view.numbering[index]) if view.numbering is not None else index
            raw_box = self.boxes[index] if view.moves_boxes and self.boxes is not None else None
            pixels[number], moved = self._transformed(view.transform, view.seed, numbered, array, raw_box, orig_w, orig_h)
            if view.moves_boxes:
                boxes[number] = moved
        return torch.from_numpy(pixels), index, orig_w, orig_h, ok, torch.from_numpy(boxes), torch.from_numpy(wanted)


def to_model_input(batch, device, mean, std):
    """(N, H, W, 3) uint8 -> normalised float (N, 3, H, W) in channels_last memory, in place after
    one conversion: the permute is a view and `float()` keeps its (channels_last) strides."""
    return batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().sub_(mean).div_(std)


def share_of_batches(count: int, batch_size: int) -> np.ndarray:
    """This rank's positions among `count`: whole batches, dealt round-robin, so every batch holds
    the images a single process would put in it (the same numbers come out)."""
    here = world()
    starts = range(here.rank * batch_size, count, here.size * batch_size)
    return np.concatenate([np.arange(s, min(s + batch_size, count)) for s in starts] or [np.empty(0, dtype=np.int64)]).astype(np.int64)


def transform_seed(seed: int, number: int) -> int:
    """The seed of augmented copy or test-time view `number` (from 0) of a transform list seeded
    `seed` (each image's draw then adds its index): `precompute` and `predict` draw the same views."""
    return seed * 1000 + number


def reserved_memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A writable .npy memory map whose disk blocks are allocated up front: a full disk fails here
    with ENOSPC (a clear error) instead of as a SIGBUS crash at some later page write."""
    from numpy.lib.format import open_memmap

    array = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    allocate = getattr(os, "posix_fallocate", None)  # absent on macOS: there the map stays sparse
    if allocate is not None:
        with open(path, "r+b") as handle:
            try:
                allocate(handle.fileno(), 0, os.path.getsize(path))
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # A file system that cannot preallocate (EOPNOTSUPP, EINVAL) is not an error.
    return array


class PassProgress:
    """An unfinished backbone pass (precompute's, the crops'): its arrays and how many of its
    images they hold, with what the pass notes per image, in `.resume-<label>-<key>/` beside its
    temporary folder (which an interrupt removes), so that the same command goes on where it
    stopped: a 360x640 pass over the competition's 16,930 photos takes the better part of an hour
    on a CPU, its crops longer. Same key, same images and settings, and a photo's views are seeded
    by its row, not by when it is embedded: the rows kept are the rows a fresh pass makes. One
    process only: under torchrun the ranks' shares interleave, and a pass starts over.

    `state`: the per-image arrays the pass fills besides its outputs (sizes, readability, the
    rectangles cut), filled in place from the stopped pass when it is resumed. Used as a context:
    a pass that ends early (interrupt, error) keeps what it reported done (`advanced`)."""

    SAVE_EVERY_S = 60.0  # a hard kill (out of memory, kill -9) loses at most about this much of the pass

    def __init__(self, tmp: Path, state: dict[str, np.ndarray], earlier: EarlierPass | None = None):
        """`earlier`: a finished pass over the same train images with the same settings, whose
        leading splits this pass takes instead of embedding them again (a stopped run of this
        pass, which holds them already, comes first)."""
        self.folder = tmp.parent / tmp.name.replace(".tmp-", ".resume-", 1)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state, self.done, self.reached, self._shapes = state, 0, 0, {}
        # Seconds the stopped runs spent on the pass: the artifact's build time counts them.
        self.seconds_before = 0.0
        self._arrays: dict[str, np.memmap] = {}
        self._started = self._saved_at = time.time()
        try:
            with np.load(self.folder / "progress.npz") as kept:
                if all(kept[name].shape == array.shape for name, array in state.items()):
                    for name, array in state.items():
                        array[...] = kept[name]
                    self.done, self._shapes = int(kept["done"]), json.loads(str(kept["arrays"]))
                    self.seconds_before = float(kept["seconds"])
        except (OSError, ValueError, KeyError):  # none, or cut short by a hard kill: start over
            pass
        self.earlier = earlier if not self.done and earlier is not None and earlier.rows else None
        if self.earlier is not None:
            self.earlier.fill_state(state)
            self.done = self.earlier.rows
        self.reached = self.done

    def __enter__(self) -> PassProgress:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self._stopped()

    def announce(self, what: str, count: int) -> None:
        """Once the arrays are taken up: say how much of the pass the stopped run left done."""
        from fishcomp.console import info

        if self.earlier is not None:
            info(f"{what} reusing {self.done} of {count} images ({', '.join(self.earlier.splits)}) from {self.earlier.artifact.path.name}: "
                 "the same settings and train images; only the others are embedded")
        elif self.done:
            info(f"{what} resuming: {self.done} of {count} images kept from the stopped run")

    def facts(self) -> dict:
        """The artifact's manifest facts: the stopped runs' seconds (see `cache.resumed_seconds`),
        and the earlier pass it took splits from."""
        reused = {"reused": {"from": self.earlier.artifact.path.name, "splits": self.earlier.splits, "images": self.earlier.rows}} if self.earlier else {}
        return {**resumed_seconds(self.seconds_before), **reused}

    def reused_meta(self) -> dict:
        """The artifact's meta.json entries for the images taken from an earlier pass (what its
        one-line description says); empty when none."""
        return {"reused_images": self.earlier.rows, "reused_from": self.earlier.artifact.path.name} if self.earlier else {}

    def array(self, name: str, dtype, shape: tuple[int, ...]) -> np.memmap:
        """The output array as the stopped pass left it, or a new one (then nothing is kept)."""
        path = self.folder / name
        if self.earlier is not None:
            array = self._arrays[name] = reserved_memmap(path, dtype, shape)
            if not self.earlier.fill(name, array):  # the earlier pass lacks it: embed every image
                self.earlier, self.done, self.reached = None, 0, 0
            return array
        if self.done and self._shapes.get(name) == [np.dtype(dtype).str, list(shape)]:
            try:
                array = np.load(path, mmap_mode="r+")
                if array.shape == shape and array.dtype == np.dtype(dtype):
                    self._arrays[name] = array
                    return array
            except (OSError, ValueError):
                pass
        self.done = self.reached = 0
        self.seconds_before = 0.0
        self._arrays[name] = reserved_memmap(path, dtype, shape)
        return self._arrays[name]

    def _save(self, done: int) -> None:
        import io

        from fishcomp.cache import write_atomic

        for array in self._arrays.values():
            array.flush()  # the rows before the count that says they are there
        buffer = io.BytesIO()
        shapes = {**self._shapes, **{name: [a.dtype.str, list(a.shape)] for name, a in self._arrays.items()}}
        np.savez(buffer, done=done, arrays=json.dumps(shapes), seconds=self.seconds_before + time.time() - self._started, **self.state)
        write_atomic(self.folder / "progress.npz", buffer.getvalue())
        self._saved_at = time.time()

    def advanced(self, done: int) -> None:
        """The first `done` images in the pass's order are embedded."""
        self.reached = done
        if time.time() - self._saved_at >= self.SAVE_EVERY_S:
            self._save(done)

    def _stopped(self) -> None:
        """Keep what is done, or nothing when nothing is."""
        import shutil

        if self.reached == 0:
            self._arrays.clear()
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        try:
            self._save(self.reached)
        except OSError:  # a full disk, say: the error that stopped the pass is the one to report
            pass

    def publish(self, tmp: Path) -> None:
        """The finished arrays into the artifact's temporary folder; nothing left to resume."""
        import shutil

        for array in self._arrays.values():
            array.flush()
        self._arrays.clear()
        for name in [p.name for p in self.folder.glob("*.npy")]:
            os.replace(self.folder / name, tmp / name)
        shutil.rmtree(self.folder, ignore_errors=True)


class EarlierPass:
    """The splits of a finished pass (`earlier`) that hold exactly this pass's images: the leading
    splits in row order (train, then stage 1, then stage 2) whose images are the same files
    (`Dataset.split_fingerprints`, recorded in the pass's manifest as `split_images`), among
    `allowed` (all by default). Its arrays of those splits are this pass's: the same settings
    (the same fit key) and the same rows, so the same per-image seeds for augmented copies and
    test-time views. `state_from(earlier, rows, state)` fills the per-image notes the pass keeps
    besides its arrays (sizes, readability, rectangles cut) for those rows from the earlier
    artifact's files."""

    def __init__(self, earlier: Artifact, images: pd.DataFrame, fingerprints: dict[str, str], state_from, allowed: tuple[str, ...] | None = None):
        self.artifact, self._state_from = earlier, state_from
        try:
            recorded = json.loads(earlier.file(MANIFEST).read_text()).get("split_images") or {}
        except (OSError, ValueError):
            recorded = {}
        self.splits: list[str] = []
        for split in dict.fromkeys(images.split):
            if recorded.get(split) != fingerprints.get(split) or (allowed is not None and split not in allowed):
                break
            self.splits.append(split)
        self.rows = int(images.split.isin(self.splits).sum())
        if self.splits:
            earlier_index = load_index(earlier)
            if list(earlier_index.image[earlier_index.split.isin(self.splits)]) != list(images.image[: self.rows]):
                self.splits, self.rows = [], 0  # not the rows it claims: take nothing

    def fill_state(self, state: dict[str, np.ndarray]) -> None:
        self._state_from(self.artifact, self.rows, state)

    def fill(self, name: str, array: np.ndarray) -> bool:
        """`array` (named as in an artifact: `<split>_...npy`) with the earlier pass's values where
        its split is one this pass takes; False where the earlier pass has no such array."""
        split = max((s for s in self.splits if name.startswith(s + "_")), key=len, default=None)
        if split is None:
            return True  # a split this pass embeds
        path = self.artifact.file(name)
        if not path.is_file():
            return False
        source = np.load(path, mmap_mode="r")
        if source.shape != array.shape or source.dtype != array.dtype:
            return False
        # Both are C-ordered files of one shape: copied as flat runs of about 64 MiB, so memory
        # stays flat whatever the number of images (a split's maps run to gigabytes).
        flat_in, flat_out, step = source.reshape(-1), array.reshape(-1), max(1, (64 << 20) // source.itemsize)
        for start in range(0, flat_in.size, step):
            flat_out[start : start + step] = flat_in[start : start + step]
        return True


def loader_workers(setting: int | str) -> int:
    if setting != "auto":
        return int(setting)
    cores = os.cpu_count() or 1
    # Decoding hides behind the backbone with about one loader process per two cores.
    return max(1, min(8, cores // 2))


def image_batches(images: DecodedImages, batch_size: int, workers: int | str, device):
    """Collated batches of `images`, in order, decoded the fastest way for where the model runs.

    On a GPU (or with an explicit number of `workers`): DataLoader worker processes decode while
    the model runs. On the CPU with `workers: auto`, the backbone already keeps every core busy,
    and a concurrent decoder does not fill idle time: it pre-empts one of the backbone's OpenMP
    threads, and its partner then stalls at their next barrier, so each millisecond of decoding
    costs two. There, decoding alternates with the model instead: each batch is decoded by one
    thread per core (PIL and NumPy release the GIL), then embedded with every core.
    """
    import torch
    from torch.utils.data import DataLoader, default_collate

    if workers != "auto" or device.type != "cpu":
        yield from DataLoader(
            images, batch_size=batch_size, num_workers=loader_workers(workers), pin_memory=device.type == "cuda"
        )
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        for start in range(0, len(images), batch_size):
            yield default_collate(list(pool.map(images.__getitem__, range(start, min(start + batch_size, len(images))))))


def load_index(artifact: Artifact) -> pd.DataFrame:
    return pd.read_csv(artifact.file("index.csv"), keep_default_na=True)


def load_features(artifact: Artifact, split: str, kind: str) -> np.ndarray:
    """A read-only memory map of one split's `pooled` or `map` features."""
    path = artifact.file(f"{split}_{kind}.npy")
    if not path.is_file():
        raise FishcompError(f"{artifact.path} has no {kind} features for {split}")
    return np.load(path, mmap_mode="r")


def load_augmented(artifact: Artifact, kind: str) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The train split's augmented copies (memory maps) and their moved boxes; ([], None) without
    augment, boxes None for copies that carry none (crops)."""
    path = artifact.file(f"train_aug_{kind}.npy")
    if not path.is_file():
        return [], None
    copies = np.load(path, mmap_mode="r")
    boxes = artifact.file("train_aug_boxes.npy")
    return [copies[c] for c in range(len(copies))], np.load(boxes) if boxes.is_file() else None


def load_views(artifact: Artifact, split: str, kind: str) -> list[np.ndarray]:
    """A split's test-time views after the original (memory maps); [] without TTA."""
    path = artifact.file(f"{split}_tta_{kind}.npy")
    if not path.is_file():
        return []
    views = np.load(path, mmap_mode="r")
    return [views[v] for v in range(len(views))]


# What multi-output heads predict besides classes, and the files they go to (fractions of the image).
GEOMETRY = {
    "box": ("boxes", BOX_COLUMNS),
    "points": ("points", POINT_COLUMNS),
}


def normalised_boxes(index: pd.DataFrame, columns: list[str] = BOX_COLUMNS) -> np.ndarray:
    """Boxes as (x, y, w, h) fractions of the image (or other x, y, x, y columns): the same numbers
    in any resized frame. NaN where the index has no such columns (features made before them)."""
    if not set(columns) <= set(index.columns):
        return np.full((len(index), 4), np.nan, dtype=np.float32)
    boxes = index[columns].to_numpy(dtype=np.float32)
    scale = index[["width", "height", "width", "height"]].to_numpy(dtype=np.float32)
    return boxes / np.where(scale > 0, scale, np.nan)


def other_fish_boxes(index: pd.DataFrame, annotations: Annotations) -> np.ndarray:
    """(N, most others, 4): each photo's annotated boxes but the largest (which the index holds),
    largest first, clipped to the image, as fractions of it; NaN-padded."""
    others = []
    for name, width, height in zip(index.image, index.width, index.height):
        boxes = sorted(annotations.boxes.get(name) or [], key=lambda box: box.area, reverse=True)[1:]
        clipped = [clip_box(box, width, height) for box in boxes] if width > 0 and height > 0 else []
        others.append([(b.x / width, b.y / height, b.w / width, b.h / height) for b in clipped if b is not None])
    most = max((len(o) for o in others), default=0)
    array = np.full((len(index), most, 4), np.nan, dtype=np.float32)
    for row, boxes in enumerate(others):
        if boxes:
            array[row, :len(boxes)] = boxes
    return array


def every_fish_boxes(index: pd.DataFrame, annotations: Annotations) -> np.ndarray:
    """(N, most fish, 4): each photo's largest box (the index's) then its other annotated fish,
    as fractions of the image; NaN-padded."""
    return np.concatenate([normalised_boxes(index)[:, None], other_fish_boxes(index, annotations)], axis=1)


# Pixels per backbone call on a CPU: on 2 cores (lite0 and lite2) calls of 4 images at 224x224,
# 3-4 at 260x260 and 1 at 360x640 were about the fastest, 1.3-1.8x faster than 32 a call (the first
# layers' activations of a large call spill out of the caches); docs/results.md.
CPU_CALL_PIXELS = 200_000


class Embedder:
    """One frozen backbone pass, the same for every stage that embeds images (precompute, crops;
    fine-tuning unfreezes its model and trains it under a head):
    the model on its device in channels_last, the weights' own normalisation, and autocast (fp16
    on a GPU, bf16 on a CPU that has it; see PrecomputeConfig.precision), a frozen model's batch
    norms folded into its convolutions where `folds_norms` says so. `embed` takes (N, H, W, 3) uint8 batches as `image_batches` yields them."""

    def __init__(self, precompute, device, frozen: bool = True):
        import torch

        from fishcomp.models.backbones import create_backbone
        from fishcomp.models.folding import folded_copy_if_equal

        self.backbone = create_backbone(precompute)
        self.device = device
        self.autocast_dtype = autocast_dtype(precompute.precision, device)
        model = self.backbone.model
        if frozen and folds_norms(self.autocast_dtype):
            model, _ = folded_copy_if_equal(model)
        self.model = model.to(device).to(memory_format=torch.channels_last)
        self.mean = torch.tensor(self.backbone.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(self.backbone.std, device=device).view(1, 3, 1, 1) * 255
        self.cpu_chunk = precompute.cpu_chunk

    def images_per_call(self, height: int, width: int, images: int) -> int:
        """How many of `images` go through the model at once: all of them on a GPU; on a CPU
        `cpu_chunk`, whose auto keeps a call near CPU_CALL_PIXELS."""
        if self.device.type != "cpu":
            return max(1, images)
        if self.cpu_chunk == "auto":
            return max(1, round(CPU_CALL_PIXELS / (height * width)))
        return self.cpu_chunk

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def map_shape(self, size: tuple[int, int]) -> tuple[int, ...]:
        import torch

        with torch.inference_mode():
            return tuple(self.model.forward_features(torch.zeros(1, 3, *size, device=self.device)).shape[1:])

    def inputs(self, batch):
        """(N, H, W, 3) uint8 -> the model's normalised input on its device."""
        return to_model_input(batch, self.device, self.mean, self.std)

    def embed(self, batch, spatial: bool = True, pool: str | None = None):
        """(pooled (N, C) float32 array, feature map (N, C, h, w) float32 array or None); pooled by
        the backbone's own head, or by `pool` (`fishcomp.models.pooling`)."""
        from fishcomp.models.pooling import pool_map

        pooled_parts, map_parts = [], []
        for part in batch.split(self.images_per_call(batch.shape[1], batch.shape[2], len(batch))):
            inputs = self.inputs(part)
            with autocast(self.autocast_dtype, self.device):
                feature_map = self.model.forward_features(inputs)
                pooled = self.model.forward_head(feature_map, pre_logits=True) if pool is None else pool_map(feature_map, pool)
            pooled_parts.append(pooled.float().cpu().numpy())
            if spatial:
                map_parts.append(feature_map.float().cpu().numpy())
        return np.concatenate(pooled_parts), np.concatenate(map_parts) if spatial else None


def resolved_precompute(section: PrecomputeConfig, spatial: bool = False, originals_only: bool = False) -> PrecomputeConfig:
    """The precompute section as built for a consumer: `spatial` on when it reads the map,
    augmented copies and test-time views off when it reads only the originals (fine-tuning)."""
    tta = section.tta
    update = {
        "spatial": section.spatial or spatial,
        # One view is the original alone: no TTA, and the same artifact as without the section.
        "tta": tta if tta is not None and tta.views > 1 else None,
    }
    if originals_only:
        update.update(augment=None, tta=None)
    return section.model_copy(update=update)


def tta_combine(loaded) -> str | None:
    """How a run combines its test-time views (None without TTA); training reads it, so it is in
    the train key, not precompute's."""
    crops = loaded.config.crops
    if crops is not None:  # crops have their own views (precompute.tta is for whole images)
        return "mean" if crops.tta else None
    tta = loaded.config.precompute.tta
    return tta.combine if tta is not None and tta.views > 1 else None


def folds_norms(dtype) -> bool:
    """Whether a frozen pass in `dtype` (None: float32) runs with its batch norms folded into the
    convolutions (fishcomp/models/folding.py). In float32: the same features to float32 rounding,
    faster. In bfloat16, whose range is float32's: a different rounding of the same features
    (each folded weight rounded once, instead of the weight and then the norm's output), as close to
    float32's as the unfolded pass and faster (docs/results.md, "Norms folded in bf16 passes").
    Not in float16, whose range a folded weight (scaled by 1/sqrt of a tiny running variance)
    could leave; on a GPU, where float16 runs, a norm costs little beside the convolutions."""
    import torch

    return dtype is None or dtype == torch.bfloat16


def backbone_precision(precompute: PrecomputeConfig) -> str:
    """The precision a backbone pass runs in on this machine (fp32, fp16 or bf16), for cache keys;
    a bf16 pass with its norms folded rounds differently from one without, so it is keyed apart
    (a float32 one computes the same features to float32 rounding either way)."""
    dtype = autocast_dtype(precompute.precision, resolve_device(device_for(precompute.device)))
    name = precision_name(dtype)
    return f"{name}, norms folded" if dtype is not None and folds_norms(dtype) else name
