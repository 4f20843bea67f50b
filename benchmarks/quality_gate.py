"""The image-quality gate against the probe's own failure modes (issue 30, item 1).

Per seed: synthesises ``--per-class`` CEX + PG crops (151 px, as a probe cuts them) and fits
the gate on them, decoded at each ``--sizes`` input side; then draws ``--per-kind`` images of
each unknown kind (``crystalscope synth unknown``) and 600 fresh crystals with another seed,
and prints, per kind, the share the gate flags and with which reason, the share of fresh
crystals it flags (the gate's false rejects), and how many of the real crops in ``--real``
(default: ../shared/data/opencrystal-samples) it flags. Nothing is fitted on the real crops
or the unknown images. Numpy and scipy only (no model): the gate does not look at the network.

Run:
    .venv/bin/python benchmarks/quality_gate.py [--seeds 1 2 3] [--sizes 64 96 224]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from crystalscope.model.spec import ModelSpec, decode
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.synth.unknown import KINDS, UnknownSettings, synthesize_unknown
from crystalscope.unknown.quality import REASONS, QualityGate, measure

DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "opencrystal-samples"


def decoded(paths: list[Path], size: int) -> np.ndarray:
    spec = ModelSpec(size, ("cex", "pg"))
    return np.stack([decode(path, spec)[0] for path in paths])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 224])
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL)
    args = parser.parse_args()
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
                gate = QualityGate.fit(measure(decoded(sorted((root / "train").rglob("*.png")),
                                                       size)))
                sets = {"fresh crystals": sorted((root / "fresh").rglob("*.png")),
                        **{kind: sorted((root / "unknown" / kind).glob("*.png"))
                           for kind in KINDS}}
                if real:
                    sets["real crops"] = real
                for name, paths in sets.items():
                    reasons = gate.reasons(measure(decoded(paths, size)))
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
