"""Output folder sink: ``NAME.<ext>``, ``NAME.verdicts.jsonl``, ``NAME.summary.json``.

The files themselves are written by :func:`daemon.pipeline.process_file` (temporary name, fsync,
rename; the summary last); this sink owns the folder: it creates it, removes temporary files a
killed process left behind, and answers whether an input's outputs are already committed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog

from daemon.config import IMAGE_EXTS, VIDEO_EXTS, FolderSinkConfig

log = structlog.get_logger()


class FolderSink:
    """The outbox.

    Args:
        cfg: ``[[sinks]] kind = "folder"``.
    """

    def __init__(self, cfg: FolderSinkConfig) -> None:
        self.cfg = cfg
        self.path = Path(cfg.path)

    def start(self) -> None:
        """Create the folder and drop temporary files of an interrupted run."""
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.path.glob(".*.part"):
            log.info("removing an interrupted output", file=tmp.name)
            tmp.unlink(missing_ok=True)

    def committed(self, name: str) -> dict[str, Any] | None:
        """The summary of NAME if its outputs were committed, else None."""
        p = self.path / f"{name}.summary.json"
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def taken(self, name: str) -> bool:
        """Whether NAME is already used by some input's outputs."""
        names = [f"{name}.summary.json", f"{name}.verdicts.jsonl"] + [
            f"{name}{ext}" for ext in VIDEO_EXTS + IMAGE_EXTS
        ]
        return any((self.path / n).exists() for n in names)

    def close(self) -> None:  # noqa: D102
        pass
