"""`explore` at scale: time and peak memory for 10^5 stored embeddings.

Builds ``--rows`` embeddings of ``--dim`` dimensions in a few planted clusters (as
`explore --store` reads them from a vector store), then runs explore's whole output stage —
PCA map, k-means, cluster summary, map.png, map.html, graph.html (a cluster-stratified sample),
clusters.json — and prints the seconds and the process's peak resident memory. Run:
    .venv/bin/python benchmarks/explore.py [--rows 100000] [--dim 2048]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from crystalscope.explore.projection import Points
from crystalscope.explore.stage import explore_points


def peak_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", default="4")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, args.rows)
    centres = rng.normal(size=(4, args.dim)).astype(np.float32)
    embeddings = centres[truth] + rng.normal(scale=1.5, size=(args.rows, args.dim)).astype(
        np.float32)
    classes = ["cex", "pg"]
    predicted = [classes[t % 2] for t in truth]
    points = Points(paths=[f"crops/{i:06d}.png" for i in range(args.rows)],
                    embeddings=embeddings, classes=classes, predicted=predicted,
                    probability=rng.uniform(0.5, 1.0, args.rows), true=predicted)
    before = peak_mib()
    print(f"explore benchmark: {args.rows:,} embeddings x {args.dim} "
          f"({embeddings.nbytes / 2**20:,.0f} MiB as float32), k={args.k}; "
          f"peak memory before: {before:,.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = explore_points(points, Path(tmp), k=int(args.k) if args.k.isdigit() else args.k)
        seconds = time.perf_counter() - start
        sizes = {name: path.stat().st_size / 2**20 for name, path in result.files.items()}
    print(f"  {seconds:.1f} s; peak memory {peak_mib():,.0f} MiB "
          f"(+{peak_mib() - before:,.0f} MiB for the stage)")
    print("  files: " + ", ".join(f"{name} {size:.1f} MiB" for name, size in sizes.items()))
    print(f"  clusters: {result.projection.k}, purity "
          + ", ".join(f"{c['purity']:.2f}" for c in result.clusters))


if __name__ == "__main__":
    main()
