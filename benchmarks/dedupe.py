"""Near-duplicate grouping: recall on altered copies, false merges of distinct crops.

Draws ``--crops`` distinct synthetic crops (half CEX, half PG) and ``--blank`` distinct
nearly blank frames (a grey level with faint noise or a faint gradient: the low-texture case),
then for each crop one altered, rotated/flipped copy of each kind: JPEG re-encode (quality
70-95), a 1-3 px crop off the edges, brightness +-5%, and all three together. Every file goes
through the `data check` fingerprints (``crystalscope.data.check.inspect_file``), then
``group_duplicates`` at several Hamming distances. Prints, per distance: the share of copies
grouped with their original (recall, per kind) and how many groups join distinct crops (false
merges), with the time the grouping took. Run:
    .venv/bin/python benchmarks/dedupe.py [--crops 400] [--blank 100]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from crystalscope.data.check import inspect_file
from crystalscope.data.dedupe import PHASH_DISTANCE, Fingerprint, group_duplicates
from crystalscope.parallel import ordered_map
from crystalscope.synth.crops import SynthSettings, render_group

KINDS = ("jpeg", "crop", "brightness", "all")


def alter(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A rotated/flipped copy of ``image`` changed as ``kind`` says."""
    out = image.transpose(list(Image.Transpose)[int(rng.integers(0, 7))])
    if kind in ("crop", "all"):
        w, h = out.size
        left, top, right, bottom = (int(v) for v in rng.integers(1, 4, 4))
        out = out.crop((left, top, w - right, h - bottom))
    if kind in ("brightness", "all"):
        factor = 1 + rng.choice([-1, 1]) * 0.05
        out = Image.fromarray(np.clip(np.asarray(out, np.float32) * factor, 0, 255)
                              .round().astype(np.uint8))
    if kind in ("jpeg", "all"):
        buffer = io.BytesIO()
        out.save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
        out = Image.open(io.BytesIO(buffer.getvalue())).convert("L")
    return out


def blank(rng: np.random.Generator, side: int = 151) -> Image.Image:
    """A nearly flat frame: one grey level, faint noise or a faint gradient."""
    level = rng.uniform(20, 230)
    yy, xx = np.mgrid[0:side, 0:side] / side
    image = level + rng.uniform(-2, 2) * (yy * rng.uniform(-1, 1) + xx * rng.uniform(-1, 1))
    image = image + rng.normal(0, rng.uniform(0.2, 1.0), image.shape)
    return Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))


def _fingerprint(path: Path) -> Fingerprint:
    record = inspect_file(path, "x")
    return Fingerprint(record.sha256, record.pixel_digest, record.phashes)


def build(folder: Path, crops: int, blanks: int, seed: int) -> tuple[list[Path], list[int],
                                                                      list[str]]:
    """Write the files; return paths, the original each comes from, and each file's kind."""
    rng = np.random.default_rng(seed)
    settings = SynthSettings(seed=seed)
    paths, origin, kinds = [], [], []
    for number in range(crops):
        name = ("cex", "pg")[number % 2]
        image = Image.fromarray(render_group(name, number // 2 + 1, settings)[0])
        for kind in ("original", *KINDS):
            copy = image if kind == "original" else alter(image, kind, rng)
            path = folder / f"{number:05d}-{kind}.png"
            copy.save(path)
            paths.append(path)
            origin.append(number)
            kinds.append(kind)
    for number in range(crops, crops + blanks):
        path = folder / f"{number:05d}-blank.png"
        blank(rng).save(path)
        paths.append(path)
        origin.append(number)
        kinds.append("blank")
    return paths, origin, kinds


def score(groups: list[int], origin: list[int], kinds: list[str]) -> dict[str, float]:
    group_of_original = {o: g for g, o, k in zip(groups, origin, kinds, strict=True)
                         if k in ("original", "blank")}
    result = {}
    for kind in KINDS:
        hits = [groups[i] == group_of_original[origin[i]]
                for i in range(len(groups)) if kinds[i] == kind]
        result[kind] = float(np.mean(hits))
    originals_per_group: dict[int, set[int]] = {}
    for g, o in zip(groups, origin, strict=True):
        originals_per_group.setdefault(g, set()).add(o)
    result["false_merges"] = sum(len(s) - 1 for s in originals_per_group.values())
    blank_groups = {g for g, k in zip(groups, kinds, strict=True) if k == "blank"}
    result["blank_merged"] = sum(len(originals_per_group[g]) - 1 for g in blank_groups)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=400)
    parser.add_argument("--blank", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distances", type=int, nargs="+", default=[0, 4, 6, 8, 10, 12])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths, origin, kinds = build(Path(tmp), args.crops, args.blank, args.seed)
        fingerprints = list(ordered_map(_fingerprint, paths, min_parallel=64, chunksize=16))
    print(f"dedupe benchmark: {args.crops} distinct synthetic crops, each with 4 altered "
          f"rotated/flipped copies, and {args.blank} distinct nearly blank frames "
          f"({len(paths)} files); default distance {PHASH_DISTANCE}")
    print("distance  " + "  ".join(f"{k:>10s}" for k in KINDS)
          + "  false merges  blank merged  seconds")
    for distance in args.distances:
        start = time.perf_counter()
        groups = group_duplicates(fingerprints, max_distance=distance)
        seconds = time.perf_counter() - start
        result = score(groups, origin, kinds)
        print(f"{distance:8d}  " + "  ".join(f"{result[k]:10.4f}" for k in KINDS)
              + f"  {result['false_merges']:12d}  {result['blank_merged']:12d}  {seconds:7.3f}")
    exact = [Fingerprint(f.sha256, f.pixel_digest, None) for f in fingerprints]
    result = score(group_duplicates(exact), origin, kinds)
    print("exact only (bytes + pixels): "
          + ", ".join(f"{k} {result[k]:.4f}" for k in KINDS))


if __name__ == "__main__":
    main()
