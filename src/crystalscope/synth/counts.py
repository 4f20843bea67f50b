"""Simulated impurity-call counts of a probe stream, window by window: over-dispersed within a
window (beta-binomial) and drifting between windows (an AR(1) process), with an optional step
of real impurity. For the alarm's benchmark and tests, where images would add nothing but time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CountStream:
    """How a clean (then maybe contaminated) stream's false impurity calls behave.

    ``rate``: the mean share of crops called impurity by mistake; ``rho``: intra-window
    correlation of those calls (0: binomial); ``drift``: the rate wanders by up to
    +-``drift`` x ``rate`` (reached at two standard deviations of an AR(1) with coefficient
    ``ar``, clipped there); ``crops``: crops per window.
    """

    rate: float = 0.04
    rho: float = 0.0
    drift: float = 0.0
    ar: float = 0.95
    crops: int = 400


def drift_path(stream: CountStream, windows: int, rng: np.random.Generator,
               start: float | np.ndarray | None = None, streams: int | None = None
               ) -> tuple[np.ndarray, float | np.ndarray]:
    """The rate of each window, rate x (1 + drift x clip(z / 2, -1, 1)), z a stationary AR(1)
    with unit variance; and the last z (``start`` of the next stretch). With ``streams``, that
    many independent streams at once: (streams, windows) rates and (streams,) last states.
    O(streams x windows)."""
    shape = (windows,) if streams is None else (streams, windows)
    noise = rng.normal(size=shape) * np.sqrt(1 - stream.ar ** 2)
    z = np.empty(shape)
    if start is not None:
        previous = start
    else:
        previous = rng.normal() if streams is None else rng.normal(size=streams)
    for i in range(windows):  # sequential by nature; 10^5 windows take ~30 ms
        previous = stream.ar * previous + noise[..., i]
        z[..., i] = previous
    last = float(previous) if streams is None else np.asarray(previous)
    return stream.rate * (1 + stream.drift * np.clip(z / 2, -1, 1)), last


def window_counts(stream: CountStream, shares: np.ndarray, rng: np.random.Generator
                  ) -> np.ndarray:
    """Impurity calls per window at the given mean shares (any shape): beta-binomial with the
    stream's rho (a binomial at rho = 0)."""
    shares = np.clip(shares, 1e-9, 1 - 1e-9)
    if stream.rho > 0:
        scale = 1 / stream.rho - 1
        shares = rng.beta(shares * scale, (1 - shares) * scale)
    return rng.binomial(stream.crops, shares)
