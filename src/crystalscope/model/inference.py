"""The trained network as used after training: preprocessing and softmax included.

:class:`InferenceNet` takes RGB images as float (or uint8) values 0-255, (N, 3, S, S), already
resized to the model's input size, and returns (probabilities, embedding, statistics). The
statistics — each backbone stage's channel means and standard deviations — are what the
unknown-image detector (:mod:`crystalscope.unknown`) measures. The same module is
what evaluate runs, what export writes to ONNX, and what a model rebuilt from
``model.safetensors`` + ``model.json`` computes — so all three agree by construction.

With ``tta="dihedral"`` the network sees each image in its 8 rotations and flips and returns
the mean of each output over them: exactly invariant to how a crop lies, at 8 times the
compute. Being part of the module, it is also part of the ONNX graph and of what the
unknown-detector is fitted on.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from crystalscope.config import TrainConfig, load_train_config
from crystalscope.errors import UserError
from crystalscope.model.backbones import Classifier
from crystalscope.model.normalize import Normalize
from crystalscope.model.spec import ModelSpec, RunLayout

if TYPE_CHECKING:
    from crystalscope.data.decoded import SplitFolder

TTA_VIEWS = {"none": 1, "dihedral": 8}


def dihedral_views(images: torch.Tensor) -> torch.Tensor:
    """(N, C, S, S) -> (8N, C, S, S): the 4 rotations, then the same mirrored, view-major."""
    rotations = [torch.rot90(images, k, dims=(2, 3)) for k in range(4)]
    return torch.cat([*rotations, *(r.flip(3) for r in rotations)])


def mean_over_views(values: torch.Tensor, views: int) -> torch.Tensor:
    """(views * N, ...) -> (N, ...): the mean over each image's views."""
    return values.reshape(views, -1, *values.shape[1:]).mean(dim=0)


def stage_statistics(stages: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per stage, (N, 2C): each channel's spatial mean, then its spatial standard deviation."""
    return [torch.cat([s.mean(dim=(2, 3)), s.std(dim=(2, 3), correction=0)], dim=1)
            for s in stages]


class InferenceNet(nn.Module):
    """Normalise -> backbone -> head -> softmax(logits / temperature); also returns the pooled
    embedding and the per-stage feature statistics (concatenated; :meth:`stages` gives them one
    by one).

    ``tta="dihedral"``: every output is the mean over the image's 8 rotations and flips.
    ``temperature``: 1 unless export fitted one (``--calibrate temperature``).
    """

    def __init__(self, net: Classifier, spec: ModelSpec, tta: str = "none",
                 temperature: float = 1.0) -> None:
        super().__init__()
        if tta not in TTA_VIEWS:
            raise UserError(f"tta {tta!r}: use {' or '.join(TTA_VIEWS)}")
        self.classifier = net
        self.spec = spec
        self.tta = tta
        self.views = TTA_VIEWS[tta]
        self.normalize = Normalize.from_spec(spec)
        self.temperature = float(temperature)

    def _per_view(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                       list[torch.Tensor]]:
        """(logits, embedding, statistics of each stage) of every view, view-major."""
        x = self.normalize(images)
        if self.views > 1:
            x = dihedral_views(x)
        backbone = self.classifier.backbone
        intermediates = None
        if hasattr(backbone, "forward_intermediates"):  # timm >= 1.0, most models
            # The stages' outputs in the same pass as the final features; only the call is
            # guarded, so a real error further on is not mistaken for "no stages".
            with contextlib.suppress(NotImplementedError):
                intermediates = backbone.forward_intermediates(x)
        if intermediates is None:
            embedding = backbone(x)
            statistics = [embedding]
        else:
            final, stages = intermediates
            embedding = backbone.forward_head(final)
            statistics = stage_statistics([s for s in stages if s.ndim == 4]) or [embedding]
        return self.classifier.head(embedding), embedding, statistics

    def view_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(views, N, C) logits before the temperature: what temperature scaling is fitted on."""
        logits, _, _ = self._per_view(images)
        return logits.reshape(self.views, len(images), -1)

    def stages(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                    list[torch.Tensor]]:
        """(probabilities, embedding, statistics of each stage)."""
        logits, embedding, statistics = self._per_view(images)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        probabilities = torch.softmax(logits, dim=1)
        if self.views > 1:
            probabilities, embedding = (mean_over_views(t, self.views)
                                        for t in (probabilities, embedding))
            statistics = [mean_over_views(t, self.views) for t in statistics]
        return probabilities, embedding, statistics

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probabilities, embedding, statistics = self.stages(images)
        return probabilities, embedding, torch.cat(statistics, dim=1)


@dataclass
class LoadedRun:
    """A run's best checkpoint, ready for inference."""

    run_dir: Path
    config: TrainConfig
    classes: list[str]
    net: InferenceNet
    checkpoint: Path
    source: dict[str, Any] | None = None  # a hf-hub:/local-dir: backbone, resolved

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def spec(self) -> ModelSpec:
        """How this run's network is fed (see :mod:`crystalscope.model.spec`)."""
        return self.net.spec

    @cached_property
    def data(self) -> SplitFolder:
        """The split folder the run was trained on, as far as it is still there (read once)."""
        from crystalscope.data.decoded import read_trained_on

        return read_trained_on(Path(self.config.data), self.classes)


def load_run(run_dir: Path, checkpoint: str = "best", tta: str | None = None) -> LoadedRun:
    """Load ``run_dir/checkpoints/<checkpoint>.ckpt`` (CPU, eval mode) with its config;
    ``tta`` overrides the run's test-time averaging (None: the run's ``tta``)."""
    from crystalscope.model.classifier import CrystalClassifier

    run_dir = Path(run_dir)
    if not RunLayout(run_dir).config.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml); give the folder "
                        "`crystalscope train` wrote, e.g. runs/resnet50-20261128-101500")
    path = RunLayout(run_dir).checkpoint(checkpoint)
    if not path.is_file():
        raise UserError(f"{run_dir}: has no checkpoints/{checkpoint}.ckpt (training did not "
                        "finish an epoch); continue it with `crystalscope train --resume`")
    config = load_train_config(RunLayout(run_dir).config)
    try:
        # weights="none": the checkpoint holds them; never reach for the hub here.
        module = CrystalClassifier.load_from_checkpoint(path, map_location="cpu",
                                                        weights="none")
    except Exception as exc:
        raise UserError(f"{path}: not a loadable crystalscope checkpoint "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    net = module.net.to(memory_format=torch.contiguous_format).float()
    spec = ModelSpec(input_size=config.image_size, classes=tuple(module.classes),
                     mean=tuple(module.hparams.mean), std=tuple(module.hparams.std))
    inference = InferenceNet(net, spec, tta=tta or config.tta).eval()
    return LoadedRun(run_dir=run_dir, config=config, classes=list(module.classes),
                     net=inference, checkpoint=path, source=module.hparams.get("source"))


@torch.inference_mode()
def run_batches(net: InferenceNet, images: torch.Tensor, batch_size: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities, embeddings and stage statistics for (N, 3, S, S) images, in batches."""
    batch_size = max(1, batch_size // net.views)  # test-time views multiply the batch
    outputs: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, len(images), batch_size):
        outputs.append(net(images[start:start + batch_size]))
    if not outputs:
        return torch.empty(0), torch.empty(0), torch.empty(0)
    probabilities, embeddings, statistics = (torch.cat(parts) for parts in zip(*outputs,
                                                                              strict=True))
    return probabilities, embeddings, statistics


@torch.inference_mode()
def view_logits_batches(net: InferenceNet, images: torch.Tensor, batch_size: int = 64
                        ) -> torch.Tensor:
    """(views, N, C) logits before the temperature for (N, 3, S, S) images, in batches."""
    batch_size = max(1, batch_size // net.views)
    parts = [net.view_logits(images[start:start + batch_size])
             for start in range(0, len(images), batch_size)]
    return torch.cat(parts, dim=1) if parts else torch.empty(net.views, 0, 0)


def exported_choices(run: LoadedRun) -> dict[str, Any]:
    """The temperature and operating point of the run's export, when model.json in the run
    folder was exported from this very checkpoint with the same test-time averaging; sets the
    network's temperature. Empty otherwise (then the report is the checkpoint's own)."""
    from crystalscope.data.dedupe import file_sha256
    from crystalscope.operating_point import OperatingPoint

    model_json = RunLayout(run.run_dir).model_json
    if not model_json.is_file():
        return {}
    try:
        description = json.loads(model_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    if (description.get("checkpoint_sha256") != file_sha256(run.checkpoint)
            or description.get("architecture", {}).get("tta", "none") != run.net.tta):
        return {}
    choices: dict[str, Any] = {}
    if description.get("temperature_scaling"):
        choices["temperature_scaling"] = description["temperature_scaling"]
        run.net.temperature = float(description["architecture"].get("temperature", 1.0))
    if description.get("operating_point"):
        choices["operating_point"] = OperatingPoint.from_dict(description["operating_point"],
                                                              run.classes)
    return choices
