"""A labelling session: the crops to label, in the order that teaches a model most, and every
decision journalled and mirrored as a copy (or hard link) in ``LABELLED/<class>/``.

The images are never moved or modified. ``LABELLED/labels.csv`` is the record of truth: a copy
is made or removed after its row is on disk, and a restart replays the journal and puts the
class folders back in step with it, so a crash at any point loses nothing. While a session
runs, ``LABELLED/.label.lock`` is locked by the operating system (released even by ``kill -9``),
and a second session on the same folder is refused.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crystalscope.data.dedupe import file_sha256
from crystalscope.data.layout import expand_paths
from crystalscope.errors import UserError
from crystalscope.label.journal import Journal, read_decisions, replay
from crystalscope.label.ordering import FarthestFirst, uncertainty_weights
from crystalscope.label.scoring import Scores, scan_crop, score_crops
from crystalscope.parallel import ordered_map
from crystalscope.settings import SettingsError

if TYPE_CHECKING:
    from crystalscope.infer.predictor import Predictor

JOURNAL, LOCK = "labels.csv", ".label.lock"
CHUNK = 200  # crops ordered at a time (farthest-first costs one pass over all crops per pick)
NEIGHBOURS = 4
CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_label_classes(text: str) -> list[str]:
    """``cex,pg`` -> ["cex", "pg"]: 1-9 distinct names usable as folder names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not CLASS_NAME.match(n)]
    if not names or len(names) > 9 or bad or len(set(names)) != len(names):
        raise SettingsError("classes", "give 1 to 9 distinct names (letters, digits, _ . -), "
                            "comma-separated, e.g. cex,pg" + (f"; not {bad[0]!r}" if bad else ""),
                            text)
    return names


class StaleCrop(UserError):
    """A decision for a crop that is not the one under the cursor (a second tab, a key held
    down, a double press): refused, so no crop is labelled unseen."""


class FolderLock:
    """An OS lock on ``folder/.label.lock`` for this process's lifetime."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self._handle = self.path.open("a+")
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(self._handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._handle.close()
            raise UserError(f"{folder}: another `crystalscope label` is labelling into it; "
                            "close that one first (one session per folder)") from None

    def release(self) -> None:
        self._handle.close()


@dataclass
class Crop:
    """One image to label."""

    path: Path
    name: str  # relative to the images folder, with forward slashes: the journal's key
    sha256: str
    copy_name: str  # its file name inside LABELLED/<class>/


@dataclass
class LabelSession:
    """The crops, the journal and the order; one instance serves one page."""

    crops: list[Crop]
    out: Path
    classes: list[str]
    scores: Scores
    link: bool = False
    unreadable: list[str] = field(default_factory=list)
    journal: Journal | None = None
    labels: dict[str, str] = field(default_factory=dict)  # crop name -> class
    history: list[str] = field(default_factory=list)  # standing decisions' crops, in order
    queue: list[int] = field(default_factory=list)  # crops not yet decided, next first
    cursor: int = 0  # position in history + [queue head]
    lock: FolderLock | None = None
    ranked: set[int] = field(default_factory=set)  # crops placed by the active order
    by_name: dict[str, int] = field(default_factory=dict)  # crop name -> index
    traversal: FarthestFirst | None = None  # the active order, continued chunk after chunk

    def __post_init__(self) -> None:
        self.by_name = {crop.name: i for i, crop in enumerate(self.crops)}

    def close(self) -> None:
        if self.journal:
            self.journal.close()
        if self.lock:
            self.lock.release()

    # ---- what the page shows
    def current(self) -> int | None:
        """The crop under the cursor: a decided one (going back) or the next to label."""
        if self.cursor < len(self.history):
            return self.by_name[self.history[self.cursor]]
        return self.queue[0] if self.queue else None

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for label in self.labels.values():
            counts[label] = counts.get(label, 0) + 1
        return counts

    def state(self) -> dict[str, Any]:
        index = self.current()
        skipped = len({n for n in self.history if n not in self.labels})
        return {"classes": self.classes, "counts": self.counts(), "labelled": len(self.labels),
                "skipped": skipped, "left": len(self.queue), "total": len(self.crops),
                "unreadable": self.unreadable, "order": self.scores.note,
                "position": self.cursor, "history": len(self.history),
                "crop": None if index is None else self.describe(index)}

    def describe(self, index: int) -> dict[str, Any]:
        crop = self.crops[index]
        info: dict[str, Any] = {"id": index, "name": crop.name,
                                "label": self.labels.get(crop.name),
                                "neighbours": self.neighbours(index)}
        if self.scores.probabilities is not None:  # columns in the model's own class order
            p = self.scores.probabilities[index]
            best = int(np.argmax(p))
            info["guess"] = {"class": self.scores.classes[best],
                             "probability": round(float(p[best]), 4)}
        return info

    def neighbours(self, index: int) -> list[dict[str, Any]]:
        """The nearest already-labelled crops (embedding distance), with their classes."""
        lookup = self.by_name
        labelled = [lookup[n] for n in self.labels if lookup[n] != index]
        if not labelled:
            return []
        e = self.scores.embeddings
        distances = np.sqrt(((e[labelled] - e[index]) ** 2).sum(1))
        nearest = np.argsort(distances)[:NEIGHBOURS]
        return [{"id": labelled[i], "label": self.labels[self.crops[labelled[i]].name],
                 "distance": round(float(distances[i]), 3)} for i in nearest]

    # ---- decisions
    def label(self, label: str, input: str, crop: int | None = None) -> None:
        """Label the crop under the cursor; ``crop`` (the page sends it): the crop the person
        saw, refused unless it is still the one under the cursor."""
        if label not in self.classes:
            raise UserError(f"class {label!r}: use one of {', '.join(self.classes)}")
        self._decide(label, "label", input, crop)

    def skip(self, input: str, crop: int | None = None) -> None:
        self._decide("", "skip", input, crop)

    def _decide(self, label: str, action: str, input: str, seen: int | None) -> None:
        index = self.current()
        if index is None:
            raise UserError("nothing left to label")
        if seen is not None and seen != index:
            raise StaleCrop(f"crop {seen} is no longer the one shown (now crop {index}, "
                            f"{self.crops[index].name}); nothing was labelled")
        self.record(index, label, action, input)

    def record(self, index: int, label: str, action: str, input: str) -> None:
        """Journal one decision about crop ``index`` (shown or not: an import) and put its
        copy where the journal says."""
        if action == "label" and label not in self.classes:
            raise UserError(f"class {label!r}: use one of {', '.join(self.classes)}")
        crop = self.crops[index]
        assert self.journal is not None
        self.journal.append(crop.name, crop.sha256, label, action, input)
        # A crop's place in the history is its latest decision; a skipped crop waits at the
        # end of the queue until it is labelled.
        self.history = [n for n in self.history if n != crop.name] + [crop.name]
        self.queue = [i for i in self.queue if i != index]
        if action == "skip":
            self.queue.append(index)
            self.ranked.add(index)
        if action == "label":
            self.labels[crop.name] = label
        else:
            self.labels.pop(crop.name, None)
        self._sync(crop)
        self.cursor = len(self.history)
        self._top_up()

    def record_many(self, decisions: list[tuple[int, str]], input: str) -> None:
        """Journal a label for each (crop index, class) — an import — then replay the journal
        once: O(N + decisions), where one :meth:`record` per decision would cost O(N) each."""
        assert self.journal is not None
        for _, label in decisions:
            if label not in self.classes:
                raise UserError(f"class {label!r}: use one of {', '.join(self.classes)}")
        for index, label in decisions:
            crop = self.crops[index]
            self.journal.append(crop.name, crop.sha256, label, "label", input)
        self._reload()
        for index, _ in decisions:
            self._sync(self.crops[index])
        self.cursor = len(self.history)
        self._top_up()

    def undo(self, input: str) -> None:
        """Take back the latest standing decision; its crop is shown again."""
        if not self.history:
            raise UserError("nothing to undo")
        assert self.journal is not None
        name = self.history[-1]
        crop = self.crops[self.by_name[name]]
        self.journal.append(name, crop.sha256, "", "undo", input)
        self._reload()
        index = self.by_name[name]
        if name not in self.history:  # its only decision was undone: back to the queue's head
            self.queue = [index] + [i for i in self.queue if i != index]
            self.ranked.add(index)
            self.cursor = len(self.history)
        else:
            self.cursor = self.history.index(name)
        self._sync(crop)

    def move(self, step: int) -> None:
        """Arrow keys: back through the decided crops, or forward to the next to label."""
        self.cursor = min(max(self.cursor + step, 0), len(self.history))

    # ---- keeping folders and order in step with the journal
    def _reload(self) -> None:
        labels, standing = replay(read_decisions(self.out / JOURNAL))
        self.labels = {n: c for n, c in labels.items() if n in self.by_name}
        names, seen = [], set()
        for decision in reversed(standing):  # a crop's latest decision sets its place
            if decision.file in self.by_name and decision.file not in seen:
                seen.add(decision.file)
                names.append(decision.file)
        self.history = names[::-1]
        decided = {self.by_name[n] for n in self.history}
        skipped = [self.by_name[n] for n in self.history if n not in self.labels]
        self.queue = [i for i in self.queue if i not in decided] + skipped
        self.ranked |= set(skipped)

    def _sync(self, crop: Crop) -> None:
        """Make LABELLED/<class>/ hold this crop's copy exactly where the journal says."""
        wanted = self.labels.get(crop.name)
        for name in self.classes:
            target = self.out / name / crop.copy_name
            if name == wanted:
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _place(crop.path, target, self.link)
            elif target.is_file() and file_sha256(target) == crop.sha256:
                target.unlink()  # our own copy (same bytes as the source): never a user file

    def _top_up(self) -> None:
        """Order the next chunk once fewer than half a chunk of ordered crops is left.

        Every crop that is decided or already ordered is a centre the next picks keep away
        from. The traversal keeps each crop's distance to the nearest centre between chunks,
        so a chunk costs O(CHUNK x N x d), and a centre added from outside the order (a
        decision replayed from the journal) O(N x d) once; never N x N.
        """
        head = 0
        while head < len(self.queue) and self.queue[head] in self.ranked:
            head += 1
        if head == len(self.queue) or head > CHUNK // 2:
            return
        rest = self.queue[head:]
        unranked = np.array([i for i in rest if i not in self.ranked], dtype=np.int64)
        if self.traversal is None:
            self.traversal = FarthestFirst(self.scores.embeddings,
                                           uncertainty_weights(self.scores.probabilities))
        centre = np.ones(len(self.crops), dtype=bool)
        centre[unranked] = False
        self.traversal.place(np.flatnonzero(centre & ~self.traversal.taken))
        picks = self.traversal.pick(min(CHUNK, len(unranked)))
        chosen = set(picks)
        self.queue = self.queue[:head] + picks + [i for i in rest if i not in chosen]
        self.ranked |= chosen


def _place(source: Path, target: Path, link: bool) -> None:
    partial = target.with_name(f".{target.name}.partial")
    if link:
        try:
            os.link(source, partial)
        except OSError:  # another file system, or links not allowed: copy instead
            shutil.copy2(source, partial)
    else:
        shutil.copy2(source, partial)
    partial.replace(target)


def _copy_names(names: list[str], hashes: list[str]) -> list[str]:
    """File names inside a class folder: the crop's own, or with its hash where two crops from
    different subfolders share a name."""
    base = [Path(n).name for n in names]
    taken = Counter(base)  # O(N): list.count per name was O(N^2)
    return [b if taken[b] == 1 else f"{Path(b).stem}-{h[:8]}{Path(b).suffix}"
            for b, h in zip(base, hashes, strict=True)]


def _keep_copy_names(session: LabelSession) -> None:
    """A labelled crop keeps the copy name it was given, even when a new crop with the same
    file name (in another subfolder) would now give both a hashed name: otherwise its copy
    would be made again under the new name and the old one left behind. O(labelled crops)."""
    for crop in session.crops:
        label = session.labels.get(crop.name)
        plain = Path(crop.name).name
        if label is None or crop.copy_name == plain:
            continue
        earlier = session.out / label / plain
        if earlier.is_file() and file_sha256(earlier) == crop.sha256:
            crop.copy_name = plain


def check_model_classes(model_classes: list[str], classes: list[str]) -> None:
    """The model's classes must name every labelling class (matched by name, in any order)."""
    missing = [c for c in classes if c not in model_classes]
    if missing:
        raise UserError(f"the model's classes ({', '.join(model_classes)}) do not include "
                        f"{', '.join(missing)} from --classes; give a model trained on these "
                        "classes, or no --model")


def open_session(images: Path, out: Path, classes: list[str], *,
                 predictor: Predictor | None = None, link: bool = False,
                 embed: Callable[[list[Path]], Scores] | None = None) -> LabelSession:
    """Lock ``out``, read the images (unreadable ones listed), score them and replay the
    journal. ``embed`` (tests) replaces the scoring."""
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise UserError(f"{images}: not a folder of images")
    if out.resolve() == images.resolve():
        raise SettingsError("out", "must differ from the images folder", out)
    if predictor is not None:
        check_model_classes(list(predictor.classes), classes)
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out)
    try:
        inside = out.resolve()
        files = [p for p in expand_paths([images]) if inside not in p.resolve().parents]
        readable, unreadable, hashes, pixels = [], [], [], []
        for path, scan in zip(files, ordered_map(scan_crop, files, min_parallel=256,
                                                 chunksize=64), strict=True):
            if scan.error is not None:
                unreadable.append(scan.error)
            else:
                readable.append(path)
                hashes.append(scan.sha256)
                pixels.append(scan.pixels)
        if not readable:
            raise UserError(f"{images}: holds no readable images")
        # Named where they lie in the folder, not where a symbolic link points (outside it)
        names = [Path(os.path.relpath(p.absolute(), images.absolute())).as_posix()
                 for p in readable]
        crops = [Crop(p, n, h, c) for p, n, h, c in
                 zip(readable, names, hashes, _copy_names(names, hashes), strict=True)]
        scores = (embed(readable) if embed else
                  score_crops(readable, predictor, pixels=np.asarray(pixels)))
        session = LabelSession(crops=crops, out=out, classes=classes, scores=scores, link=link,
                               unreadable=unreadable, lock=lock)
        session.journal = Journal(out / JOURNAL)
        session.queue = list(range(len(crops)))
        session._reload()
        _keep_copy_names(session)
        for crop in crops:  # a crash between a journal row and its copy: put it right
            session._sync(crop)
        session.cursor = len(session.history)
        session._top_up()
        return session
    except BaseException:
        lock.release()
        raise
