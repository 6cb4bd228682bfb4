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
    # zlib's fastest level: PIL's default (6) spent about a fifth of a report's time compressing
    # its photo grids, for files about 15 % smaller.
    figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", pil_kwargs={"compress_level": 1})
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


def training_curves(metrics, path: Path) -> Path:
    """Train and validation loss, and validation log loss, per epoch; one line per fold. For the
    linear probe, the inner-split log loss against the L2 strength, the chosen one marked, and
    with `head.inner_bag` the one probe's beside it (a
    dense head on a probe, `head.base`, has those as epoch-0 rows: its curves are its epochs)."""
    plt = _pyplot()
    probe_only = []
    if "strength" in metrics and "valid_loss" in metrics:
        # Folds whose inner split chose 0 epochs are their probe: no epochs to draw, named instead.
        probe_only = sorted(set(metrics.fold) - set(metrics.fold[metrics.epoch > 0]))
        metrics = metrics[metrics.epoch > 0]
    elif "strength" in metrics:
        figure, axis = plt.subplots(figsize=(6, 3.8))
        for fold, rows in metrics.groupby("fold"):
            tried = rows[rows.inner_logloss.notna()].groupby("strength").inner_logloss.mean()  # over inner splits
            line = axis.plot(tried.index, tried.to_numpy(), marker="o", label=f"fold {fold}")[0]
            if "inner_single_logloss" in rows:  # `head.inner_bag`: the one probe's score beside the mean's that chose
                single = rows[rows.inner_single_logloss.notna()].groupby("strength").inner_single_logloss.mean()
                axis.plot(single.index, single.to_numpy(), linestyle="--", color=line.get_color())
            chosen = rows[rows.get("chosen", False) == True]  # noqa: E712 (a column of True/NaN)
            if len(chosen):
                axis.axvline(chosen.strength.iloc[0], color=line.get_color(), linestyle=":")
        bagged = "; dashed: one probe, solid: the inner bag's mean" if "inner_single_logloss" in metrics else ""
        axis.set(xscale="log", title=f"inner-split log loss by L2 strength (dotted: chosen{bagged})", xlabel="C (inverse strength)")
        axis.legend(fontsize=7)
        figure.tight_layout()
        return save_figure(figure, path)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for fold, rows in metrics.groupby("fold"):
        line = left.plot(rows.epoch, rows.train_loss, label=f"fold {fold} train")[0]
        left.plot(rows.epoch, rows.valid_loss, linestyle="--", color=line.get_color(), label=f"fold {fold} valid")
        right.plot(rows.epoch, rows.valid_logloss, color=line.get_color(), label=f"fold {fold}")
    left.set(title="loss (solid: train, dashed: validation)", xlabel="epoch")
    alone = f" (fold {', '.join(map(str, probe_only))}: the probe alone, 0 epochs)" if probe_only else ""
    right.set(title=f"validation log loss{alone}", xlabel="epoch")
    right.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def confusion_matrices(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    """Counts, and rows normalised to the share of each true class."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for axis, values, title, fmt in ((axes[0], matrix, "counts", "{:.0f}"), (axes[1], shares, "share of the true class", "{:.2f}")):
        axis.imshow(values, cmap="Blues")
        axis.set(title=title, xlabel="predicted", ylabel="true", xticks=range(len(classes)), yticks=range(len(classes)))
        axis.set_xticklabels(classes, rotation=45)
        axis.set_yticklabels(classes)
        top = values.max() if values.size else 1
        for (i, j), value in np.ndenumerate(values):
            axis.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7, color="white" if value > top / 2 else "black")
    figure.tight_layout()
    return save_figure(figure, path)


def image_grid(panels: list[tuple], path: Path, columns: int = 4) -> Path:
    """Photos with a title and boxes: panels of (image, title, [(box fractions, colour), ...])."""
    plt = _pyplot()
    rows = max(1, -(-len(panels) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.7 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (image, title, boxes) in zip(axes.ravel(), panels):
        axis.imshow(image)
        for box, colour in boxes:
            _draw_box(axis, box, image.size, colour)
        axis.set_title(title, fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def histogram(values: np.ndarray, path: Path, title: str, xlabel: str, bins: int = 20) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist(values, bins=bins, range=(0, 1), color="tab:blue", edgecolor="white")
    axis.set(title=title, xlabel=xlabel, ylabel="images")
    return save_figure(figure, path)


def bar_chart(names: list[str], values: list[float], path: Path, title: str, highlight: str | None = None) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 3.5))
    colours = ["tab:orange" if name == highlight else "tab:blue" for name in names]
    axis.bar(names, values, color=colours)
    for i, value in enumerate(values):
        axis.text(i, value, f"{value:.4f}", ha="center", va="bottom", fontsize=8)
    axis.set(title=title)
    axis.tick_params(axis="x", rotation=30)
    return save_figure(figure, path)


def score_scatter(x: list[float], y: list[float], names: list[str], path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """One labelled point per run, with the diagonal on which the two scores agree."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 4.5))
    axis.scatter(x, y)
    for xi, yi, name in zip(x, y, names):
        axis.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    low, high = min(*x, *y), max(*x, *y)
    axis.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return save_figure(figure, path)


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """Confidence against accuracy, one line per `name: (labels, probabilities)`: the top class's
    probability, binned (scikit-learn's calibration_curve), against how often that class is right.
    A calibrated model lies on the diagonal; below it, over-confident; above it, under-confident."""
    from sklearn.calibration import calibration_curve

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for name, (labels, probs) in curves.items():
        right = (probs.argmax(axis=1) == labels).astype(int)
        accuracy, confidence = calibration_curve(right, probs.max(axis=1), n_bins=10, strategy="quantile")
        axis.plot(confidence, accuracy, marker="o", label=name)
    axis.set(title=title, xlabel="top-class probability", ylabel="share right", xlim=(0, 1), ylim=(0, 1))
    axis.legend(loc="upper left")
    return save_figure(figure, path)


def matrix_plot(matrix: np.ndarray, rows: list[str], columns: list[str], path: Path, title: str, fmt: str = "{:.2f}") -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(1 + 0.8 * len(columns), 1 + 0.45 * len(rows)))
    axis.imshow(matrix, cmap="viridis", aspect="auto")
    axis.set(title=title, xticks=range(len(columns)), yticks=range(len(rows)))
    axis.set_xticklabels(columns, rotation=45)
    axis.set_yticklabels(rows)
    top = np.nanmax(matrix) if matrix.size else 1
    for (i, j), value in np.ndenumerate(matrix):
        axis.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7, color="black" if value > top / 2 else "white")
    figure.tight_layout()
    return save_figure(figure, path)
