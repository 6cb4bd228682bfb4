"""Augmentation declared in YAML and built by albumentations itself.

A config lists transforms by their albumentations class name and parameters:

    - {name: HorizontalFlip, p: 0.5}
    - {name: Affine, scale: [0.9, 1.1], rotate: [-10, 10], p: 0.7}
    - {name: OneOf, transforms: [{name: Blur}, {name: GaussNoise}], p: 0.3}

plus one preset of ours, `NightVision` (grey, dark, green-tinted, noisy), because the competition's
boats film at night with infrared cameras as well as by day. Boxes (COCO x, y, w, h in pixels) go
through the same geometry via albumentations' bbox support, so bbox targets stay on the fish.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import numpy as np

from fishcomp.errors import FishcompError

# What `precompute.augment.transforms` holds unless a config says otherwise: the usual photo
# augmentations, kept mild because features of a frozen backbone are averaged over copies anyway.
DEFAULT_AUGMENT: list[dict[str, Any]] = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "Affine", "scale": [0.9, 1.1], "translate_percent": [-0.05, 0.05], "rotate": [-10, 10], "p": 0.7},
    {"name": "RandomBrightnessContrast", "brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5},
    {"name": "ColorJitter", "brightness": 0.1, "contrast": 0.1, "saturation": 0.2, "hue": 0.03, "p": 0.3},
    {"name": "NightVision", "p": 0.15},
]
# Test-time views after the original: small, label-preserving changes only.
DEFAULT_TTA: list[dict[str, Any]] = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "Affine", "scale": [0.95, 1.05], "translate_percent": [-0.03, 0.03], "p": 0.7},
]


def night_vision(p: float = 0.15):
    """An infrared night camera's look: grey, dark, green, grainy."""
    import albumentations as A

    return A.Sequential(
        [
            A.ToGray(p=1.0),
            A.RandomBrightnessContrast(brightness_limit=(-0.45, -0.2), contrast_limit=(-0.2, 0.1), p=1.0),
            A.RGBShift(r_shift_limit=(-40, -20), g_shift_limit=(10, 35), b_shift_limit=(-40, -20), p=1.0),
            A.GaussNoise(std_range=(0.04, 0.1), p=1.0),
        ],
        p=p,
    )


PRESETS = {"NightVision": night_vision}


def _build_one(spec: dict[str, Any], where: str):
    import albumentations as A

    if not isinstance(spec, dict) or "name" not in spec:
        raise FishcompError(f"{where}: each transform is a mapping with a `name`, got {spec!r}")
    params = dict(spec)
    name = params.pop("name")
    if "transforms" in params:  # OneOf, SomeOf, Sequential: nested lists
        params["transforms"] = [_build_one(child, f"{where}.{name}") for child in params["transforms"]]
    factory = PRESETS.get(name) or getattr(A, name, None)
    if factory is None or not callable(factory):
        known = [n for n in dir(A) if n[:1].isupper()] + list(PRESETS)
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FishcompError(f"{where}: unknown albumentations transform `{name}`{hint}")
    try:
        with warnings.catch_warnings():
            # albumentations only warns about a misspelt argument; a typo must not pass silently.
            warnings.filterwarnings("error", message=".*not valid for transform.*")
            return factory(**params)
    except (TypeError, ValueError, UserWarning) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FishcompError(f"{where}: bad parameters for {name}: {message}") from exc


def build_transform(specs: list[dict[str, Any]], where: str = "transform "):
    """An albumentations Compose of the listed transforms, carrying COCO boxes along."""
    import albumentations as A

    transforms = [_build_one(spec, f"{where}{i}") for i, spec in enumerate(specs)]
    # clip: a box pushed partly off the image keeps its visible part; a box moved wholly off it is
    # dropped (the image then has no box target, like an image without annotation).
    with warnings.catch_warnings():
        # A colour-only list has nothing to do with boxes; that is fine, not worth a warning.
        warnings.filterwarnings("ignore", message=".*no transform to process it.*")
        return A.Compose(transforms, bbox_params=A.BboxParams(format="coco", label_fields=["labels"], clip=True, min_visibility=0.1))


def apply_transform(transform, image: np.ndarray, box: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Augment one uint8 HxWx3 image (and its pixel box) reproducibly: the same seed, the same result.

    Returns the image and the box as (x, y, w, h) pixels, NaN when there was none or it fell off.
    """
    transform.set_random_seed(seed)
    has_box = box is not None and not np.isnan(box).any() and box[2] > 0 and box[3] > 0
    result = transform(image=image, bboxes=np.asarray([box] if has_box else np.zeros((0, 4)), dtype=np.float32), labels=[0] if has_box else [])
    boxes = np.asarray(result["bboxes"], dtype=np.float32).reshape(-1, 4)
    return result["image"], boxes[0] if len(boxes) else np.full(4, np.nan, dtype=np.float32)
