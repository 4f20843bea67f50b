"""Synthetic probe images: crops of each class, simulated batches, unknown kinds."""
