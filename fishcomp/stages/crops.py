"""Detect, then classify: crops around the fish, cut from the full-resolution photo, embedded.

The fish fill a few percent of a 1280x720 photo, so at 224x224 the backbone sees them with few
pixels. A bbox head (`crops.boxes`) finds them; this stage crops each photo around its box,
enlarged by `crops.margin` (and made square), decodes the photo once at full resolution for all
its crops, and embeds the crops with `precompute`'s backbone. Box sources:

- train images, original copy: the bbox head's *out-of-fold* box, so the classifier validates on
  (and learns from) the kind of box it will get at test time, never one its own fold's detector saw;
- train images, augmented copies (`crops.jitter`): the annotated box (the predicted one where the
  image has none, e.g. NoF), shifted and resized at random, every other copy mirrored with
  `crops.jitter.mirror`;
- test images: the bbox head's box from its fold models: the mean of those that agree with the
  consensus box (`crops.test_boxes: consensus`), or of all (`mean`).

The artifact has the precompute layout (`index.csv`, `<split>_pooled.npy`, `train_aug_pooled.npy`,
with `crops.tta: mirror` `<split>_tta_pooled.npy`: each image's first crop flipped left-right as a
test-time view, `meta.json`), so every head on pooled features trains on it unchanged, plus
`crop_boxes.csv`: the rectangle each crop was cut from, in original pixels.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.boxes import box_iou
from fishcomp.cache import Artifact
from fishcomp.config import CropsConfig, LoadedConfig, dump_yaml, key_payload
from fishcomp.console import progress, warn
from fishcomp.context import Context, resolve_device
from fishcomp.data.annotations import Annotations
from fishcomp.data.images import UnreadableImage, load_rgb
from fishcomp.distributed import device_for
from fishcomp.errors import FishcompError
from fishcomp.faults import pause_point
from fishcomp.features import (
    GEOMETRY,
    POINT_COLUMNS,
    EarlierPass,
    Embedder,
    PassProgress,
    backbone_precision,
    image_batches,
    load_index,
    every_fish_boxes,
    normalised_boxes,
)
from fishcomp.graph import Node, Resolver, Stage, register_stage
from fishcomp.models.heads import list_heatmap_heads

# -- geometry (boxes as x, y, w, h in original pixels) ----------------------------------------------


def enlarge(box: np.ndarray, margin: float, square: bool) -> np.ndarray:
    """The box grown by `margin` of its size on each side, and to a square around its centre."""
    x, y, w, h = box
    w, h = w * (1 + 2 * margin), h * (1 + 2 * margin)
    if square:
        w = h = max(w, h)
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return np.array([cx - w / 2, cy - h / 2, w, h])


def fit_inside(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """The box moved (not shrunk, unless larger than the photo) to lie inside it: a fish at the
    edge keeps its whole crop instead of half a crop of black."""
    x, y, w, h = box
    w, h = min(w, width), min(h, height)
    x = min(max(x, 0.0), width - w)
    y = min(max(y, 0.0), height - h)
    return np.array([x, y, max(w, 1.0), max(h, 1.0)])


def jittered(box: np.ndarray, rng: np.random.Generator, shift: float, scale: float) -> np.ndarray:
    x, y, w, h = box
    cx = x + w / 2 + rng.uniform(-shift, shift) * w
    cy = y + h / 2 + rng.uniform(-shift, shift) * h
    w, h = w * np.exp(rng.uniform(-scale, scale)), h * np.exp(rng.uniform(-scale, scale))
    return np.array([cx - w / 2, cy - h / 2, w, h])


def mirrors_further(crops: CropsConfig) -> bool:
    """Whether the further crops (`crops.candidates`) are embedded mirrored too: with the crops'
    view (`crops.tta`), unless `crops.candidates.mirror: false`."""
    return bool(crops.tta and crops.candidates is not None and crops.candidates.mirror is not False)


# Folds whose box overlaps the consensus box at least this much are averaged into it; the others
# found something else (another fish, a deck marking) and are left out.
AGREE_IOU = 0.3


def agreeing_folds(fold_boxes: np.ndarray) -> np.ndarray:
    """(folds, images) weights: per image, the fold box that overlaps the other folds' most (the
    medoid), and every fold box overlapping it by AGREE_IOU or more, each weighted equally. Where
    the folds agree this is their mean; where they point at different fish, the mean of those
    that agree instead of a box between the fish."""
    overlap = box_iou(fold_boxes[:, None], fold_boxes[None, :])  # (folds, folds, images)
    medoid = overlap.sum(axis=1).argmax(axis=0)
    agree = overlap[medoid, :, np.arange(fold_boxes.shape[1])].T >= AGREE_IOU  # (folds, images)
    agree[medoid, np.arange(fold_boxes.shape[1])] = True
    return agree / agree.sum(axis=0, keepdims=True)


def crop_rectangle(box: np.ndarray, config: CropsConfig, width: int, height: int) -> np.ndarray:
    return fit_inside(enlarge(box, config.margin, config.square or config.align), width, height)


def fish_angle(points: np.ndarray) -> float:
    """Direction from tail to head in degrees, counter-clockwise from +x as seen (y points down)."""
    head_x, head_y, tail_x, tail_y = points
    return math.degrees(math.atan2(-(head_y - tail_y), head_x - tail_x))


def aligned_crop(photo, rectangle: np.ndarray, points: np.ndarray):
    """The square crop around `rectangle`'s centre (side: its longer side), turned so that the fish
    (head and tail in pixels) lies horizontally with its head on the left. The region is cut with
    room for the corners first, so turning brings in photo, not black (except at the photo's edge)."""
    from PIL import Image

    x, y, w, h = rectangle
    side = max(w, h)
    centre_x, centre_y = x + w / 2, y + h / 2
    reach = math.ceil(side * math.sqrt(2) / 2)
    region = photo.crop((round(centre_x) - reach, round(centre_y) - reach, round(centre_x) + reach, round(centre_y) + reach))
    # PIL turns counter-clockwise as seen: by 180 - angle, the tail-to-head direction points left.
    turned = region.rotate(180.0 - fish_angle(points), resample=Image.BILINEAR)
    half = side / 2
    return turned.crop((round(reach - half), round(reach - half), round(reach + half), round(reach + half)))


def next_candidates(probability: np.ndarray, cell_boxes: np.ndarray, first: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """One photo's further boxes: the most probable cells whose box centre lies outside every box
    chosen so far (the first being the one the crops use anyway), so each candidate is another
    place, not the same fish again. Returns (count - 1, 4) boxes (NaN where the cells run out) and
    (count,) weights: each box's cell probability, the first box's the best cell inside it."""
    boxes = np.full((count - 1, 4), np.nan)
    weights = np.zeros(count)
    if np.isnan(first).any():
        return boxes, weights  # no usual box: nothing to mix with
    centres = cell_boxes[:, :2] + cell_boxes[:, 2:] / 2

    def inside(box: np.ndarray) -> np.ndarray:
        return (centres[:, 0] >= box[0]) & (centres[:, 0] <= box[0] + box[2]) & (centres[:, 1] >= box[1]) & (centres[:, 1] <= box[1] + box[3])

    claimed = inside(first)
    weights[0] = probability[claimed].max() if claimed.any() else probability.max()
    found = 0
    for cell in np.argsort(-probability, kind="stable"):
        if found == count - 1:
            break
        if claimed[cell]:
            continue
        boxes[found], weights[found + 1] = cell_boxes[cell], probability[cell]
        claimed |= inside(cell_boxes[cell])
        found += 1
    return boxes, weights


def planned_candidates(index: pd.DataFrame, source: Artifact, first: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, count - 1, 4) further boxes and (images, count) weights, from the box source's
    cell maps: each train image's out-of-fold one, each test image's fold models' mean."""
    from fishcomp.models.heads.dense import GridLocator

    boxes = np.full((len(index), count - 1, 4), np.nan)
    weights = np.zeros((len(index), count))
    for split in index.split.unique():
        cells_file = source.file("oof_cells.npy" if split == "train" else f"{split}_cells.npy")
        if not cells_file.is_file():
            raise FishcompError(f"{source.path} keeps no cell map for {split}: delete that folder to rebuild it for crops.candidates")
        images = pd.read_csv(source.file("oof.csv" if split == "train" else f"{split}.csv"), usecols=["image"]).image
        position = pd.Series(np.arange(len(images)), index=images)
        probability, cell_boxes = GridLocator.cell_boxes(np.load(cells_file))
        for row in np.flatnonzero((index.split == split).to_numpy() & index.ok.to_numpy(dtype=bool)):
            at = position.get(index.image.iloc[row])
            if at is None or np.isnan(probability[at]).any():
                continue  # no cell map for this image (left out of training): the usual crop alone
            boxes[row], weights[row] = next_candidates(probability[at], cell_boxes[at], first[row], count)
    return boxes, weights


# -- the images --------------------------------------------------------------------------------------


class CroppedImages:
    """One item per photo: its crops (K, H, W, 3) uint8, decoded once at full resolution.

    `boxes[i, k]`: crop k of photo i as (x, y, w, h) fractions of the photo (the crop rectangle
    is computed once the photo's size is known). `points[i, k]` (optional): the fish's head and
    tail as fractions; a crop with them is turned so the fish lies horizontally, head left.
    Also returns the whole-pixel rectangles cut (before any turn) and the turns in degrees.
    """

    def __init__(self, root: Path, paths: list[str], boxes: np.ndarray, config: CropsConfig, size: tuple[int, int], points: np.ndarray | None = None):
        self.root, self.paths, self.boxes, self.config, self.size = root, paths, boxes, config, size
        self.points = points

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image

        height, width = self.size
        count = self.boxes.shape[1]
        crops = np.zeros((count, height, width, 3), np.uint8)
        rectangles = np.full((count, 4), np.nan, dtype=np.float32)
        turns = np.full(count, np.nan, dtype=np.float32)
        try:
            photo, (photo_w, photo_h) = load_rgb(self.root / self.paths[index])
            ok = True
        except UnreadableImage:
            ok = False
        if ok:
            scale = np.array([photo_w, photo_h, photo_w, photo_h])
            for k in range(count):
                box = self.boxes[index, k] * scale
                if np.isnan(box).any():
                    box = np.array([0.0, 0.0, photo_w, photo_h])  # no box at all: the whole photo
                x, y, w, h = crop_rectangle(box, self.config, photo_w, photo_h)
                left, top = round(x), round(y)
                right, bottom = max(left + 1, round(x + w)), max(top + 1, round(y + h))
                rectangles[k] = (left, top, right - left, bottom - top)  # the pixels actually cut
                ends = None if self.points is None else self.points[index, k] * scale
                if ends is not None and not np.isnan(ends).any():
                    region = aligned_crop(photo, rectangles[k], ends)
                    turns[k] = 180.0 - fish_angle(ends)
                else:
                    region = photo.crop((left, top, right, bottom))
                crops[k] = np.asarray(region.resize((width, height), Image.BILINEAR), dtype=np.uint8)
        return torch.from_numpy(crops), index, ok, torch.from_numpy(rectangles), torch.from_numpy(turns)


# -- the stage ---------------------------------------------------------------------------------------


CROP_PRECOMPUTE_FIELDS = ("backbone", "weights", "size", "precision")


@register_stage
class Crops(Stage):
    name = "crops"
    section = "crops"
    # Not `crops.nof`: only training reads it, so a new NoF weight re-embeds nothing. Not
    # precompute's augment, tta or spatial: crops are embedded once each, as pooled vectors.
    declares = ("data", "crops.margin", "crops.square", "crops.jitter", "crops.align", "crops.test_boxes", "crops.pool", "crops.tta",
                "crops.candidates.count", "crops.candidates.mirror",
                *(f"precompute.{f}" for f in CROP_PRECOMPUTE_FIELDS))
    summary = "detect, then classify: crops around the predicted fish, cut at full resolution and embedded"
    reuses_fit = True  # the train photos' crops of an earlier pass of the same fit key (EarlierPass)

    def inputs(self, resolver: Resolver, loaded: LoadedConfig, **request) -> dict:
        source = resolver.reference(loaded, loaded.config.crops.boxes, "crops.boxes")
        config = source.config
        box_heads = ["bbox", *list_heatmap_heads()]
        if config.head is None or config.head.kind not in box_heads:
            raise FishcompError(
                f"crops.boxes of {loaded.path}: {source.path} must train a head that locates the fish "
                f"(head.kind: {' or '.join(box_heads)}; class-map heads give the box around their heatmap's peak)"
            )
        if config.split.kind == "holdout":
            raise FishcompError(
                f"crops.boxes of {loaded.path}: {source.path} uses a hold-out split, so most train images get no "
                "out-of-fold box; use split.kind kfold or group_kfold"
            )
        boxes = resolver.node("train", source, via="crops.boxes")
        if loaded.config.crops.candidates is not None and getattr(config.head, "box_from", None) != "grid":
            raise FishcompError(
                f"crops.candidates of {loaded.path}: {source.path} does not locate with a grid of cells "
                "(head.kind: bbox with head.box_from: grid), so it has no next most probable boxes; set crops.candidates: null"
            )
        # The box source's own features: their index (images, sizes, readability, boxes) is all
        # this stage reads of them.
        return {"boxes": boxes, "features": boxes.inputs["features"]}

    def references(self, resolver: Resolver, node: Node) -> dict:
        return {"crops.boxes": node.inputs["boxes"]}

    def params(self, ctx: Context, loaded: LoadedConfig, **request) -> dict:
        config = loaded.config
        precompute = key_payload(config.precompute)
        crops = {k: v for k, v in key_payload(config.crops).items() if k != "nof"}
        if "candidates" in crops:  # how they are mixed is training's; what is embedded is ours
            # `mirror: true` is what None does, and without `crops.tta` nothing is mirrored: the
            # same crops, the same key.
            unmirrored = config.crops.tta and not mirrors_further(config.crops)
            crops["candidates"] = {"count": crops["candidates"]["count"], **({"mirror": False} if unmirrored else {})}
        return {
            "crops": crops,
            "precompute": {k: precompute[k] for k in CROP_PRECOMPUTE_FIELDS},
            "precision": backbone_precision(config.precompute),
            "images": ctx.dataset().fingerprint(),
            "annotations": ctx.annotations_digest(config.data),
        }

    def fit_params(self, ctx: Context, loaded: LoadedConfig, params: dict) -> dict | None:
        # The train photos' crops are cut at the box source's out-of-fold boxes: stage 2's photos
        # change neither (they are taken, and a classifier trained on them reused, `EarlierFolds`).
        return {**params, "images": ctx.dataset().split_fingerprints()["train"]}

    def label(self, loaded: LoadedConfig, **request) -> str:
        size = loaded.config.precompute.size
        return f"{loaded.name}-{size[0]}x{size[1]}"

    def build(self, ctx: Context, node: Node, inputs: dict, tmp: Path) -> dict | None:
        return _build(ctx, node.loaded, load_index(inputs["features"]), inputs["boxes"], tmp, self.earlier(ctx, node))

    def describe(self, artifact: Artifact) -> str:
        meta = json.loads(artifact.file("meta.json").read_text())
        # Crops made before `crops.pool` record no pooling: theirs was the backbone's average.
        pooled = {"gem": ", pooled by GeM", "max": ", max-pooled"}.get(meta.get("pool"), "")
        unmirrored = ", not mirrored" if meta.get("candidates_mirrored") is False else ""
        further = f" ({meta['candidates'] - 1} further boxes per image{unmirrored})" if meta.get("candidates", 1) > 1 else ""
        reused = f" ({meta['reused_images']} photos' taken from {meta['reused_from']})" if meta.get("reused_images") and artifact.built else ""
        return f"{meta['crops']} crops of {meta['counts']['total']} images{reused}{pooled}, boxes from {meta['boxes_from']}{further}"


def _predicted(index: pd.DataFrame, source: Artifact, name: str, test_boxes: str = "mean") -> np.ndarray:
    """The box source's `name` predictions ("box" or "points"; `oof_<stem>.csv` for train,
    `<split>_<stem>.csv` for the tests, or with `test_boxes: consensus` the folds' own predictions
    combined by `agreeing_folds`) row-aligned with `index`; NaN for unreadable images."""
    stem, columns = GEOMETRY[name]
    parts = []
    for split in index.split.unique():
        path = source.file(f"oof_{stem}.csv" if split == "train" else f"{split}_{stem}.csv")
        if not path.is_file():
            raise FishcompError(
                f"{source.path} has no {split} {stem}: rebuild it on this data (a class-map head built "
                "before fishcomp read boxes off heatmaps keeps none: delete that folder)"
            )
        part = pd.read_csv(path).set_index("image")[columns]
        if split != "train" and test_boxes == "consensus":
            folds = {n: source.file(f"{split}_{GEOMETRY[n][0]}_folds.npy") for n in {"box", name}}
            if all(f.is_file() for f in folds.values()):
                loaded = {n: np.load(f) for n, f in folds.items()}
                part.loc[:, columns] = np.einsum("fi,fic->ic", agreeing_folds(loaded["box"]), loaded[name])
            else:
                warn(f"{source.path.name} keeps no per-fold test {stem} (built by an older fishcomp): "
                     f"its fold-averaged ones are used; delete {source.path} to rebuild it for crops.test_boxes: consensus")
        parts.append(part)
    predicted = pd.concat(parts)
    predicted = predicted[~predicted.index.duplicated()]
    ok = index.ok.to_numpy(dtype=bool)
    have = index.image.isin(predicted.index).to_numpy() | ~ok
    if not have.all():
        missing = index.image[~have]
        raise FishcompError(f"{source.path} predicts no {stem} for {len(missing)} image(s) (e.g. {missing.iloc[0]}); rebuild it on this data")
    values = np.full((len(index), len(columns)), np.nan)
    values[ok] = predicted.loc[index.image[ok]].to_numpy()
    return values


def planned_boxes(index: pd.DataFrame, boxes: Artifact, config: CropsConfig, annotations: Annotations | None = None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(images, 1 + copies, 4) box fractions per image and crop (NaN where none); with
    `config.align`, the same shape of head/tail fractions; and where each original crop's box
    came from. Jittered copies take the annotated box and points (the predicted ones where the
    image has none); with `jitter.fish: every` they take turns among the photo's annotated fish
    (`annotations`), largest first."""
    copies = config.jitter.copies if config.jitter else 0
    planned = np.full((len(index), 1 + copies, 4), np.nan)
    planned[:, 0] = _predicted(index, boxes, "box", config.test_boxes)
    points = None
    if config.align:
        if not boxes.file("oof_points.csv").is_file():
            raise FishcompError(
                f"crops.align needs head/tail points from the box source, but {boxes.path.name} predicts none: "
                "set head.points_weight in its config and give point annotations (*_points.json)"
            )
        points = np.full((len(index), 1 + copies, 4), np.nan)
        points[:, 0] = _predicted(index, boxes, "points", config.test_boxes)
    sources = ["predicted (out of fold)" if split == "train" else "predicted" for split in index.split]
    if copies:
        rng = np.random.default_rng([config.jitter.seed, 17])
        every = config.jitter.fish == "every" and annotations is not None
        annotated = every_fish_boxes(index, annotations) if every else normalised_boxes(index)[:, None]
        annotated_points = normalised_boxes(index, POINT_COLUMNS)
        for row in np.flatnonzero((index.split == "train").to_numpy() & index.ok.to_numpy(dtype=bool)):
            fish = [box for box in annotated[row] if not np.isnan(box).any()] or [planned[row, 0]]
            for k in range(copies):
                planned[row, 1 + k] = jittered(fish[k % len(fish)], rng, config.jitter.shift, config.jitter.scale)
            if points is not None:
                points[row, 1:] = annotated_points[row] if not np.isnan(annotated_points[row]).any() else points[row, 0]
    return planned, points, sources


def _state_from(earlier: Artifact, rows: int, state: dict[str, np.ndarray]) -> None:
    """The rectangles cut, turns and readability of an earlier crops pass's first `rows` photos
    (`EarlierPass`), from its index and crop_boxes.csv."""
    kept = load_index(earlier).iloc[:rows]
    state["ok"][:rows] = kept.ok.to_numpy(dtype=bool)
    table = pd.read_csv(earlier.file("crop_boxes.csv"))
    table = table[table.image.isin(kept.image)]
    row = pd.Series(np.arange(rows), index=kept.image)[table.image].to_numpy()
    crop = table["copy"].to_numpy()
    usual = crop < state["rectangles"].shape[1]  # the photo's crop and its copies, then the further candidates
    rectangle = table[["x", "y", "w", "h"]].to_numpy(dtype=np.float32)
    state["rectangles"][row[usual], crop[usual]] = rectangle[usual]
    state["turns"][row[usual], crop[usual]] = table.turned_degrees.to_numpy(dtype=np.float32)[usual]
    state["extra_rectangles"][row[~usual], crop[~usual] - state["rectangles"].shape[1]] = rectangle[~usual]


def _build(ctx: Context, loaded: LoadedConfig, index: pd.DataFrame, boxes: Artifact, tmp: Path, earlier: Artifact | None = None) -> dict:
    import torch

    config, precompute = loaded.config.crops, loaded.config.precompute
    dataset = ctx.dataset()
    embedder = Embedder(precompute, resolve_device(device_for(precompute.device)))
    device = embedder.device
    planned, points, sources = planned_boxes(index, boxes, config, ctx.annotations(loaded.config.data))
    further = config.candidates.count - 1 if config.candidates else 0
    if further:
        candidates, candidate_weights = planned_candidates(index, boxes, planned[:, 0], config.candidates.count)
    if np.isnan(normalised_boxes(index[index.split == "train"])).all():
        warn(f"crops      [{loaded.name}] no train image has a box (no *_labels.json in the data's annos/ folder), so "
             f"{boxes.path.name.rsplit('-', 1)[0]} never learned where the fish are: these crops are cut at untrained boxes "
             "(an ensemble leaves such a member out; add box annotations to make them useful)")
    copies = planned.shape[1] - 1
    mirrored_copies = bool(copies and config.jitter.mirror == "alternate")
    dim = embedder.num_features
    splits = index.split.to_numpy()

    extra_rectangles = np.full((len(index), further, 4), np.nan, dtype=np.float32)
    rectangles = np.full(planned.shape, np.nan, dtype=np.float32)
    turns = np.full(planned.shape[:2], np.nan, dtype=np.float32)
    ok = index.ok.to_numpy(dtype=bool).copy()
    # A stopped pass goes on where it stopped (one process builds crops, whatever the world size).
    # The train photos' crops of an earlier pass of the same fit key are these ones (cut at the
    # same out-of-fold boxes, jittered alike): stage 2's photos arriving leave only the test photos
    # to cut, whose boxes the box source predicts anew.
    fingerprints = dataset.split_fingerprints()
    reuse = EarlierPass(earlier, index, fingerprints, _state_from, allowed=("train",)) if earlier is not None else None
    with PassProgress(tmp, {"rectangles": rectangles, "turns": turns, "ok": ok, "extra_rectangles": extra_rectangles}, reuse) as kept:
        outputs = {split: kept.array(f"{split}_pooled.npy", np.float16, (int((splits == split).sum()), dim)) for split in index.split.unique()}
        train_rows = np.flatnonzero(splits == "train")
        augmented = kept.array("train_aug_pooled.npy", np.float16, (copies, len(train_rows), dim)) if copies else None
        # The mirrored view of each image's first crop, laid out as precompute's test-time views.
        views = {split: kept.array(f"{split}_tta_pooled.npy", np.float16, (1, len(out), dim)) for split, out in outputs.items()} if config.tta else {}
        # Every image's further candidate crops (`crops.candidates`), and with the view each mirrored
        # (unless `crops.candidates.mirror: false`).
        mirrored_further = further if further and mirrors_further(config) else 0
        candidate_arrays = ({split: kept.array(f"{split}_candidates_pooled.npy", np.float16, (further, len(out), dim)) for split, out in outputs.items()}
                            if further else {})
        candidate_views = ({split: kept.array(f"{split}_candidates_tta_pooled.npy", np.float16, (further, len(out), dim)) for split, out in outputs.items()}
                           if mirrored_further else {})
        done = kept.done  # 0 where an array could not be taken up again
        kept.announce(f"crops {precompute.size[0]}x{precompute.size[1]}", len(index))
        started = time.time()
        # Train photos carry their jittered copies; the test photos only the predicted crop.
        with progress(f"crops {precompute.size[0]}x{precompute.size[1]}", len(index) - done) as advance, torch.inference_mode():
            before = 0  # images of the splits before this one, in the pass's order
            for split in index.split.unique():
                rows = np.flatnonzero(splits == split)
                skip, before = min(max(done - before, 0), len(rows)), before + len(rows)
                count = 1 + copies if split == "train" else 1
                wanted = planned[rows, :count]
                ends = None if points is None else points[rows, :count]
                if further:  # the candidates after the usual crops, never turned
                    wanted = np.concatenate([wanted, candidates[rows]], axis=1)
                    ends = None if ends is None else np.concatenate([ends, np.full((len(rows), further, 4), np.nan)], axis=1)
                images = CroppedImages(dataset.root, index.path.to_numpy()[rows[skip:]].tolist(), wanted[skip:], config, precompute.size,
                                       None if ends is None else ends[skip:])
                for batch, local, good, cut, turned in image_batches(images, precompute.batch_size, precompute.workers, device):
                    n = len(local)
                    # (images, crops, height, width, channels): flip(-2) mirrors left-right.
                    if split == "train" and mirrored_copies:
                        batch[:, 1:count:2] = batch[:, 1:count:2].flip(-2)
                    # One call for the crops and, with the view, the first crop and the candidates
                    # mirrored after them.
                    looks = batch.flatten(0, 1)
                    if config.tta:
                        looks = torch.cat([looks, batch[:, [0, *range(count, count + mirrored_further)]].flip(-2).flatten(0, 1)])
                    embedded = embedder.embed(looks, spatial=False, pool=config.pool)[0]
                    pooled = embedded[: n * (count + further)].reshape(n, count + further, dim)
                    position = local.numpy() + skip
                    if config.tta:
                        mirrored = embedded[n * (count + further):].reshape(n, 1 + mirrored_further, dim)
                        views[split][0, position] = mirrored[:, 0]
                        if mirrored_further:
                            candidate_views[split][:, position] = mirrored[:, 1:].transpose(1, 0, 2)
                    outputs[split][position] = pooled[:, 0]
                    if split == "train" and copies:
                        augmented[:, position] = pooled[:, 1:count].transpose(1, 0, 2)
                    if further:
                        candidate_arrays[split][:, position] = pooled[:, count:].transpose(1, 0, 2)
                        extra_rectangles[rows[position]] = cut.numpy()[:, count:]
                    rectangles[rows[position], :count] = cut.numpy()[:, :count]
                    turns[rows[position], :count] = turned.numpy()[:, :count]
                    ok[rows[position]] &= good.numpy()
                    advance(n)
                    # In the pass's order, every image up to this batch's last is embedded.
                    kept.advanced(before - len(rows) + int(position[-1]) + 1)
                    pause_point("crops.batch")
    for array in [*outputs.values(), *views.values(), *candidate_arrays.values(), *candidate_views.values(), *([augmented] if copies else [])]:
        array.flush()
    del outputs, augmented, views, candidate_arrays, candidate_views
    kept.publish(tmp)
    if further:
        for split in index.split.unique():
            np.save(tmp / f"{split}_candidate_weights.npy", candidate_weights[splits == split].astype(np.float32))

    index.assign(ok=ok).to_csv(tmp / "index.csv", index=False)
    table = []
    for row, (image, split) in enumerate(zip(index.image, index.split)):
        for k in range(1 + copies if split == "train" else 1):
            x, y, w, h = rectangles[row, k]
            table.append({"image": image, "split": split, "copy": k, "source": sources[row] if k == 0 else "jittered",
                          "x": x, "y": y, "w": w, "h": h, "turned_degrees": turns[row, k], "mirrored": mirrored_copies and k % 2 == 1})
        for k in range(further):
            # A candidate the cells ran out of was cut as the whole photo and weighs nothing: no rectangle.
            x, y, w, h = extra_rectangles[row, k] if not np.isnan(candidates[row, k]).any() else [np.nan] * 4
            table.append({"image": image, "split": split, "copy": (1 + copies if split == "train" else 1) + k,
                          "source": f"candidate {k + 2} (cell probability {candidate_weights[row, k + 1]:.3f})",
                          "x": x, "y": y, "w": w, "h": h, "turned_degrees": np.nan, "mirrored": False})
    pd.DataFrame(table).to_csv(tmp / "crop_boxes.csv", index=False)
    meta = {
        "backbone": precompute.backbone, "weights": precompute.weights, "size": list(precompute.size),
        "mean": list(embedder.backbone.mean), "std": list(embedder.backbone.std), "pooled_dim": dim, "map_shape": None,
        "augment_copies": copies, "tta_views": 2 if config.tta else 1, "classes": dataset.classes,
        "counts": {"total": len(index), **index.split.value_counts().to_dict()},
        "unreadable": index.path[~ok].tolist(), "boxes_from": boxes.path.name, "boxes_key": boxes.key, "pool": config.pool or "avg",
        "crops": len(table), "candidates": 1 + further, "seconds": round(time.time() - started, 2),
        **({"candidates_mirrored": bool(mirrored_further)} if further and config.tta else {}),
        # Photos whose crops were taken from an earlier pass (`EarlierPass`) rather than cut again.
        **kept.reused_meta(),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    (tmp / "config.yaml").write_text(dump_yaml(key_payload(config)))
    return {"crops": len(table), "split_images": fingerprints, **kept.facts()}


# -- NoF -----------------------------------------------------------------------------------------------
