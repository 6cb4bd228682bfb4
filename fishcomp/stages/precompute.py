"""Stage 1: run the frozen backbone once over every image and cache what the heads read.

Artifact (`<work>/precompute/<backbone>-<H>x<W>-<key>/`):
- `index.csv`: one row per image: image, split, label, path, width, height, ok, box_x/y/w/h
  (the largest annotated box in original pixels, clipped to the image; empty when none);
- `<split>_pooled.npy`: float16 (N, C) global-average-pooled features;
- `<split>_map.npy`: float16 (N, C, h, w) spatial maps, when a head needs them;
- `meta.json`: backbone, weights, input size, normalisation, shapes, counts, skipped files, speed.

Features are written batch by batch into memory-mapped .npy files, so memory stays flat however
many images there are.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, PrecomputeConfig, cache_key, dump_yaml, key_payload
from fishcomp.console import progress, stage_line, warn
from fishcomp.data.annotations import clip_box
from fishcomp.data.images import UnreadableImage, load_rgb
from fishcomp.errors import FishcompError
from fishcomp.models.heads import head_uses_map
from fishcomp.stages.context import Context, resolve_device

STAGE = "precompute"


def resolved_precompute(loaded: LoadedConfig) -> PrecomputeConfig:
    """The precompute section with `spatial` switched on when the config's head reads the map."""
    config = loaded.config
    needs_map = config.head is not None and head_uses_map(config.head)
    return config.precompute.model_copy(update={"spatial": config.precompute.spatial or needs_map})


def precompute_key(ctx: Context, loaded: LoadedConfig) -> str:
    config = resolved_precompute(loaded)
    dataset = ctx.dataset()
    return cache_key(
        STAGE, key_payload(config), dataset.fingerprint(), ctx.annotations_digest(loaded.config.data)
    )


class _Images:
    """A map-style dataset of decoded, resized uint8 images (normalised later, on the device)."""

    def __init__(self, root: Path, paths: list[str], size: tuple[int, int]):
        self.root, self.paths, self.size = root, paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image

        height, width = self.size
        try:
            image, (orig_w, orig_h) = load_rgb(self.root / self.paths[index], target=(width, height))
            array = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.uint8)
            ok = True
        except UnreadableImage:
            array, orig_w, orig_h, ok = np.zeros((height, width, 3), np.uint8), 0, 0, False
        return torch.from_numpy(array.copy()).permute(2, 0, 1), index, orig_w, orig_h, ok


def _workers(setting: int | str) -> int:
    if setting != "auto":
        return int(setting)
    cores = os.cpu_count() or 1
    # Decoding hides behind the backbone with about one loader process per two cores.
    return max(1, min(8, cores // 2))


def ensure_precompute(ctx: Context, loaded: LoadedConfig) -> Artifact:
    config = resolved_precompute(loaded)
    key = precompute_key(ctx, loaded)
    label = f"{config.backbone}-{config.size[0]}x{config.size[1]}"
    artifact = ctx.cache.ensure(STAGE, label, key, lambda tmp: _build(ctx, loaded, config, tmp))
    meta = json.loads(artifact.file("meta.json").read_text())
    detail = f"{meta['counts']['total']} images, {meta['images_per_second']:.1f} img/s" if artifact.built else ""
    stage_line(STAGE, artifact.built, artifact.path, detail)
    return artifact


def _build(ctx: Context, loaded: LoadedConfig, config: PrecomputeConfig, tmp: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from fishcomp.models.backbones import create_backbone

    dataset = ctx.dataset()
    annotations = ctx.annotations(loaded.config.data)
    images = dataset.images.reset_index(drop=True)
    device = resolve_device(config.device)
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

    from numpy.lib.format import open_memmap

    outputs: dict[str, tuple[np.memmap, np.memmap | None, np.ndarray]] = {}
    for split in images.split.unique():
        rows = np.flatnonzero(images.split.to_numpy() == split)
        pooled = open_memmap(tmp / f"{split}_pooled.npy", mode="w+", dtype=np.float16, shape=(len(rows), pooled_dim))
        spatial = (
            open_memmap(tmp / f"{split}_map.npy", mode="w+", dtype=np.float16, shape=(len(rows),) + map_shape)
            if config.spatial
            else None
        )
        position = np.full(len(images), -1)
        position[rows] = np.arange(len(rows))
        outputs[split] = (pooled, spatial, position)

    loader = DataLoader(
        _Images(dataset.root, images.path.tolist(), config.size),
        batch_size=config.batch_size,
        num_workers=_workers(config.workers),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    sizes = np.zeros((len(images), 2), dtype=np.int64)
    ok = np.zeros(len(images), dtype=bool)
    started = time.time()
    with progress(f"precompute {config.size[0]}x{config.size[1]}", len(images)) as advance, torch.inference_mode():
        for batch, index, orig_w, orig_h, good in loader:
            batch = batch.to(device, non_blocking=True).float().sub_(mean).div_(std)
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                feature_map = model.forward_features(batch)
                pooled = model.forward_head(feature_map, pre_logits=True)
            index = index.numpy()
            sizes[index] = np.stack([orig_w.numpy(), orig_h.numpy()], axis=1)
            ok[index] = good.numpy()
            splits = images.split.to_numpy()[index]
            for split in np.unique(splits):
                pooled_out, map_out, position = outputs[split]
                mine = splits == split
                where = position[index[mine]]
                pooled_out[where] = pooled[torch.from_numpy(mine).to(device)].float().cpu().numpy()
                if map_out is not None:
                    map_out[where] = feature_map[torch.from_numpy(mine).to(device)].float().cpu().numpy()
            advance(len(index))
    seconds = time.time() - started
    for pooled_out, map_out, _ in outputs.values():
        pooled_out.flush()
        if map_out is not None:
            map_out.flush()
    del outputs

    index = images.assign(width=sizes[:, 0], height=sizes[:, 1], ok=ok)
    bad = index[~index.ok]
    bad_test = bad[bad.split != "train"]
    if len(bad_test):
        listed = ", ".join(bad_test.path.head(5)) + (" ..." if len(bad_test) > 5 else "")
        raise FishcompError(f"{len(bad_test)} unreadable test image(s): {listed}")
    for path in bad.path:
        warn(f"unreadable image skipped: {path}")

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
    index[["box_x", "box_y", "box_w", "box_h"]] = boxes
    index.to_csv(tmp / "index.csv", index=False)

    meta = {
        "backbone": config.backbone,
        "weights": config.weights,
        "size": list(config.size),
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "pooled_dim": pooled_dim,
        "map_shape": list(map_shape) if config.spatial else None,
        "classes": dataset.classes,
        "counts": {"total": len(index), **index.split.value_counts().to_dict()},
        "unreadable": bad.path.tolist(),
        "annotations": {**dict(annotations.counts), **box_counts, "orphan entries": len(orphans)},
        "device": str(device),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(index) / max(seconds, 1e-9), 2),
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
