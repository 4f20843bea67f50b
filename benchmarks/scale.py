"""Every stage at 10^4, 10^5 (and 10^6) crops: wall time, peak memory, growth exponent.

Each stage runs in a process of its own, as a user runs it (the CLI), or, for stages that are
library calls (dedupe, the training cache, the vector store, explore's output stage), in a
child process of this script; the peak resident memory is sampled over the whole process tree
(workers included, every 0.1 s). The growth exponent between two sizes is
log(t2 / t1) / log(n2 / n1): 1 is linear, 2 quadratic.

The crops are the issue's case: N distinct 12 x 12 grey PNGs (random pixels) in two class
folders (6,860 : 6,804 as in the public set). Stages that need a model use a ResNet-18 trained
here for one epoch at 32 px and exported (its 512-value embeddings go to the vector store).

Stages: dedupe (group_duplicates on N files' worth of random 8-variant pHashes), check (`data
check --json`), split (`split --seed 1`, copies), cache (decoding N crops into the training
cache), predict (`predict --format csv`), predict-ray (`predict --engine ray`, a local Ray),
index (`index` into LanceDB), similar (`similar`, one query, model load included), vectors
(LanceDB with N synthetic 512-d vectors: kNN p50 over 200 queries and recall@10 against numpy's
exact cosine neighbours), explore (explore's whole output stage on N 2048-d embeddings), label
(`label` without a model: seconds until the page answers, then 300 decisions' latency over
HTTP), watch (`monitor --watch` over N crops in 100 time folders: crops per second).

Run (10^4 and 10^5; add --million for the stages that take tiny inputs: dedupe, split,
vectors):
    .venv/bin/python benchmarks/scale.py [--sizes 10000 100000] [--stages split label ...]
        [--million] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
CLI = [sys.executable, "-m", "crystalscope.cli"]
STAGES = ("dedupe", "check", "split", "cache", "predict", "predict-ray", "index", "similar",
          "vectors", "explore", "label", "watch")
MILLION_STAGES = ("dedupe", "split", "vectors")


# ----------------------------------------------------------------------------- measuring


def tree_rss(process: object) -> int:
    """Resident bytes of a psutil process and all its descendants."""
    import psutil

    total = 0
    for member in [process, *process.children(recursive=True)]:  # type: ignore[attr-defined]
        with contextlib.suppress(psutil.Error):  # a worker that just ended
            total += member.memory_info().rss
    return total


def measure(command: list[str], log: Path, *, until: object = None) -> dict:
    """Run ``command``; wall seconds and peak tree RSS (MiB). ``until(process)``: for a server,
    a function that does the measuring and returns extra numbers, after which it is stopped."""
    import psutil

    peak = 0
    with log.open("w") as out:
        start = time.perf_counter()
        process = psutil.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                with contextlib.suppress(psutil.Error):
                    peak = max(peak, tree_rss(process))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        extra = {}
        try:
            if until is not None:
                extra = until(process)  # type: ignore[operator]
                process.terminate()
            code = process.wait()
        finally:
            done.set()
            sampler.join()
        seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if until is None and code not in (0, 1, 3):  # 3: monitor raised its alarm
        raise RuntimeError(f"{' '.join(command[:6])}... exited {code}:\n{text[-2000:]}")
    for line in text.splitlines():  # a child stage reports its own numbers as JSON
        if line.startswith("SCALE "):
            extra.update(json.loads(line[6:]))
    return {"seconds": extra.pop("seconds", seconds), "peak_mib": peak / 2**20, **extra}


def child(stage: str, n: int, work: Path) -> list[str]:
    return [sys.executable, str(HERE), "--child", stage, str(n), "--work", str(work)]


def report(numbers: dict) -> None:
    print("SCALE " + json.dumps(numbers), flush=True)


# ----------------------------------------------------------------------------- inputs


def make_crops(folder: Path, n: int, seed: int = 0) -> Path:
    """N distinct 12 x 12 grey PNGs in cex/ and pg/ (written once per size)."""
    from PIL import Image

    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    first_pg = n * 6860 // 13664
    for name in ("cex", "pg"):
        (folder / name).mkdir(parents=True)
    for i in range(n):
        name = "cex" if i < first_pg else "pg"
        pixels = rng.integers(0, 256, (12, 12), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name / f"{i:07d}.png", compress_level=1)
    done.touch()
    return folder


def make_model(work: Path) -> Path:
    """A ResNet-18 run, one epoch at 32 px on 120 synthetic crops, exported."""
    run = work / "model" / "runs" / "tiny"
    if (run / "model.onnx").is_file():
        return run
    base = work / "model"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    for args in (["synth", str(base / "images"), "--per-class", "60", "--size", "64",
                  "--seed", "3"],
                 ["split", str(base / "images"), str(base / "splits")],
                 ["train", str(base / "splits"), "--model", "resnet18", "--weights", "none",
                  "--image-size", "32", "--epochs", "1", "--trainable", "1.0", "--name",
                  "tiny", "--runs-dir", str(base / "runs")]):
        subprocess.run([*CLI, *args], check=True, capture_output=True)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- child stages


def child_dedupe(n: int) -> None:
    from crystalscope.data.dedupe import Fingerprint, SearchStats, group_duplicates

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64 - 1, (n, 8), dtype=np.uint64, endpoint=True)
    prints = [Fingerprint(f"{i:064x}", f"{i:040x}", tuple(row)) for i, row in
              enumerate(hashes.tolist())]
    del hashes
    stats = SearchStats()
    start = time.perf_counter()
    groups = group_duplicates(prints, stats=stats)
    report({"seconds": time.perf_counter() - start, "candidates_per_file": stats.candidates / n,
            "groups": len(set(groups))})


def child_cache(n: int, work: Path) -> None:
    from crystalscope.data.decoded import build_cache
    from crystalscope.data.layout import list_files
    from crystalscope.model.spec import ModelSpec

    crops = work / f"crops-{n}"
    items = [(p, label) for label, name in enumerate(("cex", "pg"))
             for p in list_files(crops / name)]
    start = time.perf_counter()
    cache = build_cache(items, ModelSpec(32, ("cex", "pg")))
    report({"seconds": time.perf_counter() - start, "cached": len(cache.paths)})


def child_vectors(n: int, work: Path) -> None:
    from crystalscope.vectors.lance import LanceStore
    from crystalscope.vectors.store import Record

    dim, queries, k = 512, 200, 10
    rng = np.random.default_rng(0)
    centres = np.maximum(rng.normal(size=(200, dim)), 0).astype(np.float32)
    folder = work / f"vectors-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    store = LanceStore(folder, dimension=dim)
    start = time.perf_counter()
    data = np.empty((n, dim), dtype=np.float32)
    for begin in range(0, n, 20_000):  # written in batches, as index writes
        count = min(20_000, n - begin)
        block = centres[rng.integers(0, 200, count)] + 0.15 * np.abs(
            rng.normal(size=(count, dim))).astype(np.float32)
        data[begin:begin + count] = block
        store.upsert([Record(id=f"{begin + i:08d}", vector=block[i], path="", sha256="",
                             predicted="cex", probabilities={"cex": 1.0})
                      for i in range(count)])
    store.flush()  # as `index` does after its writes: the ANN index, built once
    insert_s = time.perf_counter() - start
    picks = rng.integers(0, n, queries)
    query = data[picks] + 0.05 * np.abs(rng.normal(size=(queries, dim))).astype(np.float32)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    del data
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    truth = np.argsort(-(q @ unit.T), axis=1)[:, :k]  # numpy's exact cosine neighbours
    del unit
    store.nearest(query[0], k)  # opens the index
    latencies, hits = [], 0
    for vector, expected in zip(query, truth, strict=True):
        t = time.perf_counter()
        found = store.nearest(vector, k)
        latencies.append(time.perf_counter() - t)
        hits += len({int(nb.record.id) for nb in found} & set(expected.tolist()))
    report({"seconds": insert_s, "p50_ms": 1000 * float(np.median(latencies)),
            "p95_ms": 1000 * float(np.percentile(latencies, 95)),
            "recall_at_10": hits / (k * queries),
            "self_reported_recall": store.info().details.get("recall_at_10")})


def child_explore(n: int, work: Path) -> None:
    from crystalscope.explore.projection import Points
    from crystalscope.explore.stage import explore_points

    rng = np.random.default_rng(0)
    dim = 2048
    truth = rng.integers(0, 4, n)
    centres = rng.normal(size=(4, dim)).astype(np.float32)
    embeddings = rng.standard_normal((n, dim), dtype=np.float32)  # no float64 temporary
    embeddings *= 1.5
    embeddings += centres[truth]
    predicted = [("cex", "pg")[t % 2] for t in truth]
    points = Points(paths=[f"crops/{i:07d}.png" for i in range(n)], embeddings=embeddings,
                    classes=["cex", "pg"], predicted=predicted,
                    probability=rng.uniform(0.5, 1.0, n), true=predicted)
    out = work / f"explore-{n}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = explore_points(points, out, k=4)
    report({"seconds": time.perf_counter() - start, "clusters": result.projection.k})


# ----------------------------------------------------------------------------- stages


def stage_label(n: int, work: Path, crops: Path) -> dict:
    out = work / f"label-{n}"
    shutil.rmtree(out, ignore_errors=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def drive(process: object) -> dict:
        start = time.perf_counter()
        while True:
            if process.poll() is not None:  # type: ignore[attr-defined]
                raise RuntimeError("label exited before answering")
            try:
                with urllib.request.urlopen(base + "/api/state", timeout=5) as answer:
                    json.load(answer)
                break
            except OSError:
                time.sleep(0.2)
        ready = time.perf_counter() - start
        latencies = []
        for i in range(300):
            body = json.dumps({"label": ("cex", "pg")[i % 2]}).encode()
            request = urllib.request.Request(base + "/api/label", data=body,
                                             headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as answer:
                json.load(answer)
            latencies.append(time.perf_counter() - t)
        return {"seconds": ready, "decision_p50_ms": 1000 * float(np.median(latencies)),
                "decision_p95_ms": 1000 * float(np.percentile(latencies, 95)),
                "decision_max_ms": 1000 * float(np.max(latencies))}

    return measure([*CLI, "label", str(crops), "--out", str(out), "--classes", "cex,pg",
                    "--port", str(port)], work / "label.log", until=drive)


def stage_watch(n: int, work: Path, crops: Path, model: Path) -> dict:
    stream, out = work / f"stream-{n}", work / f"watch-{n}"
    shutil.rmtree(out, ignore_errors=True)
    if not (stream / ".complete").is_file():
        shutil.rmtree(stream, ignore_errors=True)
        files = sorted(crops.rglob("*.png"))
        per_window = math.ceil(len(files) / 100)
        for w in range(100):
            folder = stream / f"t{w:04d}"
            folder.mkdir(parents=True)
            for path in files[w * per_window:(w + 1) * per_window]:
                os.link(path, folder / path.name)
        (stream / ".complete").touch()
    idle = 3.0
    result = measure([*CLI, "monitor", str(model), str(stream), "--positive", "pg",
                      "--false-positive-rate", "0.05", "--watch", "--poll", "0.5",
                      "--settle", "0.5", "--stop-when-idle", str(idle), "--out", str(out)],
                     work / "watch.log")
    busy = max(result["seconds"] - idle, 1e-9)
    return {**result, "crops_per_s": n / busy}


def run_stage(stage: str, n: int, work: Path) -> dict:
    log = work / f"{stage}-{n}.log"
    if stage in ("dedupe", "cache", "vectors", "explore"):
        if stage == "cache":
            make_crops(work / f"crops-{n}", n)
        return measure(child(stage, n, work), log)
    crops = make_crops(work / f"crops-{n}", n)
    if stage == "check":
        return measure([*CLI, "data", "check", str(crops), "--json"], log)
    if stage == "split":
        dest = work / f"split-{n}"
        shutil.rmtree(dest, ignore_errors=True)
        result = measure([*CLI, "split", str(crops), str(dest), "--seed", "1"], log)
        shutil.rmtree(dest, ignore_errors=True)
        return result
    if stage == "label":
        return stage_label(n, work, crops)
    model = make_model(work)
    if stage == "watch":
        return stage_watch(n, work, crops, model)
    if stage in ("predict", "predict-ray"):
        output = work / f"{stage}-{n}.csv"
        output.unlink(missing_ok=True)
        engine = ["--engine", "ray"] if stage == "predict-ray" else []
        result = measure([*CLI, "predict", str(model), str(crops), "--format", "csv",
                          "--output", str(output), "--batch-size", "256", *engine], log)
        return {**result, "rows": sum(1 for _ in output.open()) - 1}
    store = work / f"store-{n}.lance"
    if stage == "index":
        shutil.rmtree(store, ignore_errors=True)
        result = measure([*CLI, "index", str(model), str(crops), "--store", str(store),
                          "--batch-size", "256", "--json"], log)
        text = log.read_text()
        summary = json.loads(text[text.rfind("\n{") + 1:])  # --json: the last object
        return {**result, "ann_recall_at_10": summary.get("ann_recall_at_10")}
    if stage == "similar":
        query = next((crops / "pg").iterdir())
        return measure([*CLI, "similar", str(model), str(query), "--store", str(store),
                        "--json"], log)
    raise ValueError(stage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--million", action="store_true",
                        help="also 10^6 for dedupe, split and vectors")
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder (kept, so inputs are made once); default: a "
                             "temporary one")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, n = args.child[0], int(args.child[1])
        {"dedupe": lambda: child_dedupe(n), "cache": lambda: child_cache(n, args.work),
         "vectors": lambda: child_vectors(n, args.work),
         "explore": lambda: child_explore(n, args.work)}[stage]()
        return
    temporary = None if args.work else tempfile.TemporaryDirectory()
    work = args.work or Path(temporary.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    print(f"scale benchmark: {os.cpu_count()} cores; stages {', '.join(args.stages)}",
          flush=True)
    try:
        for stage in args.stages:
            sizes = sorted(set(args.sizes) | ({1_000_000} if args.million and stage in
                                              MILLION_STAGES else set()))
            previous = None
            for n in sizes:
                result = run_stage(stage, n, work)
                growth = "" if previous is None else "  growth exponent {:.2f}".format(
                    math.log(result["seconds"] / previous[1]) / math.log(n / previous[0]))
                extra = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in result.items() if k not in ("seconds", "peak_mib"))
                print(f"{stage:12s} N={n:>9,}  {result['seconds']:9.1f} s  peak "
                      f"{result['peak_mib']:7,.0f} MiB{growth}  {extra}", flush=True)
                previous = (n, result["seconds"])
    finally:
        if temporary:
            temporary.cleanup()


if __name__ == "__main__":
    main()
