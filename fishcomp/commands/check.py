"""`fishcomp check`: is the folder in the competition's layout, and what is in it?

Prints class counts, the image-size x class table (the boat "leakage"), box coverage per class
and unreadable files. Reads image headers only, so it is quick even on the real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from fishcomp.config import DataConfig
from fishcomp.context import Context
from fishcomp.data.images import size_labels


@dataclass
class CheckReport:
    counts: pd.DataFrame  # split x class
    sizes: pd.DataFrame  # "WxH" x class (train)
    coverage: pd.DataFrame  # class -> images, with box, share
    unreadable: list[str]
    annotation_counts: dict


def check(ctx: Context, data: DataConfig | None = None) -> CheckReport:
    dataset = ctx.dataset()
    annotations = ctx.annotations(data or DataConfig())
    images = dataset.images.copy()
    images["size"] = size_labels(dataset.root, images.path)
    unreadable = images.path[images["size"] == "unreadable"].tolist()
    images["class"] = [dataset.classes[i] if i >= 0 else "(test)" for i in images.label]
    counts = pd.crosstab(images.split, images["class"])
    train = images[images.split == "train"]
    size_table = pd.crosstab(train["size"], train["class"], margins=True, margins_name="total")
    size_table = size_table.sort_values("total", ascending=False)
    train = train.assign(has_box=[bool(annotations.boxes.get(name)) for name in train.image])
    coverage = train.groupby("class").agg(images=("image", "size"), with_box=("has_box", "sum"))
    coverage["share"] = (coverage.with_box / coverage.images).round(3)
    return CheckReport(counts, size_table, coverage, unreadable, dict(annotations.counts))


def format_report(report: CheckReport) -> str:
    parts = [
        "images per split and class:", report.counts.to_string(), "",
        "train image size x class (size identifies the boat: the leakage):", report.sizes.to_string(), "",
        "box annotations per class:", report.coverage.to_string(), "",
        f"annotation file counts: {report.annotation_counts or 'no annotation files'}",
        f"unreadable files: {len(report.unreadable)}" + (f" ({', '.join(report.unreadable[:10])})" if report.unreadable else ""),
    ]
    return "\n".join(parts)
