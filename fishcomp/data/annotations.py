"""The forum's bounding boxes: one Sloth JSON file per class, keyed by image basename.

    [{"annotations": [{"class": "rect", "x": 465.3, "y": 496.3, "width": 432.9, "height": 246.7}],
      "class": "image", "filename": "img_04908.jpg"}, ...]

x, y is the top-left corner in original pixels. Filenames may carry a path prefix
(`../data/fish/train/ALB/img_00003.jpg`), so entries are keyed by basename. The lesson kept the
largest box of an image; so does `largest_boxes`.

Head/tail points (the forum's other files, `*_points.json`, same format, or inside the label
files) are `{"class": "point", "x": .., "y": ..}` entries, two per fish: the head, then the tail.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from fishcomp.errors import FishcompError

LABEL_FILES = ("alb", "bet", "dol", "lag", "shark", "yft", "other", "nof")


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float

    @property
    def area(self) -> float:
        return self.w * self.h


@dataclass
class Annotations:
    boxes: dict[str, list[Box]] = field(default_factory=dict)  # basename -> boxes (may be empty)
    points: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # basename -> head, tail, head, tail, ...
    files: list[Path] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # what was read, skipped and why

    def largest(self, name: str) -> Box | None:
        boxes = self.boxes.get(name)
        return max(boxes, key=lambda box: box.area) if boxes else None

    def head_tail(self, name: str) -> tuple[float, float, float, float] | None:
        """(head x, head y, tail x, tail y) of the fish in the largest box (the pair whose midpoint
        lies in it; the first pair when no box says), or None without point annotations."""
        points = self.points.get(name) or []
        pairs = [(*points[i], *points[i + 1]) for i in range(0, len(points) - 1, 2)]
        if not pairs:
            return None
        box = self.largest(name)
        for pair in pairs:
            mx, my = (pair[0] + pair[2]) / 2, (pair[1] + pair[3]) / 2
            if box is not None and box.x <= mx <= box.x + box.w and box.y <= my <= box.y + box.h:
                return pair
        return pairs[0]


def basename(filename: str) -> str:
    # Both separators: copies of the files were made on Windows and on Linux.
    return PureWindowsPath(PurePosixPath(filename).name).name


def parse_label_file(path: Path) -> list[dict]:
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FishcompError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(entries, list):
        raise FishcompError(f"{path}: expected a list of image entries (Sloth format), got {type(entries).__name__}")
    return entries


def load_annotations(folder: Path | None) -> Annotations:
    """All `*_labels.json` files of a folder; a missing folder means no boxes (not an error)."""
    result = Annotations()
    if folder is None or not folder.is_dir():
        return result
    for path in sorted([*folder.glob("*_labels.json"), *folder.glob("*_points.json")]):
        result.files.append(path)
        for entry in parse_label_file(path):
            if not isinstance(entry, dict) or "filename" not in entry:
                result.counts["entries without filename"] += 1
                continue
            name = basename(str(entry["filename"]))
            boxes = result.boxes.setdefault(name, []) if path.name.endswith("_labels.json") else None
            for rect in entry.get("annotations") or []:
                if isinstance(rect, dict) and rect.get("class") == "point":
                    try:
                        result.points.setdefault(name, []).append((float(rect["x"]), float(rect["y"])))
                        result.counts["points"] += 1
                    except (KeyError, TypeError, ValueError):
                        result.counts["points with missing or non-numeric x/y"] += 1
                    continue
                if not isinstance(rect, dict) or rect.get("class", "rect") != "rect" or boxes is None:
                    result.counts["annotations other than rects and points ignored"] += 1
                    continue
                try:
                    box = Box(*(float(rect[k]) for k in ("x", "y", "width", "height")))
                except (KeyError, TypeError, ValueError):
                    result.counts["rects with missing or non-numeric x/y/width/height"] += 1
                    continue
                if box.w <= 0 or box.h <= 0:
                    result.counts["rects with non-positive size dropped"] += 1
                    continue
                boxes.append(box)
                result.counts["boxes"] += 1
    return result


def clip_box(box: Box, width: float, height: float) -> Box | None:
    """The part of the box inside the image, or None when nothing of it is."""
    x0, y0 = max(box.x, 0.0), max(box.y, 0.0)
    x1, y1 = min(box.x + box.w, width), min(box.y + box.h, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return Box(x0, y0, x1 - x0, y1 - y0)
