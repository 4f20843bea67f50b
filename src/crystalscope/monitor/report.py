"""timeline.png: the impurity fraction per window with its 95% interval, the smoothed trend,
the alarm, the share of unknown crops and "unknown particles" events, and example crops
called impurity around the alarm."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from crystalscope.data.images import ImageLoadError, load_image
from crystalscope.monitor.trend import AlarmRule, MonitorResult


def plot_timeline(result: MonitorResult, rule: AlarmRule, path: Path) -> None:
    """Save the timeline figure."""
    windows = result.windows
    x = np.array([w.index for w in windows])
    fraction = np.array([np.nan if w.fraction is None else w.fraction for w in windows])
    low = np.array([np.nan if w.interval is None else w.interval[0] for w in windows])
    high = np.array([np.nan if w.interval is None else w.interval[1] for w in windows])
    smoothed = np.array([np.nan if w.smoothed is None else w.smoothed for w in windows])
    examples = (result.examples.get(result.alarm.index, []) if result.alarm else [])[:4]
    figure = plt.figure(figsize=(11, 6 if examples else 4.5))
    grid = figure.add_gridspec(2 if examples else 1, max(1, len(examples)),
                               height_ratios=[3, 1.3] if examples else [1])
    axes = figure.add_subplot(grid[0, :])
    axes.fill_between(x, low, high, color="tab:orange", alpha=0.25, label="95% interval")
    axes.plot(x, fraction, "o-", color="tab:orange", markersize=3,
              label=f"share of crops called {rule.positive}")
    axes.plot(x, smoothed, "-", color="black", linewidth=1, label="smoothed")
    axes.axhline(rule.false_positive_rate, color="grey", linestyle=":",
                 label=f"false-positive rate {rule.false_positive_rate:.3f}")
    if rule.in_control_share > rule.false_positive_rate:
        axes.axhline(rule.in_control_share, color="grey", linestyle="--",
                     label=f"clean up to {rule.in_control_share:.3f} (min shift)")
    if rule.unknown_rate is not None:
        unknown = np.array([np.nan if w.unknown_fraction is None else w.unknown_fraction
                            for w in windows])
        axes.plot(x, unknown, "s-", color="tab:purple", markersize=2, linewidth=1,
                  label="share of crops unknown (kept out of the share above)")
        for window in result.unknown_alarms:
            axes.axvline(window.index, color="tab:purple", linestyle="--", linewidth=1.5,
                         label=f"unknown particles: window {window.index}")
    if result.alarm:
        axes.axvline(result.alarm.index, color="red", linewidth=2,
                     label=f"alarm: window {result.alarm.index} ({result.alarm.time})")
    axes.set_xlabel("window")
    axes.set_ylabel(f"{rule.positive} share" if rule.unknown_rate is None else "share of crops")
    axes.set_ylim(0, 1)
    axes.set_title(f"{rule.positive} over time: {len(windows)} windows, "
                   f"{result.crops} crops" + ("" if result.alarm else ", no alarm")
                   + (f", unknown particles from window {result.unknown_alarms[0].index}"
                      if result.unknown_alarms else ""))
    axes.legend(fontsize=8, loc="upper left")
    axes.grid(alpha=0.3)
    for column, crop in enumerate(examples):
        ax = figure.add_subplot(grid[1, column])
        try:
            ax.imshow(load_image(crop, warn_on_mismatch=False).convert("L"), cmap="gray")
        except (ImageLoadError, OSError):
            ax.text(0.5, 0.5, "unreadable", ha="center")
        ax.set_title(f"{crop.name} (alarm window)", fontsize=7)
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
