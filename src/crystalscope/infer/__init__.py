"""Inference: load a model with its preprocessing, predict and embed images in batches."""
