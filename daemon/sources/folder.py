"""Watched-folder source (watchdog): videos and images dropped into an inbox.

A file is taken only when complete: on close-after-write (inotify ``IN_CLOSE_WRITE``) or when it
is moved in; with a polling observer (NFS, SMB), or when a periodic rescan finds a file no event
announced, only once its size and mtime have been stable for ``stable_s``. Files are claimed by
an atomic rename into the work folder, so an input is never processed twice and a restart
resumes what was claimed. Duplicate events are harmless: the second rename finds nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path

import structlog
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from daemon import media
from daemon.config import FolderSourceConfig
from daemon.sinks.folder import FolderSink

log = structlog.get_logger()

#: Longest output NAME in bytes: NAME_MAX (255) less ``.`` + ``.verdicts.jsonl.part`` and room
#: for a ``-N`` suffix.
MAX_STEM = 200


class _Handler(FileSystemEventHandler):
    def __init__(self, source: FolderSource) -> None:
        self.source = source

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileClosedEvent):
            self.source.offer(Path(os.fsdecode(event.src_path)))
        elif isinstance(event, FileMovedEvent):
            self.source.offer(Path(os.fsdecode(event.dest_path)))
        elif isinstance(event, FileCreatedEvent) or (
            isinstance(event, FileModifiedEvent) and self.source.cfg.polling
        ):
            # inotify announces the close of a file written here; a file moved in from another
            # folder arrives as "created" (watchdog cannot pair the move), so it gets the size
            # check a rescan would give it, without waiting for the rescan.
            self.source.watch(Path(os.fsdecode(event.src_path)))


class FolderSource:
    """An inbox with claim-by-rename, resume, rescan and a failed/ folder.

    Args:
        index: position in ``[[sources]]``.
        cfg: ``[[sources]] kind = "folder"``.
        work_dir: ``[daemon] work_dir`` (default home of the claimed folder).
        sink: the outbox (to avoid name clashes and to recognise committed outputs).
        rescan_s: period of the full rescan.
    """

    def __init__(
        self,
        index: int,
        cfg: FolderSourceConfig,
        work_dir: str,
        sink: FolderSink,
        rescan_s: float = 30.0,
    ) -> None:
        self.index, self.cfg, self.sink = index, cfg, sink
        self.name = f"folder{index}"
        self.inbox = Path(cfg.path)
        self.work = Path(cfg.work) if cfg.work else Path(work_dir) / "claimed" / str(index)
        self.failed = Path(cfg.failed) if cfg.failed else self.inbox.parent / "failed"
        self.rescan_s = rescan_s
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._resume: list[Path] = []
        self._stable: dict[str, tuple[int, int, float]] = {}
        self._ignored: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._observer = (
            PollingObserver(timeout=max(0.2, min(cfg.stable_s, 1.0))) if cfg.polling else Observer()
        )
        self._ticker = threading.Thread(target=self._tick, name=f"{self.name}-scan", daemon=True)

    # ---- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Create folders, list claimed files to resume, watch, and scan once."""
        for d in (self.inbox, self.work, self.failed):
            d.mkdir(parents=True, exist_ok=True)
        for tmp in self.work.glob(".*.part"):
            tmp.unlink(missing_ok=True)
        self._resume = sorted(
            p for p in self.work.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if self._resume:
            log.info("resuming claimed files", source=self.name, files=len(self._resume))
        self._observer.schedule(_Handler(self), str(self.inbox), recursive=False)
        self._observer.start()
        self.rescan()
        self._ticker.start()
        log.info(
            "folder source ready",
            source=self.name,
            inbox=str(self.inbox),
            work=str(self.work),
            failed=str(self.failed),
            polling=self.cfg.polling,
        )

    def stop(self) -> None:
        """Stop watching (claimed and pending files stay for the next start)."""
        self._stop.set()
        self._wake.set()
        self._observer.stop()
        self._observer.join(5)
        self._ticker.join(5)

    # ---- events -------------------------------------------------------------------------
    def _eligible(self, path: Path) -> bool:
        if path.parent != self.inbox or path.name.startswith("."):
            return False
        if not media.is_media(path):
            if path.name not in self._ignored:
                self._ignored.add(path.name)
                log.warning("ignoring a file of unknown type", source=self.name, file=path.name)
            return False
        return True

    def offer(self, path: Path) -> None:
        """A complete file (closed after write, or moved in): queue it once."""
        if not self._eligible(path) or not path.is_file():
            return
        with self._lock:
            self._stable.pop(path.name, None)
            if path.name not in self._pending:
                self._pending[path.name] = None
                log.debug("file queued", source=self.name, file=path.name)
        self._wake.set()

    def watch(self, path: Path) -> None:
        """A file that may still be growing: take it once its size is stable."""
        if not self._eligible(path):
            return
        with self._lock:
            if path.name not in self._pending:
                self._stable.setdefault(path.name, (-1, -1, time.monotonic()))

    def rescan(self) -> None:
        """List the inbox: catches files whose events were missed (or came before start)."""
        try:
            names = [p for p in self.inbox.iterdir() if p.is_file()]
        except OSError as e:
            log.error("cannot list the inbox", source=self.name, error=str(e))
            return
        for p in sorted(names):
            # Files no event announced (present at start, or missed) must show a stable size.
            if p.name not in self._pending:
                self.watch(p)
        self._check_stable()

    def _check_stable(self) -> None:
        now = time.monotonic()
        ready = []
        with self._lock:
            for name, (size, mtime, since) in list(self._stable.items()):
                try:
                    st = (self.inbox / name).stat()
                except FileNotFoundError:
                    del self._stable[name]
                    continue
                if (st.st_size, st.st_mtime_ns) != (size, mtime):
                    self._stable[name] = (st.st_size, st.st_mtime_ns, now)
                elif now - since >= (
                    self.cfg.stable_s if st.st_size else max(self.cfg.stable_s, self.rescan_s)
                ):
                    # an empty file may be an upload not started yet: it waits longer, then is
                    # taken (and fails) rather than sitting in the inbox for ever
                    ready.append(name)
        for name in ready:
            self.offer(self.inbox / name)

    def _tick(self) -> None:
        last = time.monotonic()
        period = max(0.1, min(self.cfg.stable_s / 2, self.rescan_s))
        while not self._stop.wait(period):
            if time.monotonic() - last >= self.rescan_s:
                self.rescan()
                last = time.monotonic()
            else:
                self._check_stable()

    # ---- claiming -----------------------------------------------------------------------
    def _unique(self, stem: str, ext: str) -> str:
        n, name = 0, stem
        while (
            (self.work / f"{name}{ext}").exists()
            or self.sink.taken(name)
            or (self.failed / f"{name}.error.json").exists()
        ):
            n += 1
            name = f"{stem}-{n}"
        return name

    def claim(self, path: Path) -> Path | None:
        """Move ``path`` into the work folder atomically; None if someone else took it.

        The claimed name (NAME of the outputs) keeps at most :data:`MAX_STEM` bytes of the
        original stem, so that ``.NAME.verdicts.jsonl.part`` still fits in a file name.
        """
        name = self._unique(os.fsdecode(os.fsencode(path.stem)[:MAX_STEM]), path.suffix.lower())
        dest = self.work / f"{name}{path.suffix.lower()}"
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != 18:  # EXDEV: inbox and work folder on different file systems
                raise
            tmp = self.work / f".{dest.name}.part"
            shutil.copy2(path, tmp)
            media.fsync_replace(tmp, dest)
            path.unlink(missing_ok=True)
        log.info("file claimed", source=self.name, file=path.name, claimed=dest.name)
        return dest

    def next_file(self, timeout: float) -> tuple[Path, str] | None:
        """The next claimed file ``(claimed path, original name)``, waiting up to ``timeout``."""
        if self._resume:
            p = self._resume.pop(0)
            return p, p.name
        deadline = time.monotonic() + timeout
        while not self._stop.is_set():
            with self._lock:
                name = next(iter(self._pending), None)
                if name is not None:
                    del self._pending[name]
                self._wake.clear()
            if name is not None:
                claimed = self.claim(self.inbox / name)
                if claimed is not None:
                    return claimed, name
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not self._wake.wait(left):
                return None
        return None

    def backlog(self) -> int:
        """Files waiting in the inbox plus claimed files not started."""
        with self._lock:
            return len(self._pending) + len(self._resume)

    # ---- endings ------------------------------------------------------------------------
    def done(self, claimed: Path, keep_dir: Path | None = None) -> None:
        """The outputs are committed: remove (or keep aside) the claimed input."""
        if keep_dir is not None:
            keep_dir.mkdir(parents=True, exist_ok=True)
            os.replace(claimed, keep_dir / claimed.name)
        else:
            claimed.unlink(missing_ok=True)

    def fail(self, claimed: Path, original: str, reason: str, message: str) -> Path:
        """Move the input to failed/ with ``NAME.error.json`` saying why."""
        self.failed.mkdir(parents=True, exist_ok=True)
        stem, ext = claimed.stem, claimed.suffix
        n, name = 0, stem
        while (self.failed / f"{name}{ext}").exists() or (
            self.failed / f"{name}.error.json"
        ).exists():
            if (
                not (self.failed / f"{name}{ext}").exists()
                and _claimed_by(self.failed / f"{name}.error.json") == claimed.name
            ):
                break  # our own record from a fail() killed before the move: reuse it
            n += 1
            name = f"{stem}-{n}"
        err = {
            "v": 1,
            "input": original,
            "file": f"{name}{ext}",
            "claimed": claimed.name,
            "reason": reason,
            "error": message,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        media.write_bytes(
            self.failed / f"{name}.error.json", (json.dumps(err, indent=2) + "\n").encode()
        )
        if claimed.exists():
            os.replace(claimed, self.failed / f"{name}{ext}")
        return self.failed / f"{name}.error.json"


def _claimed_by(error_file: Path) -> str | None:
    """The claimed name an ``NAME.error.json`` was written for (None if unreadable)."""
    try:
        return json.loads(error_file.read_text()).get("claimed")
    except (OSError, ValueError, AttributeError):
        return None
