"""The image-quality gate: is there a usable crystal in the crop at all?

A probe produces crops that are not crystals of any kind: an empty window (nothing in front of
the probe), a defocused one, a saturated flare. The novelty score (``unknown/scores.py``)
answers "is this crystal unlike the training ones?"; this gate answers the question before it,
with measurements a probe engineer recognises, each on the crop as the network sees it
(grayscale mean of the decoded (3, S, S) input, brought down to ``MEASURE_SIDE`` pixels when S
is larger, so that the gradients mean the same at any input size):

- ``edges``: the share of pixels on an edge (gradient steeper than ``EDGE_STEP`` gray levels
  per pixel) — a particle's rim. An empty window has almost none.
- ``focus``: the steepest gradients (99th percentile) over the intensity range they span
  (reported; the ``blurred`` rule of gates stored before ``sharpness``).
- ``saturated``: the share of pixels at ``SATURATED`` or above. PG agglomerates are often
  bright, so its limit comes from the training crops too.
- ``border``: the share of the border ring on an edge (reported, never a reason: CEX needle
  fields always reach the border).
- ``lines``: how far the strongest line-like structure stands out of the crop's own texture
  (:func:`line_strength`). It sees what ``edges`` misses: a faint translucent needle whose
  steps stay below ``EDGE_STEP`` is still a long, thin, oriented line, which a window of noise
  and uneven background is not.
- ``sharpness``: the steepest gradients (99th percentile) of the crop smoothed over
  ``SMOOTHING`` px, over the intensity range — focus, with the pixel noise that a defocused
  crop still carries smoothed away first (:func:`gradient_measures`). The ``blurred`` rule.
- ``rim``: how far the steepest of those gradients (99.5th percentile) stand out of the
  crop's typical one (the median), inside a ``RIM_MARGIN`` px margin: about 2.7 for a window
  of noise and haze (a Rayleigh field), more where a particle's rim stands out, however
  faint.

The limits are order statistics of the training crops, chosen as conformal bounds: the k-th
smallest (largest for ``saturated``) of n, k = floor((n + 1) q), so a new crop like the
training ones fails one with probability at most k/(n+1) <= q.

- ``blurred`` (``sharpness``) and ``saturated``: q = ``GATE_QUANTILES`` over all training
  crops, 0.2% and 0.1%. Blurred keeps the second lowest of a thousand crops, not the lowest:
  one hazy training crop would otherwise set it, and a crystal blurred over 6 px would pass.
- ``empty``: a crop with few edges — at or below the ``EMPTY_EDGES_SHARE`` quantile of the
  training crops' ``edges`` — *and* nothing standing out: ``lines`` x ``rim`` below the
  q = ``EMPTY_STANDOUT_QUANTILE`` bound of those few-edge training crops. A crystal is called
  empty with probability about 5% x 5% = 0.25% at most. An edge count alone could not do
  that: about 1% of the benchmark's generated crystals, faint PG particles a person can just
  make out, show no edge at all. Of the two, ``lines`` sees a faint needle and ``rim`` a faint
  disc's outline; their product halves what either alone costs at the same share of empty
  windows caught (``benchmarks/unknown.py``).

With fewer than 1/q training crops a limit is left out rather than guessed; then a crop
without a single edge is empty. Stored with the detector (model.json) and reported.

Gates stored by earlier versions keep their rules (``version`` in the description): version 1
read ``focus`` for ``blurred`` and ``lines`` alone for ``empty`` (or, stored before ``lines``,
no edge at all).

Cost: ``measure`` is O(N S^2) time with one crop in flight (memory O(S^2) plus the (N, 7)
result; ``tests/test_quality.py`` bounds it): 2.4 ms a crop at 96 px without ``lines`` on the
2-core build machine in a slow hour (``sharpness`` and ``rim`` cost about 1.3 ms of it), so
10^6 crops take about 40 minutes of one core, a fifth of the descriptor's time.
``lines`` costs 2.2 ms a crop at 96 px (eight FFT convolutions), so :meth:`QualityGate.measure`
computes it only for the few-edge crops the empty rule reads (about 5% of crystals, every
empty window). ``QualityGate.fit`` sorts each measure, 0.04 s for 10^6 crops; ``reasons`` is
O(N), 0.7 s for 10^6 (``benchmarks/quality_gate.py --speed 2000``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage, signal

EDGE_STEP = 6.0  # gray levels per pixel (at MEASURE_SIDE): a particle's rim, not sensor noise
SATURATED = 250
GATE_QUANTILES = {"blurred": 0.002, "saturated": 0.001}  # 0.3% of crystals at most
EMPTY_EDGES_SHARE = 0.05  # the few-edge crops the empty rule looks at again
EMPTY_STANDOUT_QUANTILE = 0.05  # of those, by lines x rim: about 0.25% of crystals at most
EMPTY_LINES_QUANTILE = 0.1  # version 1 gates: of the few-edge crops, by lines alone
MEASURE_SIDE = 96
MEASURES = ("edges", "focus", "saturated", "border", "lines", "sharpness", "rim")
EDGES, LINES, RIM = (MEASURES.index(name) for name in ("edges", "lines", "rim"))
SMOOTHING = 1.0  # px: the Gaussian over which sharpness and rim take the gradient
RIM_MARGIN = 8  # px left out at the border for rim (the smoothing's edge effects)
VERSION = 2  # the gate's rules, as fitted now (see RULES)
# per version, reason -> (measure, which side of its limit fails); empty also reads
# lines x rim (version 2) or lines (version 1)
RULES = {1: {"empty": ("edges", "below"), "blurred": ("focus", "below"),
             "saturated": ("saturated", "above")},
         2: {"empty": ("edges", "below"), "blurred": ("sharpness", "below"),
             "saturated": ("saturated", "above")}}
REASONS = RULES[VERSION]
LINE_KERNEL = 25  # pixels a side (at MEASURE_SIDE)
LINE_ALONG, LINE_ACROSS = 6.0, 1.5  # the line filter's Gaussian, sigma along and across
LINE_ORIENTATIONS = 8
LINE_PERCENTILE = 99.5


def gray_at_measure_side(image: np.ndarray) -> np.ndarray:
    """(3, S, S) uint8 -> (s, s) float64 gray, s = min(S, ``MEASURE_SIDE``): the crop as the
    gate and the appearance score measure it, so their numbers mean the same at any size."""
    gray = image.astype(np.float64).mean(axis=0)
    if gray.shape[0] > MEASURE_SIDE:
        gray = np.asarray(Image.fromarray(gray.astype(np.float32)).resize(
            (MEASURE_SIDE, MEASURE_SIDE), Image.Resampling.BOX), np.float64)
    return gray


@lru_cache(maxsize=1)
def _line_filters() -> np.ndarray:
    """(``LINE_ORIENTATIONS``, K, K): minus the second derivative across an elongated Gaussian
    (a bright line on dark gives a positive response, a dark one a negative), one per
    orientation, zero-mean and of unit energy so that every orientation weighs alike."""
    r = np.arange(LINE_KERNEL) - LINE_KERNEL // 2
    y, x = np.meshgrid(r, r, indexing="ij")
    filters = []
    for turn in np.pi * np.arange(LINE_ORIENTATIONS) / LINE_ORIENTATIONS:
        along = x * np.cos(turn) + y * np.sin(turn)
        across = -x * np.sin(turn) + y * np.cos(turn)
        envelope = np.exp(-along ** 2 / (2 * LINE_ALONG ** 2)
                          - across ** 2 / (2 * LINE_ACROSS ** 2))
        kernel = (1 / LINE_ACROSS ** 2 - across ** 2 / LINE_ACROSS ** 4) * envelope
        kernel -= kernel.mean()
        filters.append(kernel / np.sqrt((kernel ** 2).sum()))
    return np.stack(filters)


def line_strength(gray: np.ndarray) -> float:
    """The ``lines`` measure of one (s, s) gray crop: the 99.5th percentile over pixels of the
    strongest response of ``LINE_ORIENTATIONS`` oriented line filters (:func:`_line_filters`,
    sigma 6 px along and 1.5 across), over the median absolute response of all of them. About
    5 for an empty window's noise and uneven background, well above for needles and particle
    rims however faint: a ratio, so neither brightness nor contrast moves it. Only pixels
    whose filter window lies inside the crop count (a crop of ``LINE_KERNEL`` px or less is
    measured with the borders). O(s^2 log s)."""
    filters = _line_filters()
    mode = "valid" if gray.shape[0] > 2 * LINE_KERNEL else "same"
    responses = signal.fftconvolve((gray - gray.mean())[None], filters, mode=mode, axes=(1, 2))
    typical = float(np.median(np.abs(responses)))
    if typical <= 1e-9:
        return 0.0  # a flat crop: nothing stands out
    return float(np.percentile(np.abs(responses).max(axis=0), LINE_PERCENTILE) / typical)


def gradient_measures(gray: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """(``sharpness``, ``rim``) of one (s, s) gray crop whose 1% and 99% points are ``low``
    and ``high``: the gradient of the crop smoothed over ``SMOOTHING`` px, its 99th percentile
    over the range, and its 99.5th percentile over its median inside ``RIM_MARGIN`` px
    (0 for a flat crop). O(s^2)."""
    smoothed = ndimage.gaussian_gradient_magnitude(gray, SMOOTHING)
    sharpness = float(np.percentile(smoothed, 99) / max(high - low, 1.0))
    inner = smoothed[RIM_MARGIN:-RIM_MARGIN, RIM_MARGIN:-RIM_MARGIN] \
        if min(gray.shape) > 4 * RIM_MARGIN else smoothed
    typical, steepest = np.percentile(inner, [50, 99.5])  # one partial sort
    rim = float(steepest / typical) if typical > 1e-9 else 0.0
    return sharpness, rim


def measure(images: np.ndarray, lines_up_to: float | None = None) -> np.ndarray:
    """(N, 3, S, S) uint8 -> (N, 7) float: ``MEASURES`` per image (see the module docs).
    ``lines`` only for crops whose ``edges`` are at or below ``lines_up_to`` (None: every
    crop), NaN for the others: it costs four times the rest."""
    images = np.asarray(images)
    rows = np.full((len(images), len(MEASURES)), np.nan)
    for row, image in enumerate(images):
        gray = gray_at_measure_side(image)
        gradient = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1)) / 8
        on_edge = gradient > EDGE_STEP
        low, high = np.percentile(gray, [1, 99])
        ring = np.concatenate([on_edge[0], on_edge[-1], on_edge[1:-1, 0], on_edge[1:-1, -1]])
        rows[row, :LINES] = (on_edge.mean(), np.percentile(gradient, 99) / max(high - low, 1.0),
                             (gray >= SATURATED).mean(), ring.mean())
        rows[row, LINES + 1:] = gradient_measures(gray, low, high)
        if lines_up_to is None or rows[row, EDGES] <= lines_up_to:
            rows[row, LINES] = line_strength(gray)
    return rows


def _order_statistic(values: np.ndarray, quantile: float, side: str) -> float | None:
    """The conformal limit: the k-th smallest ("below") or largest ("above") of n values,
    k = floor((n + 1) quantile); None when k < 1 (too few values to set it)."""
    column = np.sort(np.asarray(values, np.float64))
    n, k = len(column), int(np.floor((len(column) + 1) * quantile))
    if k < 1:
        return None
    return float(column[k - 1] if side == "below" else column[n - k])


def _few_edges_limit(edges: np.ndarray) -> float:
    """The empty rule's edge limit: the ``EMPTY_EDGES_SHARE`` quantile of the training crops'
    ``edges`` (a value they take), O(N)."""
    return float(np.quantile(edges, EMPTY_EDGES_SHARE, method="lower"))


@dataclass(frozen=True)
class QualityGate:
    """Limits fitted on training crops; :meth:`reasons` names what a crop fails."""

    limits: dict[str, float | None]  # reason -> the limit of its measure (None: too few crops)
    fitted_on: int = 0
    empty_lines: float | None = None  # version 1: the empty rule's lines limit
    empty_standout: float | None = None  # version 2: the empty rule's lines x rim limit
    version: int = 1  # the rules (``RULES``); :meth:`fit` fits ``VERSION``

    @classmethod
    def fit(cls, measures: np.ndarray, quantile: float | None = None) -> QualityGate:
        """Limits from the training crops' measures (``measure``'s rows, ``lines`` at least for
        the crops at or below the ``EMPTY_EDGES_SHARE`` quantile of ``edges``; see the module
        docs) at ``GATE_QUANTILES`` (``quantile``: one for both, as a test asks). O(N log N)."""
        n = len(measures)
        quantiles = quantiles_of(quantile)
        limits = {reason: _order_statistic(measures[:, MEASURES.index(name)],
                                           quantiles.get(reason, min(quantiles.values())), side)
                  for reason, (name, side) in RULES[VERSION].items()}
        standout = None
        if limits["blurred"] is not None:  # enough crops for the gate at all
            edges = measures[:, EDGES]
            few_edges = _few_edges_limit(edges)
            few = measures[edges <= few_edges]
            if np.isnan(few[:, LINES]).any():
                raise ValueError("QualityGate.fit needs `lines` for the few-edge crops: "
                                 "measure them with lines_up_to=None, or use fit_images")
            standout = _order_statistic(few[:, LINES] * few[:, RIM],
                                        EMPTY_STANDOUT_QUANTILE, "below")
            if standout is not None:  # else the edges' own limit, with "no edge at all"
                limits["empty"] = few_edges
        return cls(limits=limits, fitted_on=n, empty_standout=standout, version=VERSION)

    @classmethod
    def fit_images(cls, images: np.ndarray, quantile: float | None = None) -> QualityGate:
        """:meth:`fit` on (N, 3, S, S) uint8 training crops, measuring ``lines`` only for
        the few-edge crops the empty rule reads. O(N S^2)."""
        return cls.fit_measured(images, quantile)[0]

    @classmethod
    def fit_measured(cls, images: np.ndarray, quantile: float | None = None
                     ) -> tuple[QualityGate, np.ndarray]:
        """:meth:`fit_images`, and the training crops' measures as the fitted gate's
        :meth:`measure` gives them (so a caller need not measure them twice). O(N S^2)."""
        measures = measure(images, lines_up_to=-np.inf)
        few_edges = _few_edges_limit(measures[:, EDGES])
        for row in np.flatnonzero(measures[:, EDGES] <= few_edges):
            measures[row, LINES] = line_strength(gray_at_measure_side(images[row]))
        gate = cls.fit(measures, quantile)
        if gate._empty_limit is None:  # the gate reads no lines
            measures[:, LINES] = np.nan
        return gate, measures  # else its empty limit is ``few_edges``: the rows measured above

    @property
    def _empty_limit(self) -> float | None:
        """The limit the empty rule puts on its second measure (None: no edge at all)."""
        return self.empty_standout if self.version >= 2 else self.empty_lines

    def measure(self, images: np.ndarray) -> np.ndarray:
        """``measure`` for this gate: ``lines`` only where the empty rule reads it."""
        reads_lines = self._empty_limit is not None  # then the empty limit is set too
        return measure(images, lines_up_to=self.limits["empty"] if reads_lines else -np.inf)

    def failed(self, measures: np.ndarray, *, inclusive: bool = False) -> np.ndarray:
        """(N, len(REASONS)) bool: which limit each crop fails. ``inclusive``: a value at a
        limit fails too — for the training crops that set the limits, so that counting them
        gives what a new crop's chance of failing is (k of n, not k - 1)."""
        columns = []
        for reason, (name, side) in RULES[self.version].items():
            value, limit = measures[:, MEASURES.index(name)], self.limits[reason]
            if reason == "empty" and self._empty_limit is not None:
                columns.append(self._empty(measures, inclusive))
                continue
            failing = (np.zeros(len(measures), bool) if limit is None else
                       _beyond(value, limit, side, inclusive))
            if reason == "empty":  # no second limit: not one edge is empty
                failing = failing | (value == 0)
            columns.append(failing)
        return np.stack(columns, axis=1) if columns else np.zeros((len(measures), 0), bool)

    def _empty(self, measures: np.ndarray, inclusive: bool) -> np.ndarray:
        """Few edges and nothing standing out: ``lines`` x ``rim`` (version 1: ``lines``)
        below its limit, or none at all (a flat crop, whatever the limit: training crops as
        flat as that set it to 0); a crop whose ``lines`` was not measured: no edge at all."""
        edges, lines = measures[:, EDGES], measures[:, LINES]
        standout = lines * measures[:, RIM] if self.version >= 2 else lines
        few = edges <= self.limits["empty"]
        beyond = _beyond(standout, self._empty_limit, "below", inclusive)
        if self.version >= 2:
            beyond |= standout <= 0
        return few & np.where(np.isnan(lines), edges == 0, beyond)

    def reasons(self, measures: np.ndarray) -> list[str | None]:
        """The first reason each crop fails (in ``REASONS``' order), None when it passes."""
        names = list(REASONS)
        return [names[int(np.argmax(row))] if row.any() else None
                for row in self.failed(measures)]

    def describe(self) -> dict:
        described = {"version": self.version, "measures": list(MEASURES),
                     "quantiles": GATE_QUANTILES, "limits": self.limits,
                     "fitted_on": self.fitted_on, "edge_step": EDGE_STEP,
                     "saturated": SATURATED, "empty_edges_share": EMPTY_EDGES_SHARE}
        if self.version >= 2:
            return {**described, "blurred_measure": "sharpness",
                    "empty_standout": self.empty_standout,
                    "empty_standout_quantile": EMPTY_STANDOUT_QUANTILE}
        return {**described, "blurred_measure": "focus", "empty_lines": self.empty_lines,
                "empty_lines_quantile": EMPTY_LINES_QUANTILE}

    @classmethod
    def from_description(cls, described: dict) -> QualityGate:
        def number(key: str) -> float | None:
            value = described.get(key)  # absent: a gate stored before that rule
            return None if value is None else float(value)

        version = int(described.get("version", 1))
        if version not in RULES:
            raise ValueError(f"a quality gate of version {version} (this crystalscope reads "
                             f"{', '.join(map(str, RULES))}); upgrade it")
        return cls(limits={k: None if v is None else float(v)
                           for k, v in described["limits"].items()},
                   fitted_on=int(described.get("fitted_on", 0)),
                   empty_lines=number("empty_lines"), empty_standout=number("empty_standout"),
                   version=version)


def quantiles_of(quantile: float | None) -> dict[str, float]:
    """reason -> q: ``GATE_QUANTILES``, or ``quantile`` for each."""
    return dict(GATE_QUANTILES) if quantile is None else dict.fromkeys(GATE_QUANTILES, quantile)


def described_quantiles(described: dict) -> dict[str, float]:
    """reason -> q of a stored gate (one ``quantile`` for all before version 2)."""
    if "quantiles" in described:
        return {k: float(v) for k, v in described["quantiles"].items()}
    return dict.fromkeys(GATE_QUANTILES, float(described["quantile"]))


def _beyond(value: np.ndarray, limit: float, side: str, inclusive: bool) -> np.ndarray:
    """Where ``value`` is past ``limit`` on ``side`` (at it too when ``inclusive``)."""
    if side == "below":
        return value <= limit if inclusive else value < limit
    return value >= limit if inclusive else value > limit
