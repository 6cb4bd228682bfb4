"""Train head configs on one or several generated sets and print one markdown table.

    python scripts/compare.py [--data data [data2 ...]] [--work artifacts [artifacts2 ...]] [--heads dense linear ...] [--set key=value ...]
    python scripts/compare.py --sets 1:classic:400 2:hard:400 3:mixed:400 [--scale 0.5] [--blend] [--out docs/results.md]

With `--data`, each row is `fishcomp train -c configs/<head>.yaml` on that data (cached like any
run; several folders, each with its own `--work` or one for all, give the mean and spread over them); `--heads NAME:OVERRIDE;...` is that config with `--set`-style overrides of its own, so one
table can hold a config beside its variants. With `--sets SEED:STYLE:N_TRAIN[:N_STAGE2] ...`, each
set is synthesised (N_TRAIN train images and a quarter as many test images, plus N_STAGE2 stage-2
images from boats absent from train, in `--work`/sets/), every head is trained on each, and the
table gives the mean and the spread (min-max) of the out-of-fold log loss over the sets, and of the
test log loss on the synthetic answers (stage 1; and stage 2, new boats, where the data has a
stage-2 test); `--blend` adds the auto-blend of all the heads (configs' ensemble with `weights:
auto`), cross-fitted. `--out FILE` also writes the table into
FILE between `<!-- compare:start -->` and `<!-- compare:end -->` (`--marker NAME`: between
`<!-- NAME:start -->` and `<!-- NAME:end -->`), with the command that made it. The last column sets
each head against the linear probe on the same features, out of fold and paired image by image
(`fishcomp diff`): the mean difference and on how many sets it is better or worse beyond noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.config import load_config
from fishcomp.context import Context
from fishcomp.metrics import log_loss
from fishcomp.models.heads import head_uses_map
from fishcomp.pipeline import build, resolver

HEADS = [
    "linear", "dense", "dense_probe", "linear_360x640", "linear_360x640_gem", "dense_360x640", "dense_360x640_probe", "gap", "leakage", "leakage_probe",
    "bbox", "bbox_probe", "fcn", "inception", "resblock", "linear_lite1", "linear_lite1_360x640_gem", "linear_lite2", "dense_lite2",
]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_logloss(data: Path, artifact, splits: tuple[str, ...] = ("test_stg1",)) -> float | None:
    """The run's test predictions of `splits` (together) scored on the synthetic answers (None
    without them)."""
    solution = data / "solution.csv"
    tests = [artifact.file(f"{split}.csv") for split in splits if artifact.file(f"{split}.csv").is_file()]
    if not solution.is_file() or not tests:
        return None
    truth = pd.read_csv(solution).set_index("image")
    predicted = pd.concat([pd.read_csv(path) for path in tests]).drop_duplicates("image").set_index("image")
    rows = predicted.index.intersection(truth.index)
    return log_loss(truth.loc[rows].to_numpy().argmax(axis=1), predicted.loc[rows, truth.columns].to_numpy())


def generated_set(work: Path, spec: str, scale: float) -> tuple[Path, str]:
    """The set `spec` (SEED:STYLE:N_TRAIN[:N_STAGE2]) names, under `work`/sets/, made if it is not
    there yet: (its folder, how tables describe it)."""
    from fishcomp.data.synth import synthesize

    seed, style, n_train, *stage2 = spec.split(":")
    n_stage2 = int(stage2[0]) if stage2 else 0
    # Sets without a stage 2 keep the folder (and the cached artifacts) they always had.
    data = work / "sets" / (f"{style}-{seed}-{n_train}" + (f"-s{n_stage2}" if n_stage2 else ""))
    if not (data / "train").is_dir():
        synthesize(data, n_train=int(n_train), n_test=max(8, int(n_train) // 4), n_stage2=n_stage2, seed=int(seed), scale=scale, style=style)
    return data, f"seed {seed} {style} ({n_train} train" + (f", {n_stage2} stage 2" if n_stage2 else "") + ")"


def head_config(spec: str, overrides: list[str]):
    """configs/NAME.yaml loaded with `overrides`, then the head's own (`NAME:A=1;B=2`)."""
    name, _, own = spec.partition(":")
    return load_config(CONFIGS / f"{name}.yaml", [*overrides, *(own.split(";") if own else [])])


def one_set(data: Path, work: Path, heads: list[str], overrides: list[str], blend: bool) -> list[dict]:
    ctx = Context(data_dir=data, work_dir=work, overrides=overrides)
    plan = resolver(ctx)
    configs = {spec: head_config(spec, overrides) for spec in heads}
    # Every head planned before any is built, as `fishcomp run` plans an ensemble's members: heads on
    # the pooled vector then read the pass that also holds the map for heads at the same size,
    # one backbone pass per backbone and size instead of two.
    for loaded in configs.values():
        plan.plan("train", loaded)
    rows = []
    for name, loaded in configs.items():
        artifact = plan.build(plan.plan("train", loaded))
        manifest = json.loads(artifact.file("manifest.json").read_text())
        summary = json.loads(artifact.file("summary.json").read_text())
        rows.append({
            "config": name, "head": summary["head"], "input": "x".join(map(str, summary["input_size"])),
            "valid": summary["valid_logloss"], "test": test_logloss(data, artifact), "stage2": test_logloss(data, artifact, ("test_stg2",)),
            "accuracy": summary["valid_accuracy"],
            "iou": summary.get("valid_iou"), "pointing": summary.get("valid_pointing"), "seconds": manifest["seconds"],
            "artifact": artifact.path, "features": summary.get("inputs", {}).get("features", {}).get("artifact"),
            "uses_map": head_uses_map(loaded.config.head),
        })
    against_probe(rows)
    if blend:
        with tempfile.TemporaryDirectory() as folder:
            config = Path(folder) / "library.yaml"
            members = "".join(f"    - {{config: {CONFIGS / f'{name}.yaml'}}}\n" for name in heads)
            config.write_text(f"name: library\nensemble:\n  weights: auto\n  members:\n{members}")
            artifact = build(ctx, "ensemble", load_config(config, overrides))
        summary = json.loads(artifact.file("summary.json").read_text())
        rows.append({
            "config": f"auto blend ({summary['blend']})", "head": "ensemble", "input": "",
            "valid": summary["valid_logloss_cross_fitted"] or summary["valid_logloss"], "test": test_logloss(data, artifact),
            "stage2": test_logloss(data, artifact, ("test_stg2",)), "accuracy": summary["valid_accuracy"], "iou": None, "pointing": None,
            "seconds": json.loads(artifact.file("manifest.json").read_text())["seconds"], "artifact": artifact.path, "vs_probe": None,
        })
    return rows


def against_probe(rows: list[dict]) -> None:
    """`vs_probe`: each head's out-of-fold rows against the linear probe's on the same features
    (a `linear` row that read the same feature artifact: for a head on the pooled vector the
    average-pooled probe, not a GeM probe that pools the map of the same pass, whichever the table
    lists first; for a map head the first probe of that pass), paired image by image (`fishcomp
    diff`): whether the head beats the floor beyond noise, and by how much."""
    from fishcomp.commands.diff import compare_runs

    for row in rows:
        probes = [r for r in rows if r["head"] == "linear" and r["features"] == row["features"]]
        if not row["uses_map"]:
            probes = [r for r in probes if not r["uses_map"]] or probes
        probe = probes[0] if probes else None
        row["vs_probe"] = None
        if probe is not None and probe is not row and row["head"] != "linear":
            row["vs_probe"] = compare_runs(probe["artifact"], row["artifact"])["rows"][0]


def beyond_noise(results: list[dict | None]) -> str:
    """Over the sets: the mean difference from the probe, and on how many the head is better or
    worse beyond noise (the 95 % interval leaving out 0)."""
    from fishcomp.metrics import difference_verdict

    results = [r for r in results if r is not None]
    if not results:
        return ""
    verdicts = [difference_verdict(r) for r in results]
    return (f"{np.mean([r['difference'] for r in results]):+.4f}; better on {verdicts.count('B better')}, "
            f"worse on {verdicts.count('A better')} of {len(results)}")


def spread(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ({min(values):.3f}-{max(values):.3f})"


def spread_table(per_set: list[list[dict]], labels: dict[str, str], spreads: dict[str, str], seconds: str,
                 noted: dict[str, str] | None = None) -> str:
    """One row per entry of the first set: `labels` (header -> key) as they are, `spreads` (header ->
    key) as the mean and min-max over the sets, `noted` (header -> key of paired differences) as
    `beyond_noise` counts them, and the mean of the `seconds` key."""
    noted = noted or {}
    headers = [*labels, *spreads, *noted, seconds]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for i, row in enumerate(per_set[0]):
        column = lambda key: [rows[i][key] for rows in per_set]  # noqa: E731
        cells = [str(row[key]) for key in labels.values()] + [spread(column(key)) for key in spreads.values()]
        cells += [beyond_noise(column(key)) for key in noted.values()]
        lines.append("| " + " | ".join([*cells, f"{np.mean(column('seconds')):.0f}"]) + " |")
    return "\n".join(lines)


def table(per_set: list[list[dict]]) -> str:
    # Stage 2 (new boats) only where some set has one, so tables of sets without it look as before.
    stage2 = {"stage-2 log loss": "stage2"} if any(row.get("stage2") is not None for rows in per_set for row in rows) else {}
    return spread_table(
        per_set, {"config": "config", "head": "head", "input": "input"},
        {"out-of-fold log loss": "valid", "test log loss": "test", **stage2, "accuracy": "accuracy", "box IoU": "iou", "heatmap pointing": "pointing"},
        "train s", noted={"out of fold against the linear probe on its features (mean; sets beyond noise)": "vs_probe"},
    )


def write_section(path: Path, text: str, marker: str = "compare") -> None:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    page = path.read_text() if path.is_file() else ""
    block = f"{start}\n{text}\n{end}"
    page = page[: page.index(start)] + block + page[page.index(end) + len(end):] if start in page and end in page else page + "\n" + block + "\n"
    path.write_text(page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", default=[Path("data")], help="one or more data folders")
    parser.add_argument("--work", type=Path, nargs="+", default=[Path("artifacts")], help="the artifact folder (one per --data folder, or one for all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--heads", nargs="*", default=HEADS)
    parser.add_argument("--sets", nargs="*", default=None, help="SEED:STYLE:N_TRAIN[:N_STAGE2] of each generated set")
    parser.add_argument("--scale", type=float, default=1.0, help="image size factor of generated sets")
    parser.add_argument("--blend", action="store_true", help="also the auto-blend of all the heads")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--marker", default="compare", help="which marked section of --out to rewrite")
    args = parser.parse_args()
    if len(args.work) not in (1, len(args.data)):
        parser.error(f"--work: one folder, or one per --data folder ({len(args.data)}), not {len(args.work)}")
    works = args.work * len(args.data) if len(args.work) == 1 else args.work
    if args.blend and any(":" in spec for spec in args.heads):
        parser.error("--blend blends configs as they are: name no NAME:OVERRIDE heads with it")
    if args.sets:
        per_set, described = [], []
        for spec in args.sets:
            data, description = generated_set(works[0], spec, args.scale)
            per_set.append(one_set(data, works[0], args.heads, args.overrides, args.blend))
            described.append(description)
            print(f"{described[-1]}: " + ", ".join(f"{r['config']} {r['valid']:.4f}" for r in per_set[-1]), flush=True)
        heading = f"Mean (min-max) over {len(per_set)} generated sets: {'; '.join(described)}; scale {args.scale}."
    else:
        per_set = [one_set(data, work, args.heads, args.overrides, args.blend) for data, work in zip(args.data, works)]
        folders = ", ".join(str(data) for data in args.data)
        heading = f"On {folders}." if len(per_set) == 1 else f"Mean (min-max) over {len(per_set)} data folders: {folders}."
    text = f"{heading}\n\n{table(per_set)}\n\n`{' '.join(['python scripts/compare.py', *sys.argv[1:]])}`"
    print()
    print(text)
    if args.out:
        write_section(args.out, text, marker=args.marker)


if __name__ == "__main__":
    main()
