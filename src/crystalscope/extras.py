"""Which optional extra provides which library, for the one-line error when one is missing.

The core install runs ``predict`` and ``monitor`` on an exported ONNX model (and synth, data
check, split); every other command group needs an extra (pyproject.toml). A command that
imports a library of a missing extra fails with :func:`missing_extra_message` instead of a
traceback (``cli/app.py:main``).
"""

from __future__ import annotations

# top-level import name -> the extra that installs it
EXTRA_OF_MODULE = {
    "torch": "train", "torchvision": "train", "timm": "train", "lightning": "train",
    "torchmetrics": "train", "tensorboard": "train", "onnxscript": "train", "kagglehub": "train",
    "huggingface_hub": "train",
    "d3blocks": "explore", "pandas": "explore", "pytorch_grad_cam": "explore", "cv2": "explore",
    "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "h11": "serve",
    "multipart": "serve", "python_multipart": "serve", "prometheus_client": "serve",
    "lancedb": "index",
    "weaviate": "weaviate", "openvino": "openvino", "ray": "ray", "asyncua": "opcua",
    "mlflow": "tracking", "wandb": "tracking",
}

WHAT_NEEDS_IT = {
    "train": "train, evaluate, export, data download and torch models (a checkpoint, "
             "model.safetensors, a run without model.onnx) need",
    "explore": "explore and explain need",
    "serve": "serve and label's page need",
    "index": "index and similar need",
    "tracking": "train --logger mlflow|wandb and export --register need",
}


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """The one-line error for an import of an extra's library that is not installed, or None
    when ``exc`` names no library of an extra (then it is a real bug, shown as such)."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    needs = WHAT_NEEDS_IT.get(extra, "this command needs")
    install = f"pip install 'crystalscope[{extra}]'"
    return f"{module} is not installed; {needs} the [{extra}] extra: {install}"
