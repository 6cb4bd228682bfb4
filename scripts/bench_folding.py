"""Frozen passes (float32, and bfloat16 on a CPU that computes it natively) with their batch norms
folded into the convolutions, against the same passes with the norms as operations of their own.

    python scripts/bench_folding.py [--images 48] [--rounds 3]

For each backbone and size the pipeline embeds at, and each precision a frozen pass folds in, the
milliseconds per image of the bare backbone (forward_features and pooling on random tensors, as
many images a call as the stages use on this machine), unfolded and folded, the fastest of
--rounds measurements each (alternating, so that a drift in this machine's speed touches both
alike). Ends with `ratio=<folded time / unfolded time, the worst over sizes and precisions>
target=1.0`: folding must never cost time.
"""

from __future__ import annotations

import argparse

from bench_precompute import bare_backbone

PASSES = (("efficientnet_lite0", (224, 224)), ("efficientnet_lite2", (260, 260)), ("efficientnet_lite0", (360, 640)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each; the fastest is kept")
    args = parser.parse_args()
    from fishcomp.allocator import keep_freed_memory
    from fishcomp.context import cpu_has_bf16, describe_machine

    keep_freed_memory()  # as the CLI's processes run: without it each pass also pays for its allocations
    print(f"machine: {describe_machine()}", flush=True)
    # bf16 on a CPU without it runs emulated, far slower than float32: not a pass anyone runs.
    precisions = ("fp32", "bf16") if cpu_has_bf16() else ("fp32",)
    ratios = []
    for precision in precisions:
        for backbone, size in PASSES:
            ms = {False: float("inf"), True: float("inf")}
            for _ in range(args.rounds):
                for folded in ms:
                    ms[folded] = min(ms[folded], 1000 / bare_backbone(size, args.images, precision, backbone=backbone, folded=folded))
            ratios.append(ms[True] / ms[False])
            print(f"{backbone} {size[0]}x{size[1]} {precision}: unfolded {ms[False]:.1f} ms/img, folded {ms[True]:.1f} ms/img "
                  f"({ms[False] / ms[True]:.2f}x faster)", flush=True)
    print(f"ratio={max(ratios):.3f} target=1.0")


if __name__ == "__main__":
    main()
