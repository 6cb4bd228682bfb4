"""How many images a backbone call should take on this CPU.

    python scripts/bench_backbone_calls.py [--images 48] [--out docs/results.md [--marker backbone-calls]]

For each backbone and size the pipeline embeds at (lite0 at 224x224 for the crops and the 224
members, lite2 at 260x260, lite0 at 360x640), the milliseconds per image of the bare backbone
(forward_features and pooling on random tensors, the stages' precision, this process's threads)
at 1, 2, 3, 4, 8, 16 and 32 images a call and at what `precompute.cpu_chunk: auto` picks
(fishcomp.features.CPU_CALL_PIXELS), the fastest of --rounds measurements of each. Prints a table (or writes it into --out between
`<!-- MARKER:start -->` and `<!-- MARKER:end -->`) and ends with
`ratio=<auto's time / the fastest tried, worst over the sizes> target=1.15`: the rule is within
15 % of the best setting tried on this machine.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench_precompute import bare_backbone
from compare import write_section

CALLS = (1, 2, 3, 4, 8, 16, 32)
PASSES = (("efficientnet_lite0", (224, 224)), ("efficientnet_lite2", (260, 260)), ("efficientnet_lite0", (360, 640)))


def main() -> None:
    import torch

    from fishcomp.config import PrecomputeConfig
    from fishcomp.features import Embedder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images per measurement (a multiple of every call size is fairest)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each setting; the fastest is kept")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--marker", default="backbone-calls")
    args = parser.parse_args()
    from fishcomp.context import describe_machine

    print(f"machine: {describe_machine()}", flush=True)
    lines = [f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
             f"milliseconds per image of the bare backbone, by images a call, the fastest of {args.rounds} measurements "
             "(**auto**'s choice in bold):", "",
             "| backbone | size | " + " | ".join(str(c) for c in CALLS) + " | auto | auto vs 32 a call |",
             "|---|---|" + "---|" * (len(CALLS) + 2)]
    ratios = []
    for backbone, size in PASSES:
        config = PrecomputeConfig(backbone=backbone, size=size)
        auto = Embedder(config, torch.device("cpu")).images_per_call(*size, 32)
        # Rounds over every setting in turn, the fastest of each kept: this machine's noise only
        # ever adds time, and a drift in its speed then touches every setting alike.
        ms = {calls: float("inf") for calls in sorted({*CALLS, auto})}
        for _ in range(args.rounds):
            for calls in ms:
                ms[calls] = min(ms[calls], 1000 / bare_backbone(size, args.images, per_call=calls, backbone=backbone))
        ratios.append(ms[auto] / min(ms.values()))
        cells = [f"**{ms[c]:.1f}**" if c == auto else f"{ms[c]:.1f}" for c in CALLS]
        lines.append(f"| {backbone} | {size[0]}x{size[1]} | " + " | ".join(cells) + f" | {auto}: {ms[auto]:.1f} | {ms[32] / ms[auto]:.2f}x |")
        print(lines[-1], flush=True)
    command = "`python scripts/bench_backbone_calls.py" + (f" --images {args.images}" if args.images != 48 else "") + (
        f" --rounds {args.rounds}" if args.rounds != 3 else "") + "`"
    text = "\n".join([*lines, "", command])
    if args.out:
        write_section(args.out, text, args.marker)
    print(text)
    print(f"ratio={max(ratios):.3f} target=1.15")


if __name__ == "__main__":
    main()
