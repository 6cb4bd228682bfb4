"""Precompute speed against the bare backbone, and memory against the number of images.

    python scripts/bench_precompute.py [--images 96] [--sizes 224x224 360x640]

Speed is measured on 4 x --images images, memory on --images and 4 x --images.

Speed: images per second of the real precompute stage (decode, resize, backbone, float16
memory-mapped writes) on synthetic camera-sized JPEGs, against the backbone's forward pass alone
on random tensors of the same shape, images per backbone call and torch thread count, in the same process
(measured just before and just after the stage, and averaged). Also the decoding alone, and the
ceiling it puts on the ratio: model time / (model time + decoding time) per image.
The same at the first size with dense_aug.yaml's augmented copies and test-time views, each
photo decoded once for all of them.
Memory: the peak RSS (main process plus loader workers) of `fishcomp precompute` in a fresh
process for N and for 4N images. Last line: `ratio=<precompute/bare at the first size> target=0.85`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dense.yaml"
# Augmented copies of the train photos and test-time views: every photo decoded once for them all.
VIEWS_CONFIG = CONFIG.with_name("dense_aug.yaml")


def make_data(root: Path, images: int) -> Path:
    from fishcomp.data.synth import synthesize

    if not (root / "train").is_dir():
        synthesize(root, n_train=images, n_test=1, n_stage2=0, seed=11)
    return root


def bare_backbone(size: tuple[int, int], images: int, precision: str = "auto", per_call: int | None = None,
                  backbone: str = "efficientnet_lite0", folded: bool = True) -> float:
    """Images per second of forward_features + pooling on random tensors, in the arithmetic the
    stage uses (`precision`, resolved as precompute resolves it), `per_call` images a call (None:
    as the stages call the backbone on this machine, `Embedder.images_per_call` of a batch of 32):
    the ceiling. `folded=False`: the model with its batch norms as operations of their own (a
    frozen float32 pass folds them; fishcomp/models/folding.py)."""
    import torch

    from fishcomp.config import PrecomputeConfig
    from fishcomp.context import autocast
    from fishcomp.features import Embedder

    cpu = torch.device("cpu")
    embedder = Embedder(PrecomputeConfig(backbone=backbone, size=size, precision=precision), cpu, frozen=folded)
    model, per_call = embedder.model, per_call or embedder.images_per_call(*size, 32)
    batch = torch.randn(per_call, 3, *size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(embedder.autocast_dtype, cpu):
        model.forward_head(model.forward_features(batch), pre_logits=True)  # warm-up
        started, done = time.perf_counter(), 0
        while done < images:
            model.forward_head(model.forward_features(batch), pre_logits=True)
            done += per_call
    return done / (time.perf_counter() - started)


def decode_rate(data: Path, size: tuple[int, int], batch_size: int = 32) -> float:
    """Images per second of the stage's decoding alone (decode, resize, collate), the way the
    stage does it on this machine (`workers: auto`), no model: what the loop adds to the model."""
    import torch

    from fishcomp.features import DecodedImages, image_batches

    paths = sorted(str(p.relative_to(data)) for p in (data / "train").rglob("*.jpg"))
    images = DecodedImages(data, paths, size)
    started = time.perf_counter()
    for _ in image_batches(images, batch_size, "auto", torch.device("cpu")):
        pass
    return len(paths) / (time.perf_counter() - started)


def precompute_speed(data: Path, size: tuple[int, int], work: Path, precision: str = "auto", config: Path = CONFIG) -> tuple[float, dict]:
    """Images per second of the stage, every augmented copy and test-time view counted as one."""
    from fishcomp.config import load_config
    from fishcomp.context import Context
    from fishcomp.pipeline import build

    loaded = load_config(config, [f"precompute.size=[{size[0]},{size[1]}]", f"precompute.precision={precision}"])
    artifact = build(Context(data_dir=data, work_dir=work), "precompute", loaded)
    meta = json.loads(artifact.file("meta.json").read_text())
    return meta["images_per_second"], meta


def peak_rss_mib(data: Path, work: Path) -> float:
    """Peak RSS of a fresh `fishcomp precompute` process and its loader workers, in MiB."""
    code = (
        "import resource, sys; from fishcomp.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print('RSS', own + workers)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "precompute", "-c", str(CONFIG), "--data", str(data), "--work", str(work)],
        capture_output=True, text=True, env={**os.environ, "FISHCOMP_NO_PROGRESS": "1"}, check=True,
    )
    line = [l for l in result.stdout.splitlines() if l.startswith("RSS")][-1]
    return int(line.split()[1]) / 1024


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--sizes", nargs="*", default=["224x224", "360x640"])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    os.environ.setdefault("FISHCOMP_NO_PROGRESS", "1")
    from fishcomp.context import describe_machine

    print(f"machine: {describe_machine()}; "
          f"workers: auto on the CPU decodes each batch with {torch.get_num_threads()} threads between the model's batches")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Speed on the larger set, where loader start-up is a small share of the time.
        large = make_data(tmp / "data4", 4 * args.images)
        for text in args.sizes:
            size = tuple(int(v) for v in text.split("x"))
            # The bare pass before and after, averaged: this machine's speed drifts within a run.
            before = bare_backbone(size, 4 * args.images, args.precision)
            fast, meta = precompute_speed(large, size, tmp / f"work-{text}", args.precision)
            bare = (before + bare_backbone(size, meta["counts"]["total"], args.precision)) / 2
            ratios.append(fast / bare)
            decoded = decode_rate(large, size)
            # The loop alternates decoding and the model (see fishcomp.features.image_batches), so
            # it cannot beat one image's model time over model plus decoding time.
            ceiling = (1 / bare) / (1 / bare + 1 / decoded)
            print(f"{text} ({meta['precision']}): precompute {fast:.1f} img/s, bare backbone {bare:.1f} img/s, ratio {fast / bare:.2f}; "
                  f"decoding alone {decoded:.1f} img/s, so at most {ceiling:.2f} while decoding alternates with the model")
            if text == args.sizes[0]:
                # One decode a photo serves all of its views: the more views, the nearer the bare pass.
                viewed, meta = precompute_speed(large, size, tmp / f"work-views-{text}", args.precision, VIEWS_CONFIG)
                views = meta["augment_copies"] * meta["counts"]["train"] / meta["counts"]["total"] + meta["tta_views"]
                print(f"{text} with {VIEWS_CONFIG.name}'s {meta['augment_copies']} copies and {meta['tta_views']} views "
                      f"({views:.2f} passes a photo, one decode): {viewed:.1f} img/s, ratio {viewed / bare:.2f}")
        if not args.skip_memory:
            small_rss = peak_rss_mib(make_data(tmp / "data", args.images), tmp / "rss-n")
            large_rss = peak_rss_mib(large, tmp / "rss-4n")
            print(f"peak RSS: {args.images} images {small_rss:.0f} MiB, {4 * args.images} images {large_rss:.0f} MiB, "
                  f"ratio {large_rss / small_rss:.2f} (target <= 1.2)")
    print(f"ratio={ratios[0]:.3f} target=0.85")


if __name__ == "__main__":
    main()
