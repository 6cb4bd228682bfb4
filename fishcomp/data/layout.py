"""The competition's folder layout: what is where, which classes, which rows a submission needs.

    DIR/train/<CLASS>/img_NNNNN.jpg
    DIR/test_stg1/img_NNNNN.jpg            rows named img_NNNNN.jpg
    DIR/test_stg2/image_NNNNN.jpg          rows named test_stg2/image_NNNNN.jpg (optional)
    DIR/sample_submission_stg1.csv         header image,ALB,BET,...,YFT
    DIR/sample_submission_stg2.csv         stage-1 rows, then stage-2 rows (optional)
    DIR/annos/<class>_labels.json          forum boxes (optional)
    DIR/solution.csv                       true answers, one-hot (synthetic data only)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.errors import FishcompError
from fishcomp.suggest import did_you_mean

FISHERIES_CLASSES = ["ALB", "BET", "DOL", "LAG", "NoF", "OTHER", "SHARK", "YFT"]
TEST_SPLITS = ("test_stg1", "test_stg2")
SOLUTION_FILE = "solution.csv"
# Synthetic sets only: the largest fish box of each test image that has one (x, y, w, h in
# pixels), so box sources can be scored on test images as solution.csv scores classes.
SOLUTION_BOXES_FILE = "solution_boxes.csv"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def sample_submission_path(root: Path, split: str) -> Path:
    return root / f"sample_submission_{split.removeprefix('test_')}.csv"


def row_name(split: str, file: Path) -> str:
    """How the submission names an image: bare for train and stage 1, `test_stg2/...` for stage 2."""
    return f"{split}/{file.name}" if split == "test_stg2" else file.name


def stage_of(names: pd.Index) -> pd.Series:
    """Each submission row's test split, from its name (`row_name`'s inverse: stage 2's rows are
    `test_stg2/...`, stage 1's bare)."""
    return pd.Series(np.where(names.str.startswith("test_stg2/"), "test_stg2", "test_stg1"), index=names)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    # One row per image: image (submission-style name), split, label (class index, -1 for test), path.
    images: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)
    _split_fingerprints: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def train(self) -> pd.DataFrame:
        return self.images[self.images.split == "train"]

    def test_splits(self) -> list[str]:
        return [split for split in TEST_SPLITS if (self.images.split == split).any()]

    def submission_rows(self, split: str) -> list[str]:
        return expected_rows(self.root, split)

    def fingerprint(self) -> str:
        """Changes when any image is added, removed, resized on disk or touched.

        Stat-based (name, size, mtime) like make: hashing gigabytes of JPEGs on every run would
        cost more than the cache saves. Copying a dataset elsewhere changes mtimes and so the key.
        Taken once per loaded dataset (its image list is fixed too): every key a run plans and the
        data each artifact records then name the same images, and the competition's 16,930 files
        are not stat-ed again for every node.
        """
        self.split_fingerprints()
        return self._fingerprint

    def split_fingerprints(self) -> dict[str, str]:
        """`fingerprint` of each split's images alone: the train split's is what a model trained
        on the train images depends on (`Stage.fit_params`); together they say which of an
        earlier pass's splits hold the same images as this one's (stage 2's photos arriving after
        stage 1 leave the others as they were)."""
        if self._fingerprint is None:
            whole = hashlib.sha256()
            splits: dict = {}
            for path, split in zip(self.images.path, self.images.split):
                stat = (self.root / path).stat()
                line = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
                whole.update(line)
                splits.setdefault(split, hashlib.sha256()).update(line)
            classes = ",".join(self.classes).encode()
            whole.update(classes)
            self._fingerprint = whole.hexdigest()[:16]
            for digest in splits.values():
                digest.update(classes)
            self._split_fingerprints = {split: digest.hexdigest()[:16] for split, digest in splits.items()}
        return self._split_fingerprints


def expected_rows(root: Path, split: str) -> list[str]:
    """The rows a submission for `split` must have, in the sample submission's order.

    The stage-2 sample submission lists the stage-1 images too, so its rows span both tests.
    Without a sample submission, the test folders' files (stage 1 first) are the rows.
    """
    sample = sample_submission_path(root, split)
    if sample.is_file():
        return pd.read_csv(sample, usecols=[0], dtype=str).iloc[:, 0].tolist()
    rows = []
    for part in TEST_SPLITS[: TEST_SPLITS.index(split) + 1]:
        folder = root / part
        if folder.is_dir():
            rows += [row_name(part, f) for f in _list_images(folder)]
    if not rows:
        raise FishcompError(f"cannot tell which rows a {split} submission needs: no {sample.name} and no {root / split}/")
    return rows


def read_classes(root: Path) -> list[str]:
    """Class names from the sample submission's header, else the train folders."""
    for split in TEST_SPLITS:
        sample = sample_submission_path(root, split)
        if sample.is_file():
            header = pd.read_csv(sample, nrows=0).columns.tolist()
            if len(header) < 3 or header[0] != "image":
                raise FishcompError(f"{sample}: header must be `image,<class>,<class>,...`, got {','.join(header)}")
            return header[1:]
    train = root / "train"
    folders = sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
    return folders


def load_dataset(root: str | Path) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise FishcompError(f"data folder not found: {root} (generate one with `fishcomp synth {root}`)")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FishcompError(f"no train/ folder in {root}: expected {train_dir}/<CLASS>/*.jpg")
    classes = read_classes(root)
    if len(classes) < 2:
        raise FishcompError(f"{train_dir}: need at least 2 class folders (or a sample submission header)")
    notes: list[str] = []
    rows = []
    seen: dict[str, Path] = {}
    known = set(classes)
    for folder in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        if folder.name not in known:
            hint = did_you_mean(folder.name, classes).lstrip("; ")
            notes.append(f"train/{folder.name}: not a class of this competition ({', '.join(classes)}){'; ' + hint if hint else ''}; skipped")
            continue
        files = [p for p in _list_images(folder)]
        if not files:
            notes.append(f"train/{folder.name}: empty class folder")
        for file in files:
            if file.name in seen:
                raise FishcompError(
                    f"the same file name is in two class folders: {seen[file.name]} and {file} "
                    "(remove one; labels would be ambiguous)"
                )
            seen[file.name] = file
            rows.append((file.name, "train", classes.index(folder.name), file.relative_to(root).as_posix()))
    if not rows:
        raise FishcompError(f"{train_dir}: no training images found in any class folder")
    for split in TEST_SPLITS:
        folder = root / split
        if folder.is_dir():
            rows += [(row_name(split, f), split, -1, f.relative_to(root).as_posix()) for f in _list_images(folder)]
        elif sample_submission_path(root, split).is_file():
            raise FishcompError(f"{sample_submission_path(root, split).name} is present but {folder} is missing")
    images = pd.DataFrame(rows, columns=["image", "split", "label", "path"])
    if not (images.split == "test_stg1").any():
        raise FishcompError(f"no test images: expected {root / 'test_stg1'}/*.jpg")
    return Dataset(root=root, classes=classes, images=images, warnings=notes)
