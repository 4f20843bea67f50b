"""Vector store speed and accuracy: insert rate, query latency p50/p99 and recall@10.

Vectors imitate pooled CNN features: non-negative, in tight clusters (many near-identical
crystals), of the model's embedding size. Recall@10 is measured against numpy's exact cosine
neighbours. Run:
    .venv/bin/python benchmarks/vectors.py [--sizes 10000 100000] [--dim 2048] [--queries 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from crystalscope.vectors.lance import LanceStore
from crystalscope.vectors.store import Record


def clustered(n: int, dim: int, rng: np.random.Generator, clusters: int = 200) -> np.ndarray:
    centres = np.maximum(rng.normal(size=(clusters, dim)), 0)
    points = centres[rng.integers(0, clusters, n)] + 0.15 * np.abs(rng.normal(size=(n, dim)))
    return points.astype(np.float32)


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(q @ unit.T), axis=1)[:, :k]


def measure(n: int, dim: int, queries: int, folder: Path) -> dict[str, float]:
    rng = np.random.default_rng(0)
    data = clustered(n, dim, rng)
    store = LanceStore(folder / f"store-{n}", dimension=dim)
    records = [Record(id=f"{i:08d}", vector=data[i], path=f"img{i}.png", sha256="",
                      predicted="cex", probabilities={"cex": 1.0}) for i in range(n)]
    start = time.perf_counter()
    for begin in range(0, n, 5000):
        store.upsert(records[begin:begin + 5000])
    store.flush()  # as `index` does after its writes
    insert_s = time.perf_counter() - start
    picks = rng.integers(0, n, queries)
    query_vectors = data[picks] + 0.05 * np.abs(rng.normal(size=(queries, dim))).astype(
        np.float32)
    truth = exact_top_k(data, query_vectors, 10)
    latencies, hits = [], 0
    store.nearest(query_vectors[0], 10)  # warm-up: opens the index
    for q, expected in zip(query_vectors, truth, strict=True):
        t = time.perf_counter()
        found = store.nearest(q, 10)
        latencies.append(time.perf_counter() - t)
        hits += len({int(nb.record.id) for nb in found} & set(expected.tolist()))
    return {"insert_per_s": n / insert_s, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "recall_at_10": hits / (10 * queries), "indexed": float(store.info().indexed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=2048, help="resnet50: 2048, resnet18: 512")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"LanceDB, {args.dim}-d clustered vectors, cosine, {args.queries} queries, k=10")
        for n in args.sizes:
            r = measure(n, args.dim, args.queries, Path(tmp))
            print(f"{n:>7} vectors: insert {r['insert_per_s']:8.0f}/s (index build included)   "
                  f"query p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms   "
                  f"recall@10 {r['recall_at_10']:.3f}   "
                  f"{'ANN index' if r['indexed'] else 'exact scan'}", flush=True)


if __name__ == "__main__":
    main()
