"""Stage 1: run the frozen backbone once over every image and cache what the heads read.

Artifact (`<work>/precompute/<backbone>-<H>x<W>-<key>/`):
- `index.csv`: one row per image: image, split, label, path, width, height, ok, box_x/y/w/h
  (the largest annotated box in original pixels, clipped to the image; empty when none),
  head_x/y, tail_x/y (that fish's head and tail points, when point annotations exist);
- `<split>_pooled.npy`: float16 (N, C) global-average-pooled features;
- `<split>_map.npy`: float16 (N, C, h, w) spatial maps, when a head needs them;
- with `augment`: `train_aug_pooled.npy` / `train_aug_map.npy` (copies, N, ...) of augmented train
  images and `train_aug_boxes.npy` (copies, N, 4): their boxes, moved with the image, as fractions;
- with `tta`: `<split>_tta_pooled.npy` / `<split>_tta_map.npy` (views - 1, N, ...), every split;
- `meta.json`: backbone, weights, input size, normalisation, shapes, counts, skipped files, speed.

Features are written batch by batch into memory-mapped .npy files, so memory stays flat however
many images there are.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, PrecomputeConfig, cache_key, dump_yaml, key_payload
from fishcomp.console import progress, stage_line, warn
from fishcomp.data.annotations import Box, clip_box
from fishcomp.data.augment import build_transform
from fishcomp.data.images import UnreadableImage, load_rgb
from fishcomp.distributed import barrier, device_for, ensure_together, gather_to_main, world
from fishcomp.errors import FishcompError
from fishcomp.faults import pause_point
from fishcomp.models.heads import head_uses_map
from fishcomp.stages.context import Context, resolve_device

STAGE = "precompute"
# index.csv's geometry, in original pixels: the largest box, and that fish's head and tail.
BOX_COLUMNS = ["box_x", "box_y", "box_w", "box_h"]
POINT_COLUMNS = ["head_x", "head_y", "tail_x", "tail_y"]


def resolved_precompute(loaded: LoadedConfig) -> PrecomputeConfig:
    """The precompute section with `spatial` switched on when the config's head reads the map."""
    config = loaded.config
    needs_map = config.head is not None and head_uses_map(config.head)
    tta = config.precompute.tta
    update = {
        "spatial": config.precompute.spatial or needs_map,
        # One view is the original alone: no TTA, and the same artifact as without the section.
        "tta": tta if tta is not None and tta.views > 1 else None,
    }
    if config.head is not None and config.head.kind == "finetune":
        # Fine-tuning augments decoded images itself; it reads only the original pooled features.
        update.update(augment=None, tta=None)
    return config.precompute.model_copy(update=update)


def precompute_key(ctx: Context, loaded: LoadedConfig) -> str:
    config = resolved_precompute(loaded)
    dataset = ctx.dataset()
    return cache_key(
        STAGE, key_payload(config), dataset.fingerprint(), ctx.annotations_digest(loaded.config.data)
    )


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
        self._thread_transforms: dict[int, object] = {}

    def _transform(self):
        """This thread's own copy of the transform: seeding a shared one from two decoding threads
        at once would make augmentation depend on thread timing."""
        import copy
        import threading

        ident = threading.get_ident()
        if ident not in self._thread_transforms:
            self._thread_transforms[ident] = copy.deepcopy(self.transform)
        return self._thread_transforms[ident]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int):
        import torch
        from PIL import Image

        index = int(self.positions[item])

        height, width = self.size
        box = np.full(4, np.nan, dtype=np.float32)
        try:
            image, (orig_w, orig_h) = load_rgb(self.root / self.paths[index], target=(width, height))
            array = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.uint8)
            ok = True
        except UnreadableImage:
            array, orig_w, orig_h, ok = np.zeros((height, width, 3), np.uint8), 0, 0, False
        if self.transform is not None and ok:
            from fishcomp.data.augment import apply_transform

            pixels = None
            if self.boxes is not None and not np.isnan(self.boxes[index]).any():
                clipped = clip_box(Box(*self.boxes[index]), orig_w, orig_h)
                if clipped is not None:
                    pixels = np.array([clipped.x * width / orig_w, clipped.y * height / orig_h, clipped.w * width / orig_w, clipped.h * height / orig_h], dtype=np.float32)
            array, moved = apply_transform(self._transform(), array, pixels, seed=self.seed * 1_000_003 + index)
            box = moved / np.array([width, height, width, height], dtype=np.float32)
        # Height x width x channels, as decoded: batched, it is already the channels_last layout the
        # backbone runs fastest on (see `to_model_input`), so no copy is spent reordering it.
        return torch.from_numpy(np.array(array, order="C")), index, orig_w, orig_h, ok, torch.from_numpy(box)


def to_model_input(batch, device, mean, std):
    """(N, H, W, 3) uint8 -> normalised float (N, 3, H, W) in channels_last memory, in place after
    one conversion: the permute is a view and `float()` keeps its (channels_last) strides."""
    return batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().sub_(mean).div_(std)


class _Deferred:
    """A file rank 0 is creating; opened once the ranks have met at the barrier."""

    def __init__(self, path: Path):
        self.path = path


def _open(array):
    return np.load(array.path, mmap_mode="r+") if isinstance(array, _Deferred) else array


def share_of_batches(count: int, batch_size: int) -> np.ndarray:
    """This rank's positions among `count`: whole batches, dealt round-robin, so every batch holds
    the images a single process would put in it (the same numbers come out)."""
    here = world()
    starts = range(here.rank * batch_size, count, here.size * batch_size)
    return np.concatenate([np.arange(s, min(s + batch_size, count)) for s in starts] or [np.empty(0, dtype=np.int64)]).astype(np.int64)


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


def _raw_box(annotations, name: str) -> tuple[float, float, float, float]:
    """The largest annotated box in original pixels (unclipped: sizes are known only once decoded)."""
    box = annotations.largest(name)
    return (np.nan,) * 4 if box is None else (box.x, box.y, box.w, box.h)


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


def ensure_precompute(ctx: Context, loaded: LoadedConfig) -> Artifact:
    config = resolved_precompute(loaded)
    key = precompute_key(ctx, loaded)
    label = f"{config.backbone}-{config.size[0]}x{config.size[1]}"
    # Under torchrun every rank embeds its share of the images; rank 0 publishes.
    artifact = ensure_together(ctx.cache, STAGE, label, key, lambda tmp: _build(ctx, loaded, config, tmp))
    meta = json.loads(artifact.file("meta.json").read_text())
    detail = f"{meta['counts']['total']} images, {meta['images_per_second']:.1f} img/s" if artifact.built else ""
    stage_line(STAGE, artifact.built, artifact.path, detail)
    train_bad = [path for path in meta["unreadable"] if path.startswith("train/")]
    if train_bad:
        warn(f"{len(train_bad)} unreadable train image(s) skipped (listed in {artifact.file('meta.json')})")
    test_bad = [path for path in meta["unreadable"] if not path.startswith("train/")]
    if test_bad:
        listed = ", ".join(test_bad[:5]) + (" ..." if len(test_bad) > 5 else "")
        if ctx.on_bad_test != "prior":
            raise FishcompError(
                f"{len(test_bad)} unreadable test image(s): {listed}; replace them, or pass --on-bad-test prior "
                "to predict the class prior for them"
            )
        warn(f"{len(test_bad)} unreadable test image(s) will be predicted as the class prior: {listed}")
    return artifact


def _build(ctx: Context, loaded: LoadedConfig, config: PrecomputeConfig, tmp: Path) -> dict:
    import torch

    from fishcomp.models.backbones import create_backbone

    dataset = ctx.dataset()
    annotations = ctx.annotations(loaded.config.data)
    images = dataset.images.reset_index(drop=True)
    device = resolve_device(device_for(config.device))
    backbone = create_backbone(config)
    model = backbone.model.to(device).to(memory_format=torch.channels_last)
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255
    height, width = config.size
    use_amp = device.type == "cuda"

    with torch.inference_mode():
        probe = model.forward_features(torch.zeros(1, 3, height, width, device=device))
    map_shape = tuple(probe.shape[1:])
    pooled_dim = backbone.num_features

    splits = images.split.to_numpy()
    position = np.zeros(len(images), dtype=np.int64)
    for split in images.split.unique():
        position[splits == split] = np.arange((splits == split).sum())
    train_rows = np.flatnonzero(splits == "train")
    augment, tta = config.augment, config.tta

    here = world()

    def shared(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
        # Rank 0 creates every output file; the other ranks open them once it has (see the barrier below).
        return reserved_memmap(path, dtype, shape) if here.is_main else _Deferred(path)

    def arrays(name: str, count: int, leading: tuple[int, ...] = ()) -> tuple[np.memmap, np.memmap | None]:
        pooled = shared(tmp / f"{name}_pooled.npy", np.float16, leading + (count, pooled_dim))
        spatial = shared(tmp / f"{name}_map.npy", np.float16, leading + (count,) + map_shape) if config.spatial else None
        return pooled, spatial

    # Pass 0: every image as it is. Then augmented copies of the train images, then TTA views of all.
    originals = {split: arrays(split, int((splits == split).sum())) for split in images.split.unique()}
    passes = [("original", None, 0)]
    if augment:
        augment_transform = build_transform(augment.transforms)
        augmented = arrays("train_aug", len(train_rows), (augment.copies,))
        augmented_boxes = shared(tmp / "train_aug_boxes.npy", np.float32, (augment.copies, len(train_rows), 4))
        passes += [("augment", augment_transform, c) for c in range(augment.copies)]
    if tta:
        tta_transform = build_transform(tta.transforms)
        views = {split: arrays(f"{split}_tta", int((splits == split).sum()), (tta.views - 1,)) for split in images.split.unique()}
        passes += [("tta", tta_transform, v) for v in range(tta.views - 1)]
    raw_boxes = np.array([_raw_box(annotations, name) for name in images.image], dtype=np.float32)
    if here.distributed:
        barrier()
        originals = {split: tuple(_open(a) for a in pair) for split, pair in originals.items()}
        if augment:
            augmented, augmented_boxes = tuple(_open(a) for a in augmented), _open(augmented_boxes)
        if tta:
            views = {split: tuple(_open(a) for a in pair) for split, pair in views.items()}

    sizes = np.zeros((len(images), 2), dtype=np.int64)
    ok = np.zeros(len(images), dtype=bool)
    total = sum(len(train_rows) if kind == "augment" else len(images) for kind, _, _ in passes)
    started = time.time()
    with progress(f"precompute {config.size[0]}x{config.size[1]}", total) as advance, torch.inference_mode():
        for kind, transform, number in passes:
            rows = train_rows if kind == "augment" else np.arange(len(images))
            seed = (augment.seed if kind == "augment" else tta.seed if kind == "tta" else 0) * 1000 + number
            loader = image_batches(
                DecodedImages(
                    dataset.root, images.path.to_numpy()[rows].tolist(), config.size, transform, seed,
                    raw_boxes[rows] if kind == "augment" else None, positions=share_of_batches(len(rows), config.batch_size),
                ),
                config.batch_size, config.workers, device,
            )
            for batch, local, orig_w, orig_h, good, boxes in loader:
                batch = to_model_input(batch, device, mean, std)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    feature_map = model.forward_features(batch)
                    pooled = model.forward_head(feature_map, pre_logits=True)
                pooled = pooled.float().cpu().numpy()
                feature_map = feature_map.float().cpu().numpy() if config.spatial else None
                index = rows[local.numpy()]
                if kind == "original":
                    sizes[index] = np.stack([orig_w.numpy(), orig_h.numpy()], axis=1)
                    ok[index] = good.numpy()
                if kind == "augment":
                    # Train rows are the train split's rows in order, so `local` is the train position.
                    where = local.numpy()
                    augmented[0][number, where] = pooled
                    if feature_map is not None:
                        augmented[1][number, where] = feature_map
                    augmented_boxes[number, where] = boxes.numpy()
                else:
                    for split in np.unique(splits[index]):
                        mine = splits[index] == split
                        pooled_out, map_out = originals[split] if kind == "original" else views[split]
                        target = (position[index[mine]],) if kind == "original" else (number, position[index[mine]])
                        pooled_out[target] = pooled[mine]
                        if map_out is not None:
                            map_out[target] = feature_map[mine]
                advance(len(index))
                pause_point("precompute.batch")
    seconds = time.time() - started
    for item in [*originals.values(), *(views.values() if tta else ()), *((augmented, (augmented_boxes,)) if augment else ())]:
        for array in item:
            if array is not None:
                array.flush()
    del originals, passes
    if augment:
        del augmented, augmented_boxes
    if tta:
        del views
    if here.distributed:
        # Each rank saw sizes and readability of its own share of the images; rank 0 gets them all.
        shares = gather_to_main((sizes, ok, share_of_batches(len(images), config.batch_size)))
        if not here.is_main:
            return None
        for other_sizes, other_ok, rows in shares[1:]:
            sizes[rows], ok[rows] = other_sizes[rows], other_ok[rows]

    index = images.assign(width=sizes[:, 0], height=sizes[:, 1], ok=ok)
    bad = index[~index.ok]
    # Unreadable test images are recorded, not fatal here: whether they stop the run is the
    # caller's choice (--on-bad-test), checked on every use of the artifact, cached or not.
    for path in bad[bad.split == "train"].path:
        warn(f"unreadable train image skipped: {path}")

    boxes = np.full((len(index), 4), np.nan)
    box_counts = {"train images with a box": 0, "boxes clipped": 0, "boxes outside the image dropped": 0}
    names = set()
    for row, (name, split, w, h) in enumerate(zip(index.image, index.split, index.width, index.height)):
        if split != "train":
            continue
        names.add(name)
        box = annotations.largest(name)
        if box is None or w == 0:
            continue
        clipped = clip_box(box, w, h)
        if clipped is None:
            box_counts["boxes outside the image dropped"] += 1
            continue
        box_counts["boxes clipped"] += int(clipped != box)
        box_counts["train images with a box"] += 1
        boxes[row] = (clipped.x, clipped.y, clipped.w, clipped.h)
    orphans = sorted(set(annotations.boxes) - names)
    if orphans:
        warn(f"{len(orphans)} annotation entries name no train image (e.g. {orphans[0]}); ignored")
    index[BOX_COLUMNS] = boxes
    # Head and tail of the fish (train images with point annotations), original pixels.
    ends = [annotations.head_tail(name) if split == "train" else None for name, split in zip(index.image, index.split)]
    index[POINT_COLUMNS] = np.array([end if end is not None else (np.nan,) * 4 for end in ends], dtype=float).reshape(-1, 4)
    index.to_csv(tmp / "index.csv", index=False)

    meta = {
        "backbone": config.backbone,
        "weights": config.weights,
        "size": list(config.size),
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "pooled_dim": pooled_dim,
        "map_shape": list(map_shape) if config.spatial else None,
        "augment_copies": augment.copies if augment else 0,
        "tta_views": tta.views if tta else 1,
        "classes": dataset.classes,
        "counts": {"total": len(index), **index.split.value_counts().to_dict()},
        "unreadable": bad.path.tolist(),
        "annotations": {**dict(annotations.counts), **box_counts, "orphan entries": len(orphans)},
        "device": str(device),
        "seconds": round(seconds, 2),
        "images_per_second": round(total / max(seconds, 1e-9), 2),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    (tmp / "config.yaml").write_text(dump_yaml(key_payload(config)))
    return {"images": len(index), "unreadable": len(bad)}


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
