"""PNG figures people look at: heatmap overlays now, report charts later.

matplotlib is imported lazily with the headless Agg backend, so plotting works on a server
without a display and costs nothing for commands that draw nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, dpi: int = 110) -> Path:
    """Write a figure as PNG through a temp file, so a crash never leaves half an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(figure)
    os.replace(tmp, path)
    return path


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A coarse (h, w) map stretched bilinearly to (width, height) and scaled to 0..1."""
    low, high = float(heatmap.min()), float(heatmap.max())
    scaled = (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)
    image = Image.fromarray(scaled.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image)


def _draw_box(axis, box: np.ndarray | None, size: tuple[int, int], colour: str) -> None:
    if box is None or np.isnan(box).any():
        return
    from matplotlib.patches import Rectangle

    width, height = size
    x, y, w, h = box
    axis.add_patch(Rectangle((x * width, y * height), w * width, h * height, fill=False, edgecolor=colour, linewidth=2))


def heatmap_overlay(image: Image.Image, heatmap: np.ndarray, title: str, path: Path, box: np.ndarray | None = None) -> Path:
    """The map upsampled onto the photo, semi-transparent; the true box (fractions) in green."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 8 * image.height / image.width))
    axis.imshow(image)
    axis.imshow(upsample(heatmap, image.size), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    _draw_box(axis, box, image.size, "lime")
    axis.set_title(title, fontsize=10)
    axis.axis("off")
    return save_figure(figure, path)


def heatmap_grid(panels: list[tuple[Image.Image, np.ndarray, str, np.ndarray | None]], path: Path, columns: int = 4) -> Path:
    """Several overlays on one sheet, for a quick look at many images."""
    plt = _pyplot()
    rows = max(1, -(-len(panels) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (image, heatmap, title, box) in zip(axes.ravel(), panels):
        axis.imshow(image)
        axis.imshow(upsample(heatmap, image.size), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        _draw_box(axis, box, image.size, "lime")
        axis.set_title(title, fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
