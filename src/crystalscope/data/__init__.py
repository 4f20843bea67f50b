"""The data stage: safe image loading, class folders, duplicates, splits, synthetic crops."""
