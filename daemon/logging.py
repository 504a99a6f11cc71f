"""structlog set-up: JSON lines for journald, a ConsoleRenderer on a TTY (STYLE: structlog).

``configure()`` is called once at start-up. Modules take ``log = structlog.get_logger()`` at
module scope and bind per stream/file/frame context with structlog's contextvars (see
:func:`bound`), so every line a worker thread writes says what it was working on.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _drop_color_message(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Small processor: keep exception text on one line-friendly key for journald."""
    event_dict.pop("color_message", None)
    return event_dict


class SysStream:
    """``sys.stdout``/``sys.stderr`` looked up at every write, not bound once.

    Binding the stream object at start-up breaks when it is swapped later (pytest's capture,
    a CLI that redirects): writes would go to a closed file.
    """

    def __init__(self, name: str = "stdout") -> None:
        self.name = name

    def write(self, s: str) -> int:  # noqa: D102
        return getattr(sys, self.name).write(s)

    def flush(self) -> None:  # noqa: D102
        getattr(sys, self.name).flush()

    def isatty(self) -> bool:  # noqa: D102
        return getattr(sys, self.name).isatty()


def configure(level: str = "info", fmt: str = "auto", stream: str = "stdout") -> None:
    """Configure structlog once for the process.

    Args:
        level: ``debug`` | ``info`` | ``warning`` | ``error``.
        fmt: ``auto`` (console on a TTY, JSON otherwise) | ``json`` | ``console``.
        stream: ``"stdout"`` (journald reads it) or ``"stderr"``.
    """
    out: Any = SysStream(stream)
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        _drop_color_message,
    ]
    if not console:
        processors.append(structlog.processors.format_exc_info)
    # Lines from the standard library's loggers (watchdog, the magdr library) go through the
    # same renderer, so stdout stays one JSON object per line.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer, foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors]
        )
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_magdr", False):
            root.removeHandler(h)
    handler._magdr = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(max(LEVELS[level], logging.INFO))
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the level at run time (SIGHUP reload) without touching the rest."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]))


@contextlib.contextmanager
def bound(**kw: Any) -> Iterator[None]:
    """Bind context variables for the duration of a block (per file, per stream)."""
    with structlog.contextvars.bound_contextvars(**kw):
        yield


def say(*parts: object, file: TextIO | None = None) -> None:
    """The CLI's human output (``process``/``demo``): the one place that writes plain text."""
    out = file or sys.stdout
    out.write(" ".join(str(p) for p in parts) + "\n")
    out.flush()
