"""Images per second of `crystalscope synth` (rendering + PNG writing), serial and parallel.

Run:  .venv/bin/python benchmarks/synth.py [--per-class 500]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from crystalscope.synth.crops import SynthSettings, synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=500)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"synth benchmark: {2 * args.per_class} crops (151 px CEX, 132-230 px PG), "
          f"{cores} cores")
    for difficulty in (0.0, 1.0):
        for workers in sorted({1, cores}):
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                synthesize(Path(folder) / "out", SynthSettings(per_class=args.per_class,
                                                               difficulty=difficulty),
                           workers=workers)
                seconds = time.perf_counter() - start
            print(f"difficulty {difficulty:.1f}, workers {workers}: "
                  f"{2 * args.per_class / seconds:7.1f} images/s ({seconds:.2f} s)")


if __name__ == "__main__":
    main()
