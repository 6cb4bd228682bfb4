"""Box sources for the crops, scored where the crops use them, on one or several generated sets.

    python scripts/compare_box_sources.py --sets 1:classic:200 2:hard:200 [--scale 0.5] [--data DIR ...]
        [--sources bbox_grid bbox_grid_k64 "bbox_grid_k64:head.box_start=null"] [--work /tmp/boxes]
        [--out docs/results.md [--marker box-sources]]

For each set and box source (a bbox config, or a class-map head's such as fcn; `NAME:OVERRIDE;...`
for that config with `--set`-style overrides): the box IoU out of fold (each train image's box
from the fold model that did not train on it, against its largest annotated fish), how wide its boxes are
(the median predicted width over the median annotated one, out of fold), and on the test images
(against the synthetic answers' boxes, `solution_boxes.csv`), with each test image's box taken
as the mean of all fold models' boxes and as their consensus (crops' `test_boxes`); then
`configs/crops.yaml` on that source with either rule: its out-of-fold and its stage-1 + stage-2
test log loss. The table gives the mean and the spread (min-max) over the sets. Sets are made as
scripts/compare.py makes them (`--work`/sets/), so the two scripts share them; `--data` adds
folders that already exist (synthetic, with `solution_boxes.csv`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from compare import CONFIGS, generated_set, head_config, spread_table, test_logloss, write_section

from fishcomp.boxes import box_iou
from fishcomp.config import dump_yaml, load_config
from fishcomp.context import Context
from fishcomp.features import BOX_COLUMNS, load_index, normalised_boxes
from fishcomp.pipeline import build, resolver
from fishcomp.stages.crops import agreeing_folds

RULES = ("mean", "consensus")


def test_iou(data: Path, source, index: pd.DataFrame) -> dict[str, float]:
    """Mean IoU of each rule's test boxes against the answers, over the test images with a fish."""
    truth = pd.read_csv(data / "solution_boxes.csv").set_index("image")
    scores = {rule: [] for rule in RULES}
    for split in ("test_stg1", "test_stg2"):
        path = source.file(f"{split}_boxes_folds.npy")
        if not path.is_file():
            continue
        folds = np.load(path).astype(np.float64)
        images = pd.read_csv(source.file(f"{split}_boxes.csv")).image
        rows = index[index.split == split].set_index("image").loc[images]
        size = rows[["width", "height", "width", "height"]].to_numpy(dtype=float)
        have = images.isin(truth.index).to_numpy()
        answer = truth.loc[images[have], BOX_COLUMNS].to_numpy() / size[have]
        boxes = {"mean": folds.mean(axis=0), "consensus": np.einsum("fi,fic->ic", agreeing_folds(folds), folds)}
        for rule in RULES:
            scores[rule].append(box_iou(boxes[rule][have], answer))
    return {rule: float(np.concatenate(values).mean()) for rule, values in scores.items()}


def scored(data: Path, artifact) -> dict[str, float]:
    """Out-of-fold and test (stage 1 and 2 together) log loss of a train artifact."""
    summary = json.loads(artifact.file("summary.json").read_text())
    return {"valid": summary["valid_logloss"], "test": test_logloss(data, artifact, ("test_stg1", "test_stg2"))}


def out_of_fold_boxes(source, index: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, annotated largest) boxes, fractions, of the train images with a fish."""
    predicted = pd.read_csv(source.file("oof_boxes.csv"))
    truth = normalised_boxes(index[index.split == "train"].set_index("image").loc[predicted.image].reset_index())
    have = ~np.isnan(truth).any(axis=1)
    return predicted[BOX_COLUMNS].to_numpy(dtype=float)[have], truth[have]


def width_ratio(source, index: pd.DataFrame) -> float:
    """Median out-of-fold box width over the median annotated width, on the train images with a fish."""
    predicted, truth = out_of_fold_boxes(source, index)
    return float(np.median(predicted[:, 2]) / np.median(truth[:, 2]))


def oof_iou(source, index: pd.DataFrame) -> float:
    """Mean out-of-fold IoU with the largest annotated fish: the same measure for every source
    (a locator taught every fish reports its IoU with the nearest in its summary instead)."""
    predicted, truth = out_of_fold_boxes(source, index)
    return float(box_iou(predicted, truth).mean())


def source_config(spec: str, work: Path) -> Path:
    """A box source's config file: configs/NAME.yaml, or with overrides (`NAME:A=1;B=2`) that
    config resolved and written whole under `work`, so that crops.boxes can name it."""
    name, _, overrides = spec.partition(":")
    if not overrides:
        return CONFIGS / f"{name}.yaml"
    loaded = head_config(spec, [])
    path = work / "box_sources" / f"{name}-{hashlib.sha256(overrides.encode()).hexdigest()[:8]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(loaded.config.model_dump(mode="json")))
    return path


def one_set(data: Path, work: Path, sources: list[str]) -> list[dict]:
    ctx = Context(data_dir=data, work_dir=work)
    plan = resolver(ctx)
    rows = []
    for spec in sources:
        config = source_config(spec, work)
        node = plan.node("train", load_config(config))
        source = plan.build(node)
        seconds = json.loads(source.file("manifest.json").read_text())["seconds"]
        index = load_index(plan.build(node.inputs["features"]))
        ious = test_iou(data, source, index)
        for rule in RULES:
            crops = build(ctx, "train", load_config(CONFIGS / "crops.yaml", [f"crops.boxes={config}", f"crops.test_boxes={rule}"]))
            rows.append({"source": spec, "rule": rule, "oof_iou": oof_iou(source, index), "width": width_ratio(source, index),
                         "test_iou": ious[rule], "seconds": seconds, **{f"crops_{k}": v for k, v in scored(data, crops).items()}})
    return rows


def table(per_set: list[list[dict]]) -> str:
    return spread_table(
        per_set, {"box source": "source", "test boxes": "rule"},
        {"box IoU out of fold (largest fish)": "oof_iou", "box width / annotated (median, out of fold)": "width", "box IoU on test": "test_iou", "crops out-of-fold log loss": "crops_valid",
         "crops test log loss": "crops_test"},
        "box source train s",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="*", default=[], help="SEED:STYLE:N_TRAIN of each generated set")
    parser.add_argument("--scale", type=float, default=1.0, help="image size factor of generated sets")
    parser.add_argument("--data", nargs="*", type=Path, default=[], help="existing synthetic data folders")
    parser.add_argument("--sources", nargs="*", default=["bbox_grid", "bbox_grid_k64"])
    parser.add_argument("--work", type=Path, default=Path("artifacts"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--marker", default="box-sources", help="which marked section of --out to rewrite")
    args = parser.parse_args()
    folders, described = [], []
    for spec in args.sets:
        data, description = generated_set(args.work, spec, args.scale)
        folders.append(data)
        described.append(f"{description[:-1]}, scale {args.scale})")
    for data in args.data:
        folders.append(data)
        described.append(str(data))
    per_set = []
    for data, name in zip(folders, described):
        if not (data / "solution_boxes.csv").is_file():
            sys.exit(f"{data} has no solution_boxes.csv: generate it with this version's `fishcomp synth`")
        per_set.append(one_set(data, args.work, args.sources))
        print(f"{name}: " + ", ".join(f"{r['source']}/{r['rule']} IoU {r['test_iou']:.3f} crops {r['crops_test']:.4f}" for r in per_set[-1]), flush=True)
    text = (f"Mean (min-max) over {len(per_set)} sets: {'; '.join(described)}.\n\n{table(per_set)}\n\n"
            f"`{' '.join(['python scripts/compare_box_sources.py', *sys.argv[1:]])}`")
    print()
    print(text)
    if args.out:
        write_section(args.out, text, marker=args.marker)


if __name__ == "__main__":
    main()
