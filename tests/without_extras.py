"""Run the crystalscope CLI as on an install without some extras: their libraries cannot be
imported (an import raises ModuleNotFoundError, as when they are absent).

    python tests/without_extras.py EXTRA[,EXTRA...] crystalscope-arguments...

``all`` names every extra. The blocker is installed at import, not under ``__main__``, so that
the workers of a process pool (spawned: they import this file again) are blocked too. The real
installs are checked by ``.ci/slim-install`` in fresh virtual environments.
"""

from __future__ import annotations

import importlib.abc
import sys

from crystalscope.extras import EXTRA_OF_MODULE


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, modules: set[str]) -> None:
        self.modules = modules

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.modules:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _blocked(extras: str) -> set[str]:
    names = set(EXTRA_OF_MODULE.values()) if extras == "all" else set(extras.split(","))
    return {module for module, extra in EXTRA_OF_MODULE.items() if extra in names}


# A spawned worker is given the parent's sys.argv before it imports this file.
sys.meta_path.insert(0, _Blocker(_blocked(sys.argv[1])))

if __name__ == "__main__":
    from crystalscope.cli import main

    main(sys.argv[2:])
