"""Following a stream while the probe writes it: ``watch`` (the CLI's ``--watch``) and
``watch_in_background`` (``serve --monitor``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from crystalscope.data.layout import is_image_name, list_files
from crystalscope.infer.predictor import Predictor
from crystalscope.monitor.frames import Window
from crystalscope.monitor.run import Monitor, Publisher
from crystalscope.monitor.trend import AlarmRule, MonitorResult
from crystalscope.settings import SettingsError


def watch_in_background(predictor: Predictor, rule: AlarmRule, stream: Path, *,
                        publishers: Sequence[Publisher] = (), poll_s: float = 1.0,
                        settle_s: float = 5.0) -> Monitor:
    """A monitor that follows ``stream`` in a daemon thread (for ``serve --monitor``); its
    files go to a temporary folder, its state is read from the returned object. If the
    thread dies, the monitor is marked degraded with the reason (``/health`` answers 503)."""
    import tempfile
    import threading

    monitor = Monitor(predictor, rule, Path(tempfile.mkdtemp(prefix="crystalscope-serve-monitor-")),
                      publishers=publishers)

    def follow() -> None:
        try:
            watch(monitor, stream, poll_s=poll_s, settle_s=settle_s)
            monitor.mark_degraded("the watcher stopped")
        except Exception as exc:  # the thread's end: tell /health, OPC UA and the page why
            monitor.mark_degraded(f"the watcher died: {type(exc).__name__}: {exc}")

    monitor.watcher = threading.Thread(target=follow, name="monitor-watch", daemon=True)
    monitor.watcher.start()
    return monitor


def _window_folders(stream: Path) -> list[Path]:
    return sorted(d for d in stream.iterdir() if d.is_dir() and not d.name.startswith("."))


class _OpenWindow:
    """The files of the newest window folder, followed from poll to poll.

    Each poll lists the names (``list_files``: no stat per file) and stats only the new ones
    and those changed within the last ``settle_s`` seconds (they may still be being written):
    O(files) names plus O(new + recent) stats per poll, not a stat of every file of a window
    that may receive 10^5 files.
    """

    def __init__(self, folder: Path, settle_s: float) -> None:
        self.folder, self.settle_s = folder, settle_s
        self.mtimes: dict[Path, float] = {}

    def look(self) -> float:
        """Update; return the newest modification time (the folder's own when empty)."""
        now = time.time()
        for path in (p for p in list_files(self.folder) if is_image_name(p)):
            known = self.mtimes.get(path)
            if known is None or now - known < self.settle_s:
                try:
                    self.mtimes[path] = path.stat().st_mtime
                except OSError:  # deleted or rotated away since the listing
                    self.mtimes.pop(path, None)
        return max(self.mtimes.values(), default=self.folder.stat().st_mtime)

    def files(self) -> list[Path]:
        return sorted(self.mtimes, key=lambda p: p.relative_to(self.folder).as_posix())


def check_watched(stream: Path) -> None:
    """A watched stream is a folder the probe writes time folders to (it may still be empty)."""
    if not Path(stream).is_dir():
        raise SettingsError("watch", "give the folder the probe writes time folders to", stream)


def watch(monitor: Monitor, stream: Path, *, poll_s: float = 1.0, settle_s: float = 5.0,
          idle_stop_s: float | None = None) -> MonitorResult:
    """Process time folders as the probe writes them, until Ctrl-C (or ``idle_stop_s``).

    A window is complete once a later window folder exists, or when nothing in it has changed
    for ``settle_s`` seconds.
    """
    done: set[str] = set(monitor.done_times)
    vanished: set[str] = set()  # not counted as windows
    open_window: _OpenWindow | None = None
    last_activity = time.monotonic()
    monitor.say(f"watching {stream} (Ctrl-C to stop)")
    try:
        while True:
            try:
                folders = _window_folders(Path(stream))
            except OSError as exc:
                monitor.event("stream_unreadable", error=str(exc))
                folders = []
            for position, folder in enumerate(folders):
                if folder.name in done or folder.name in vanished:
                    continue
                if open_window is None or open_window.folder != folder:
                    open_window = _OpenWindow(folder, settle_s)
                try:
                    newest = open_window.look()
                except OSError as exc:  # deleted or rotated away before it was processed
                    monitor.event("window_vanished", time=folder.name, error=str(exc))
                    monitor.say(f"[yellow]window {folder.name}: gone before it was read; "
                                "skipped[/yellow]")
                    open_window = None
                    vanished.add(folder.name)
                    continue
                later_exists = position < len(folders) - 1
                if not later_exists and time.time() - newest < settle_s:
                    break  # the probe may still be writing this window
                files = open_window.files()
                open_window = None
                done.add(folder.name)
                monitor.process(Window(len(done), folder.name, files))
                last_activity = time.monotonic()
            if idle_stop_s is not None and time.monotonic() - last_activity > idle_stop_s:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        monitor.say("stopped")
    return monitor.finish()
