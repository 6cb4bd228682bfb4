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
many images there are. Each batch of photos is decoded once for all of its views (the original,
the augmented copies, the test-time views), not once per view: decoding a camera-sized JPEG is
a sizeable share of a 224x224 pass on a CPU, and on a GPU the decoding is the pass's bottleneck.
A pass that is stopped goes on where it stopped when run again (`PassProgress`).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, PrecomputeConfig, dump_yaml, key_payload
from fishcomp.console import progress, warn
from fishcomp.context import Context, precision_name, resolve_device
from fishcomp.data.annotations import clip_box
from fishcomp.data.augment import build_transform
from fishcomp.distributed import barrier, device_for, gather_to_main, world
from fishcomp.errors import FishcompError
from fishcomp.faults import pause_point
from fishcomp.features import (
    BOX_COLUMNS,
    POINT_COLUMNS,
    DecodedViews,
    EarlierPass,
    Embedder,
    PassProgress,
    View,
    backbone_precision,
    image_batches,
    load_index,
    reserved_memmap,
    resolved_precompute,
    share_of_batches,
    transform_seed,
)
from fishcomp.graph import Node, Resolver, Stage, node_key, register_stage


@register_stage
class Precompute(Stage):
    name = "precompute"
    declares = ("data", "precompute")
    together = True  # under torchrun every rank embeds its share of the images; rank 0 publishes
    reuses_fit = True  # the splits an earlier pass of the same train images holds (EarlierPass)
    summary = "the frozen backbone over every image: pooled vectors (and maps) as float16"

    def params(self, ctx: Context, loaded: LoadedConfig, spatial: bool = False, originals_only: bool = False) -> dict:
        section = resolved_precompute(loaded.config.precompute, spatial, originals_only)
        return {
            "precompute": key_payload(section),
            "precision": backbone_precision(section),
            "images": ctx.dataset().fingerprint(),
            "annotations": ctx.annotations_digest(loaded.config.data),
        }

    def fit_params(self, ctx: Context, loaded: LoadedConfig, params: dict) -> dict | None:
        # What heads fit on is the train images' rows: stage 2's photos do not change them.
        return {**params, "images": ctx.dataset().split_fingerprints()["train"]}

    def prefer(self, resolver: Resolver, loaded: LoadedConfig, request: dict) -> dict:
        """A pooled-only request is served by the pass that also holds the map (the pooled
        vectors are the same), when this run builds that pass anyway or it is cached: one
        backbone pass per backbone, size and view set."""
        if request.get("spatial") or loaded.config.precompute.spatial:
            return request
        superset = {**request, "spatial": True}
        key = node_key(self, self.params(resolver.ctx, loaded, **superset), {})
        return superset if resolver.is_planned_or_cached(self.name, key) else request

    def label(self, loaded: LoadedConfig, **request) -> str:
        size = loaded.config.precompute.size
        return f"{loaded.config.precompute.backbone}-{size[0]}x{size[1]}"

    def build(self, ctx: Context, node: Node, inputs: dict, tmp: Path) -> dict | None:
        earlier = None if world().distributed else self.earlier(ctx, node)
        return _build(ctx, node.loaded, resolved_precompute(node.loaded.config.precompute, **node.request), tmp, earlier)

    def describe(self, artifact: Artifact) -> str:
        meta = json.loads(artifact.file("meta.json").read_text())
        maps = ", with maps" if meta.get("map_shape") else ""
        if not artifact.built:
            return maps.lstrip(", ")
        reused = f" ({meta['reused_images']} taken from {meta['reused_from']})" if meta.get("reused_images") else ""
        # Every image taken from an earlier pass: no speed to speak of.
        speed = f", {meta['images_per_second']:.1f} img/s" if meta.get("reused_images", 0) < meta["counts"]["total"] else ""
        return f"{meta['counts']['total']} images{reused}{speed}{maps}"

    def after(self, ctx: Context, node: Node, artifact: Artifact) -> None:
        check_unreadable(ctx, artifact)


def check_unreadable(ctx: Context, artifact: Artifact) -> None:
    """Unreadable images are recorded in the artifact, not fatal when it is built: whether an
    unreadable test image stops the run is the caller's choice (--on-bad-test), on every use."""
    meta = json.loads(artifact.file("meta.json").read_text())
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


class _Deferred:
    """A file rank 0 is creating; opened once the ranks have met at the barrier."""

    def __init__(self, path: Path):
        self.path = path


def _open(array):
    return np.load(array.path, mmap_mode="r+") if isinstance(array, _Deferred) else array


def _raw_box(annotations, name: str) -> tuple[float, float, float, float]:
    """The largest annotated box in original pixels (unclipped: sizes are known only once decoded)."""
    box = annotations.largest(name)
    return (np.nan,) * 4 if box is None else (box.x, box.y, box.w, box.h)


def _state_from(earlier: Artifact, rows: int, state: dict[str, np.ndarray]) -> None:
    """The sizes and readability of an earlier pass's first `rows` images (`EarlierPass`)."""
    kept = load_index(earlier).iloc[:rows]
    state["sizes"][:rows] = kept[["width", "height"]].to_numpy()
    state["ok"][:rows] = kept.ok.to_numpy(dtype=bool)


def _build(ctx: Context, loaded: LoadedConfig, config: PrecomputeConfig, tmp: Path, earlier: Artifact | None = None) -> dict:
    import torch

    dataset = ctx.dataset()
    annotations = ctx.annotations(loaded.config.data)
    images = dataset.images.reset_index(drop=True)
    device = resolve_device(device_for(config.device))
    embedder = Embedder(config, device)
    map_shape = embedder.map_shape(config.size)
    pooled_dim = embedder.num_features

    splits = images.split.to_numpy()
    position = np.zeros(len(images), dtype=np.int64)
    for split in images.split.unique():
        position[splits == split] = np.arange((splits == split).sum())
    train_rows = np.flatnonzero(splits == "train")
    augment, tta = config.augment, config.tta

    here = world()
    sizes = np.zeros((len(images), 2), dtype=np.int64)
    ok = np.zeros(len(images), dtype=bool)

    def shared(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
        if kept is not None:
            return kept.array(path.name, dtype, shape)
        # Rank 0 creates every output file; the other ranks open them once it has (see the barrier below).
        return reserved_memmap(path, dtype, shape) if here.is_main else _Deferred(path)

    def arrays(name: str, count: int, leading: tuple[int, ...] = ()) -> tuple[np.memmap, np.memmap | None]:
        pooled = shared(tmp / f"{name}_pooled.npy", np.float16, leading + (count, pooled_dim))
        spatial = shared(tmp / f"{name}_map.npy", np.float16, leading + (count,) + map_shape) if config.spatial else None
        return pooled, spatial

    # One process picks up where a stopped pass left off, or takes the splits an earlier pass with
    # the same train images holds (stage 2's photos added: only they are embedded); under torchrun
    # each rank takes its share.
    fingerprints = dataset.split_fingerprints()
    reuse = EarlierPass(earlier, images, fingerprints, _state_from) if earlier is not None else None
    with nullcontext() if here.distributed else PassProgress(tmp, {"sizes": sizes, "ok": ok}, reuse) as kept:
        # View 0: every image as it is. Then augmented copies of the train images, then TTA views of all.
        # Each photo is decoded once for all of its views (`DecodedViews`), batch by batch of images.
        is_train = splits == "train"
        originals = {split: arrays(split, int((splits == split).sum())) for split in images.split.unique()}
        plan = [("original", 0, View())]
        if augment:
            augment_transform = build_transform(augment.transforms)
            augmented = arrays("train_aug", len(train_rows), (augment.copies,))
            augmented_boxes = shared(tmp / "train_aug_boxes.npy", np.float32, (augment.copies, len(train_rows), 4))
            # A copy's per-image seed counts the train images only: the copies do not change with the test set.
            plan += [
                ("augment", c, View(augment_transform, transform_seed(augment.seed, c), wanted=is_train, numbering=position, moves_boxes=True))
                for c in range(augment.copies)
            ]
        if tta:
            tta_transform = build_transform(tta.transforms)
            views = {split: arrays(f"{split}_tta", int((splits == split).sum()), (tta.views - 1,)) for split in images.split.unique()}
            plan += [("tta", v, View(tta_transform, transform_seed(tta.seed, v))) for v in range(tta.views - 1)]
        raw_boxes = np.array([_raw_box(annotations, name) for name in images.image], dtype=np.float32)
        if here.distributed:
            barrier()
            originals = {split: tuple(_open(a) for a in pair) for split, pair in originals.items()}
            if augment:
                augmented, augmented_boxes = tuple(_open(a) for a in augmented), _open(augmented_boxes)
            if tta:
                views = {split: tuple(_open(a) for a in pair) for split, pair in views.items()}

        todo = share_of_batches(len(images), config.batch_size) if kept is None else np.arange(kept.done, len(images))
        if kept is not None:
            kept.announce(f"precompute {config.size[0]}x{config.size[1]}", len(images))
        total = sum(int(is_train[todo].sum()) if kind == "augment" else len(todo) for kind, _, _ in plan)
        started = time.time()
        with progress(f"precompute {config.size[0]}x{config.size[1]}", total) as advance, torch.inference_mode():
            loader = image_batches(
                DecodedViews(dataset.root, images.path.tolist(), config.size, [view for _, _, view in plan], raw_boxes, positions=todo),
                config.batch_size, config.workers, device,
            )
            for batch, local, orig_w, orig_h, good, boxes, wanted in loader:
                rows = local.numpy()
                sizes[rows] = np.stack([orig_w.numpy(), orig_h.numpy()], axis=1)
                ok[rows] = good.numpy()
                for column, (kind, number, _) in enumerate(plan):
                    chosen = wanted[:, column]
                    if not chosen.any():
                        continue
                    pooled, feature_map = embedder.embed(batch[chosen, column], spatial=config.spatial)
                    index = rows[chosen.numpy()]
                    if kind == "augment":
                        where = position[index]  # the train position
                        augmented[0][number, where] = pooled
                        if feature_map is not None:
                            augmented[1][number, where] = feature_map
                        augmented_boxes[number, where] = boxes[chosen, column].numpy()
                    else:
                        for split in np.unique(splits[index]):
                            mine = splits[index] == split
                            pooled_out, map_out = originals[split] if kind == "original" else views[split]
                            target = (position[index[mine]],) if kind == "original" else (number, position[index[mine]])
                            pooled_out[target] = pooled[mine]
                            if map_out is not None:
                                map_out[target] = feature_map[mine]
                    advance(len(index))
                if kept is not None:
                    kept.advanced(int(rows[-1]) + 1)  # batches come in row order: every row up to this one is written
                pause_point("precompute.batch")
    seconds = time.time() - started
    for item in [*originals.values(), *(views.values() if tta else ()), *((augmented, (augmented_boxes,)) if augment else ())]:
        for array in item:
            if array is not None:
                array.flush()
    del originals, plan, loader
    if augment:
        del augmented, augmented_boxes
    if tta:
        del views
    if kept is not None:
        kept.publish(tmp)
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
        "mean": list(embedder.backbone.mean),
        "std": list(embedder.backbone.std),
        "pooled_dim": pooled_dim,
        "map_shape": list(map_shape) if config.spatial else None,
        "augment_copies": augment.copies if augment else 0,
        "tta_views": tta.views if tta else 1,
        "classes": dataset.classes,
        "counts": {"total": len(index), **index.split.value_counts().to_dict()},
        "unreadable": bad.path.tolist(),
        "annotations": {**dict(annotations.counts), **box_counts, "orphan entries": len(orphans)},
        "device": str(device),
        "precision": precision_name(embedder.autocast_dtype),
        "seconds": round(seconds, 2),
        "images_per_second": round(total / max(seconds, 1e-9), 2),
        # Images taken from an earlier pass (`EarlierPass`) rather than embedded: the speed is the others'.
        **(kept.reused_meta() if kept is not None else {}),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    (tmp / "config.yaml").write_text(dump_yaml(key_payload(config)))
    return {"images": len(index), "unreadable": len(bad), "split_images": fingerprints, **(kept.facts() if kept is not None else {})}
