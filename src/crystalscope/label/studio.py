"""Label Studio, the labelling tool many labs already run: crystalscope's crops and labels out
as Label Studio tasks, and a Label Studio export back in as labels.

Out (:func:`export_tasks`): one task per crop — its image URL, its path in the images folder,
the model's guess as a *prediction* (with its probability as the score) and a label made here
as an *annotation* — and the labelling config (:func:`label_config`) that the project needs.
In (:func:`read_choices`, :func:`match_tasks`): each task's latest annotation that was not
cancelled, matched to a crop by the path this export wrote, else by the image URL's path;
the labels then go through the session's journal like any other decision (input
``import``), so the class-folder tree and ``labels.csv`` stay the one record of truth.
Cost: O(crops + tasks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse
from xml.sax.saxutils import quoteattr

from crystalscope.errors import UserError
from crystalscope.label.session import LabelSession

FROM_NAME, TO_NAME = "class", "image"  # the names in the labelling config
LOCAL_FILES = "/data/local-files/?d="  # Label Studio's local-file storage URLs


def label_config(classes: list[str]) -> str:
    """The Label Studio labelling config: the crop and one choice per class."""
    choices = "".join(f"\n    <Choice value={quoteattr(c)}/>" for c in classes)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" '
            f'showInline="true">{choices}\n  </Choices>\n</View>\n')


def _choice(label: str, score: float | None = None) -> dict[str, Any]:
    result = {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
              "value": {"choices": [label]}}
    return {"result": [result], **({"score": score} if score is not None else {})}


def export_tasks(session: LabelSession, url_prefix: str = LOCAL_FILES,
                 model_version: str = "") -> list[dict[str, Any]]:
    """One Label Studio task per crop: ``data.image`` = ``url_prefix`` + its path in the images
    folder; the model's guess as a prediction; a label made here as an annotation."""
    tasks = []
    probabilities, model_classes = session.scores.probabilities, session.scores.classes
    for index, crop in enumerate(session.crops):
        task: dict[str, Any] = {"data": {"image": url_prefix + crop.name,
                                         "crystalscope_file": crop.name,
                                         "sha256": crop.sha256}}
        if probabilities is not None:
            best = int(probabilities[index].argmax())
            task["predictions"] = [{**_choice(model_classes[best],
                                              round(float(probabilities[index][best]), 4)),
                                    "model_version": model_version}]
        label = session.labels.get(crop.name)
        if label is not None:
            task["annotations"] = [_choice(label)]
        tasks.append(task)
    return tasks


@dataclass
class ImportResult:
    """What an import did."""

    labelled: list[tuple[int, str]] = field(default_factory=list)  # (crop index, class)
    unmatched: list[str] = field(default_factory=list)  # tasks no crop was found for
    not_a_class: list[str] = field(default_factory=list)  # choices outside --classes
    unannotated: int = 0


def read_tasks(path: Path) -> list[dict[str, Any]]:
    """A Label Studio JSON export: a list of tasks."""
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable Label Studio JSON export ({exc})") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise UserError(f"{path}: a Label Studio JSON export is a list of tasks (Export -> "
                        "JSON in the project)")
    return tasks


def read_choice(task: dict[str, Any]) -> str | None:
    """The class of the task's latest annotation that was not cancelled (None: none)."""
    annotations = [a for a in task.get("annotations") or []
                   if isinstance(a, dict) and not a.get("was_cancelled")]
    for annotation in reversed(annotations):
        for result in annotation.get("result") or []:
            choices = (result.get("value") or {}).get("choices") if isinstance(result, dict) \
                else None
            if choices:
                return str(choices[0])
    return None


def _task_path(task: dict[str, Any]) -> str:
    """The crop's path as the task names it: ours, else the image URL's (``?d=`` of a local
    file, or the URL's path)."""
    data = task.get("data") or {}
    if data.get("crystalscope_file"):
        return str(data["crystalscope_file"])
    url = urlparse(str(data.get("image", "")))
    local = parse_qs(url.query).get("d")
    return unquote(local[0] if local else url.path)


def match_tasks(session: LabelSession, tasks: list[dict[str, Any]]) -> ImportResult:
    """Each annotated task's class and crop: by the whole path when it names one, else by the
    longest path suffix that is unique among the crops (``a/b/c.png``, ``b/c.png``, ``c.png``)."""
    by_suffix: dict[str, int | None] = {}
    for index, crop in enumerate(session.crops):
        parts = PurePosixPath(crop.name).parts
        for start in range(len(parts)):
            key = "/".join(parts[start:])
            by_suffix[key] = index if key not in by_suffix else None  # None: ambiguous
    result = ImportResult()
    for task in tasks:
        label = read_choice(task)
        if label is None:
            result.unannotated += 1
            continue
        path = _task_path(task).replace("\\", "/").lstrip("/")
        parts = PurePosixPath(path).parts
        index = next((by_suffix[k] for k in ("/".join(parts[s:]) for s in range(len(parts)))
                      if by_suffix.get(k) is not None), None)
        if index is None:
            result.unmatched.append(path)
        elif label not in session.classes:
            result.not_a_class.append(label)
        else:
            result.labelled.append((index, label))
    return result
