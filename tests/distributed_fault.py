"""Run by torchrun in test_distributed.py: fishcomp with a fault injected on rank 1 only."""

import os
import sys

from fishcomp.cli import main
from fishcomp.stages import precompute

if int(os.environ["RANK"]) == 1:

    def broken(self, item):
        raise RuntimeError("disk read error on rank 1")

    precompute.DecodedViews.__getitem__ = broken

main(sys.argv[1:])
