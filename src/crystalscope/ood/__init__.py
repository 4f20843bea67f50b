"""Out-of-distribution detection: say "unknown" instead of forcing a class."""
