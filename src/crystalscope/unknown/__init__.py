"""Unknown images (out-of-distribution in the literature): say "unknown", not a forced class."""
