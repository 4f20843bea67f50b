"""The image-quality gate against the probe's own failure modes (issue 30, item 1).

Per seed: synthesises ``--per-class`` CEX + PG crops (151 px, as a probe cuts them) and fits
the gate on them, decoded at each ``--sizes`` input side; then draws ``--per-kind`` images of
each unknown kind (``crystalscope synth unknown``) and 600 fresh crystals with another seed,
and prints, per kind, the share the gate flags and with which reason, the share of fresh
crystals it flags (the gate's false rejects), and how many of the real crops in ``--real``
(default: ../shared/data/opencrystal-samples) it flags. Nothing is fitted on the real crops
or the unknown images. Numpy and scipy only (no model): the gate does not look at the network.

``--speed N``: only time the measurements and the unknown-detector's appearance descriptor on N
random crops per size (crops/s, and the minutes 10^6 crops would take); the appearance kNN per
crop against a bank at its limit; the gate's fit and decision at 10^6 rows.

Run:
    .venv/bin/python benchmarks/quality_gate.py [--seeds 1 2 3] [--sizes 64 96 224]
    .venv/bin/python benchmarks/quality_gate.py --speed 2000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from crystalscope.model.spec import ModelSpec, decode
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.synth.unknown import KINDS, UnknownSettings, synthesize_unknown
from crystalscope.unknown.appearance import (
    BANK_LIMIT,
    CHUNK,
    DESCRIPTOR_SIZE,
    AppearanceNeighbours,
    appearance,
)
from crystalscope.unknown.quality import MEASURES, REASONS, QualityGate, measure

DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "opencrystal-samples"


def decoded(paths: list[Path], size: int) -> np.ndarray:
    spec = ModelSpec(size, ("cex", "pg"))
    return np.stack([decode(path, spec)[0] for path in paths])


def speed(crops: int, sizes: list[int]) -> None:
    """Time ``measure`` per input side, and the gate's fit and decision at 10^6 rows."""
    rng = np.random.default_rng(0)
    for size in sizes:
        images = rng.integers(0, 256, (crops, 3, size, size), dtype=np.uint8)
        for label, up_to in (("measure", -np.inf), ("measure with lines", None)):
            start = time.perf_counter()
            measure(images, lines_up_to=up_to)
            rate = crops / (time.perf_counter() - start)
            print(f"{label} at {size:3d} px: {rate:6.0f} crops/s; 10^6 crops: "
                  f"{1e6 / rate / 60:.1f} min (one crop in flight: memory O(side^2))")
        start = time.perf_counter()
        appearance(images)
        rate = crops / (time.perf_counter() - start)
        print(f"appearance descriptor at {size:3d} px: {rate:6.0f} crops/s; 10^6 crops: "
              f"{1e6 / rate / 60:.1f} min (measured at <= 96 px whatever the input)")
    bank = rng.normal(size=(BANK_LIMIT, DESCRIPTOR_SIZE))
    start = time.perf_counter()
    neighbours = AppearanceNeighbours.fit(bank)
    fitted = time.perf_counter() - start
    queries = rng.normal(size=(10_000, DESCRIPTOR_SIZE))
    start = time.perf_counter()
    neighbours(queries)
    per_crop = (time.perf_counter() - start) / len(queries)
    start = time.perf_counter()
    neighbours.leave_one_out()
    calibration = time.perf_counter() - start
    print(f"appearance kNN, bank {BANK_LIMIT:,} (the limit): fit (whitening) {fitted:.2f} s; "
          f"{1e3 * per_crop:.3f} ms per crop (10^6 crops: {1e6 * per_crop / 60:.1f} min; "
          f"memory O({CHUNK} x bank)); leave-one-out calibration of the whole bank "
          f"{calibration:.1f} s (O(bank^2))")
    rows = rng.random((10**6, len(MEASURES)))
    start = time.perf_counter()
    gate = QualityGate.fit(rows)
    fitted = time.perf_counter() - start
    start = time.perf_counter()
    gate.reasons(rows)
    print(f"fit on 10^6 crops: {fitted:.2f} s (a sort per measure); reasons for 10^6: "
          f"{time.perf_counter() - start:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 224])
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--speed", type=int, default=0, help="only time the measurements")
    args = parser.parse_args()
    if args.speed:
        speed(args.speed, args.sizes)
        return
    real = sorted(args.real.glob("*.png"))
    rates: dict[tuple[int, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root = Path(tmp) / f"seed{seed}"
            synthesize(root / "train", SynthSettings(per_class=args.per_class, seed=seed))
            synthesize(root / "fresh", SynthSettings(per_class=300, seed=1000 + seed))
            synthesize_unknown(root / "unknown", UnknownSettings(per_kind=args.per_kind,
                                                                 seed=2000 + seed))
            for size in args.sizes:
                gate = QualityGate.fit_images(decoded(sorted((root / "train").rglob("*.png")),
                                                      size))
                sets = {"fresh crystals": sorted((root / "fresh").rglob("*.png")),
                        **{kind: sorted((root / "unknown" / kind).glob("*.png"))
                           for kind in KINDS}}
                if real:
                    sets["real crops"] = real
                for name, paths in sets.items():
                    reasons = gate.reasons(gate.measure(decoded(paths, size)))
                    flagged = sum(r is not None for r in reasons)
                    rates.setdefault((size, name), []).append(flagged / len(paths))
                    detail = ", ".join(f"{k} {reasons.count(k)}" for k in REASONS
                                       if reasons.count(k))
                    print(f"seed {seed} size {size:3d}  {name:15s} flagged {flagged:4d} of "
                          f"{len(paths):4d}" + (f" ({detail})" if detail else ""), flush=True)
    print(f"\nmean over {len(args.seeds)} seeds: share flagged by the gate")
    print("size  " + "  ".join(f"{name:>15s}" for name in
                               sorted({name for _, name in rates}, key=list(dict.fromkeys(
                                   n for _, n in rates)).index)))
    for size in args.sizes:
        names = [name for (s, name) in rates if s == size]
        print(f"{size:4d}  " + "  ".join(f"{np.mean(rates[(size, n)]):15.3f}" for n in names))


if __name__ == "__main__":
    main()
