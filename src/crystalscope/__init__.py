"""crystalscope: image classifiers for in-situ crystallization images."""

__version__ = "0.1.0"
