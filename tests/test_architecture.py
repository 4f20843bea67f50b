"""The code's shape, checked: no import circles, small files, a light inference path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "crystalscope"
MAX_LINES = 450  # "about 400": a file that outgrows it has two jobs


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the crystalscope modules it imports anywhere: at load time, inside
    functions, or for type checking (a circle is a circle however late it closes)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("crystalscope"):
                target = str(node.module)
                found.add(target if target != name else "")
        graph[name] = found - {""}
    return graph


def test_no_import_circles() -> None:
    graph = _imports()
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for target in graph.get(module, ()):
            if target in path:
                circle = path[path.index(target):]
                if len(circle) > 1 or circle[0] != module:
                    circles.append(" -> ".join([*circle, target]))
            elif len(path) < 30:
                visit(target, [*path, target])

    for module in graph:
        if not module.endswith(".cli"):  # the package imports its command modules
            visit(module, [module])
    assert not [c for c in circles if not c.startswith("crystalscope.cli ")], circles[:5]


def test_no_file_has_grown_past_about_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long


RUN_FILES = ("config.yaml", "metrics.csv", "classes.json", "checkpoints", ".ckpt",
             "report.json", "report.txt", "model.json", "model.safetensors", "model.onnx",
             "model.int8.onnx", "unknown.safetensors")


def _string_constants(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_run_files_are_named_only_by_run_layout() -> None:
    # A run's files are named once, in model/spec.py's RunLayout; a path literal elsewhere is
    # a second name that drifts (strings in messages and docstrings are prose, not paths).
    literal = {}
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() == "model/spec.py":
            continue
        found = [text for text in _string_constants(path)
                 if any(text == name or (text.endswith(name) and " " not in text)
                        for name in RUN_FILES)]
        if found:
            literal[path.relative_to(PACKAGE).as_posix()] = found
    assert not literal


def test_the_unknown_decision_is_made_in_one_place() -> None:
    import re

    threshold = re.compile(r"score[s]?(\[[^\]]*\])?\)?\s*>\s*1(\.0)?\b")
    places = [path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
              if threshold.search(path.read_text(encoding="utf-8"))
              and path.relative_to(PACKAGE).as_posix() != "unknown/detector.py"]
    assert not places


def test_split_folders_are_named_only_by_split_path() -> None:
    # root / "test" and friends: data/layout.py:split_path names them; data/split.py writes
    # them (through the same names).
    import re

    joined = re.compile(r'/\s*"(train|valid|test)"')
    places = [path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
              if joined.search(path.read_text(encoding="utf-8"))]
    assert not places


def test_the_cli_raises_only_while_parsing_arguments() -> None:
    # Settings and stages check values and name fields (SettingsError); cli/ parses: click's
    # own parameter errors, and the _parse_* helpers that turn one option's text into a value.
    import ast

    offenders = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef) or function.name.startswith("_parse"):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                    called = ast.unparse(node.exc.func)
                    if called not in ("typer.BadParameter", "typer.Exit"):
                        offenders.append(f"{path.name}:{node.lineno} {called}")
    assert not offenders


def test_the_networks_normalisation_is_written_once() -> None:
    # (x - mean) / std on tensors: only model/normalize.py; the foreign-model preprocessing in
    # infer/predictor.py is numpy and feeds models that are not ours.
    import re

    formula = re.compile(r"-\s*[\w.]*mean\)?\s*/\s*[\w.]*std")
    places = [path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
              if re.search(r"^import torch", text := path.read_text(encoding="utf-8"), re.M)
              and formula.search(text)
              and path.relative_to(PACKAGE).as_posix() != "model/normalize.py"]
    assert not places


def test_no_import_runs_back_up_into_training() -> None:
    # Stages after training (evaluate, export, the unknown-detector) decode images through
    # data/decoded.py; only the commands that start a training run import train/.
    allowed = ("crystalscope.train", "crystalscope.cli", "crystalscope.demo")
    back_up = sorted(f"{module} -> {target}" for module, targets in _imports().items()
                     for target in targets if target.startswith("crystalscope.train")
                     and not module.startswith(allowed))
    assert not back_up


def test_evaluate_and_export_decode_without_lightning() -> None:
    code = ("import sys, crystalscope.evaluate.predictions, crystalscope.unknown.fitting, "
            "crystalscope.export.stage, crystalscope.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_onnx_inference_imports_no_lightning_torchvision_or_torch() -> None:
    # torch alone costs about 2 s of every `crystalscope predict model.onnx` start.
    code = ("import sys, crystalscope.cli, crystalscope.infer.predictor, "
            "crystalscope.infer.stream, crystalscope.infer.output, crystalscope.model.spec; "
            "print(sorted(m for m in ('lightning', 'torchvision', 'torch') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_predicting_with_an_onnx_model_never_imports_torch(exported_run: Path,
                                                           backend: str) -> None:
    # Not just the modules: the whole path a predict takes, loading the model included.
    image = next((exported_run.parent.parent / "splits" / "test").rglob("*.png"))
    code = ("import sys; from pathlib import Path; "
            "from crystalscope.infer.predictor import load_predictor; "
            "from crystalscope.infer.stream import predict_stream; "
            f"p = load_predictor(Path({str(exported_run)!r}), backend={backend!r}); "
            f"r = list(predict_stream(p, [Path({str(image)!r})])); "
            "assert r[0].unknown_score is not None; "
            "print(sorted(m for m in ('lightning', 'timm', 'torchvision', 'torch') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
