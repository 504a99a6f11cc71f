"""Shared fixtures: a tiny random StarGAN checkpoint and profiles, in-process services, a
folder-to-folder config, a stand-in systemd notify socket. Plain helpers: ``helpers.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from tests.daemon.helpers import Notify, folder_io, running_service, write_config

if TYPE_CHECKING:
    from daemon.service import Service


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def fresh_logging():
    """Tests that run the CLI in-process configure structlog; undo it for the next test."""
    yield
    import logging

    import structlog

    structlog.reset_defaults()
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_magdr", False):
            root.removeHandler(h)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random G (32 px), tiny parser, and a detection-only profile (huge threshold)."""
    from bench.operator_page import flag_all_profile
    from bench.soak import tiny_models as build_tiny_models

    d = tmp_path_factory.mktemp("models")
    build_tiny_models(d, profile_name="test-detect-only")
    # Flags every face and reconstructs with one cheap search: the disrupted path, fast.
    flag_all_profile(d / "flag_all.json")
    return {
        "G": d / "G.pt",
        "parser": d / "parser.pt",
        "profile": d / "profile.json",
        "flag_all": d / "flag_all.json",
    }


@pytest.fixture
def service(tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[Callable[..., Service]]:
    """``service(body, guard=False, profile="profile", **write_config_kw)``: a started in-process
    Service on ``tmp_path/c.toml`` with the tiny models; every one is stopped after the test."""
    with ExitStack() as started:

        def make(body: str, guard: bool = False, profile: str = "profile", **kw) -> Service:
            models = {**tiny_models, "profile": tiny_models[profile]}
            cfg = write_config(tmp_path / "c.toml", models, body, guard=guard, **kw)
            return started.enter_context(running_service(cfg))

        yield make


@pytest.fixture
def folder_cfg(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """``tmp_path/c.toml``: guard on, ``tmp_path/inbox`` -> ``tmp_path/outbox``."""
    return write_config(tmp_path / "c.toml", tiny_models, folder_io(tmp_path), guard=True)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notify]:
    """A stand-in ``$NOTIFY_SOCKET`` at ``tmp_path/notify.sock``, closed after the test."""
    n = Notify(tmp_path / "notify.sock")
    try:
        yield n
    finally:
        n.close()
