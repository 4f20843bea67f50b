"""`crystalscope explain`: class activation overlays per image and a side-by-side sheet."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from crystalscope.data.images import ImageLoadError
from crystalscope.errors import UserError
from crystalscope.explore.cam import METHODS, Explanation, explain_image, load_torch_model
from crystalscope.explore.cam import overlay as cam_overlay
from crystalscope.settings import SettingsError

PERCENTILE_BANDS = (70, 80, 90)
MAX_SHEET_ROWS = 12


def _stem(index: int, path: Path) -> str:
    return f"{index:03d}-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("_") or "image")


def plot_sheet(explanations: list[Explanation], path: Path) -> None:
    """Original | one overlay per method, with the map's 70/80/90th percentile contours."""
    rows = explanations[:MAX_SHEET_ROWS]
    methods = list(rows[0].maps)
    figure, axes = plt.subplots(len(rows), 1 + len(methods),
                                figsize=(3 * (1 + len(methods)), 3 * len(rows)), squeeze=False)
    for row, explanation in zip(axes, rows, strict=False):
        row[0].imshow(explanation.image)
        row[0].set_title(f"{explanation.path.name}\npredicted {explanation.predicted} "
                         f"({explanation.probability:.4f})", fontsize=8)
        for ax, method in zip(row[1:], methods, strict=True):
            cam = explanation.maps[method]
            ax.imshow(cam_overlay(explanation.image, cam))
            levels = sorted(set(np.percentile(cam, PERCENTILE_BANDS).round(6)))
            if len(levels) > 1:
                ax.contour(cam, levels=levels, colors=["white", "yellow", "red"][:len(levels)],
                           linewidths=0.8)
            ax.set_title(f"{method} for {explanation.target}\ncontours: 70/80/90th "
                         "percentile", fontsize=8)
        for ax in row:
            ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def explain(model: Path, images: list[Path], out_dir: Path, *, target: str | None = None,
            layer: str | None = None, progress: Callable[[int], None] | None = None
            ) -> tuple[list[Explanation], dict[str, Path], list[str]]:
    """Overlays for every image, the sheet and explanations.json; returns what was skipped."""
    net = load_torch_model(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingsError("out", "is a file; give a folder", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    explanations, written, skipped, records = [], {}, [], []
    for index, path in enumerate(images):
        try:
            explanation = explain_image(net, path, target=target, layer=layer)
        except ImageLoadError as exc:
            skipped.append(str(exc))
            continue
        finally:
            if progress:
                progress(1)
        explanations.append(explanation)
        files = {}
        for method, cam in explanation.maps.items():
            name = f"{_stem(index, Path(path))}-{method}.png"
            Image.fromarray(cam_overlay(explanation.image, cam)).save(out_dir / name)
            files[method] = name
            written[name] = out_dir / name
        records.append({"image": str(path), "predicted": explanation.predicted,
                        "probability": explanation.probability, "target": explanation.target,
                        "overlays": files})
    if not explanations:
        raise UserError("none of the images could be read: " + "; ".join(skipped[:3]))
    written["sheet.png"] = out_dir / "sheet.png"
    plot_sheet(explanations, written["sheet.png"])
    written["explanations.json"] = out_dir / "explanations.json"
    written["explanations.json"].write_text(json.dumps(
        {"methods": list(METHODS), "layer": layer or "last stage", "images": records},
        indent=2), encoding="utf-8")
    return explanations, written, skipped
