"""The operator page in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against the daemon as a subprocess fed with the bundled demo clip's frames by a
ZeroMQ sender. Screenshots go to ``$MAGDR_SCREENSHOTS`` (default: the test's tmp folder)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from bench.operator_page import CHROMIUM, DEMO, Sender, clip_frames, launch
from tests.daemon.helpers import (
    free_port,
    running_daemon,
    wait_until,
    write_config,
    zmq_source,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

TOKEN = "test-token-0123456789"
HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
STREAM = "cam-1"


@pytest.fixture
def sync_playwright():
    """Playwright's sync API; skips (saying what to install) without it or Chromium."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed: pip install -e '.[web-test]'")
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian's package)")
    return sync_playwright


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    d = Path(os.environ.get("MAGDR_SCREENSHOTS", tmp_path / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def api(port: int, path: str, token: str | None = TOKEN) -> tuple[int, object]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:  # not listening yet
        return 0, None


@pytest.fixture
def daemon_page(tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[int]:
    """The daemon with a ZeroMQ source, the flag-all profile and ``[http]`` with a token,
    fed by a ZeroMQ sender of the demo clip's frames; yields the page's port."""
    zport, web = free_port(), free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    body = zmq_source(zport, socket="pull", bind=True) + (
        f'\n[http]\nenabled = true\nport = {web}\ntoken = "file:{tmp_path / "token"}"\n'
    )
    models = {**tiny_models, "profile": tiny_models["flag_all"]}
    cfg = write_config(tmp_path / "c.toml", models, body, guard=True, faces="detect")
    with running_daemon(cfg, tmp_path / "daemon.log") as proc:
        assert wait_until(lambda: api(web, "/api/streams")[0] == 200, 60), (
            tmp_path / "daemon.log"
        ).read_text()[-3000:]
        frames = clip_frames(DEMO, every=3)  # real faces, sent as JPEG like a camera's
        # a second stream, whose id is markup, sends one frame
        with Sender(zport, {STREAM: frames, HOSTILE: frames[:1]}, fps=4):
            yield web
        assert proc.poll() is None  # still running when the test is done


def test_operator_page(sync_playwright, daemon_page: int, shots: Path):
    web = daemon_page
    url = f"http://127.0.0.1:{web}/"
    # the JSON API lists the ZeroMQ stream with its counters while the daemon runs
    assert wait_until(
        lambda: any(s["id"] == STREAM and s["flagged"] > 0 for s in api(web, "/api/streams")[1]), 60
    )
    with sync_playwright() as p:
        browser = launch(p)
        try:
            # the token: without it (or with a wrong one) every request is refused
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                ctx = browser.new_context(extra_http_headers=headers)
                assert ctx.new_page().goto(url).status == 401
                ctx.close()
            ctx = browser.new_context(
                extra_http_headers={"Authorization": f"Bearer {TOKEN}"},
                viewport={"width": 1280, "height": 1000},
            )
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            assert page.goto(url).status == 200
            # the page lists the stream, and the hostile one as plain text
            row = page.locator("#streams tbody tr", has_text=STREAM)
            row.wait_for(timeout=30_000)
            hostile = page.locator("#streams tbody td.name", has_text="<script>")
            hostile.wait_for(timeout=30_000)
            assert hostile.text_content() == HOSTILE
            assert page.evaluate("window.pwned") is None
            assert page.locator("#streams tbody script, #streams tbody img").count() == 0
            page.screenshot(path=shots / "1-streams.png", full_page=True)
            # the live view: the frame changes (a newer seq loads) with the faces' boxes
            row.click()
            frame = page.locator("#frame")

            def shown_seq() -> int:
                page.wait_for_function(
                    "() => document.getElementById('frame').complete && "
                    "document.getElementById('frame').naturalWidth > 0",
                    timeout=30_000,
                )
                return int(frame.get_attribute("src").rsplit("seq=", 1)[1])

            first = shown_seq()
            page.wait_for_function(
                f"() => Number(document.getElementById('frame').src.split('seq=')[1]) > {first}",
                timeout=30_000,
            )
            assert shown_seq() > first
            assert page.locator("#view-id").text_content() == STREAM
            assert "FLAGGED" in page.locator("#view-verdict").text_content()
            assert "threshold" in page.locator("#timeline-legend").text_content()
            page.screenshot(path=shots / "2-live-view.png", full_page=True)
            # a flagged face's side by side: five pictures, the chain, the regions
            button = page.locator("#flagged button").first
            button.wait_for(timeout=30_000)
            button.click()
            page.locator("#sidebyside").wait_for(state="visible")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#sbs-pictures img')]"
                ".filter(i => i.complete && i.naturalWidth > 0).length === 5",
                timeout=30_000,
            )
            kinds = page.locator("#sbs-pictures img").evaluate_all(
                "imgs => imgs.map(i => i.dataset.kind)"
            )
            assert kinds == ["input", "output_before", "purified", "output", "regions"]
            assert page.locator("#sbs-chain li").count() >= 1
            assert "S_final" in page.locator("#sbs-title").text_content()
            page.screenshot(path=shots / "3-flagged-face.png", full_page=True)
            # the hostile stream's own view shows its id as text too
            page.goto(f"{url}#stream={quote(HOSTILE, safe='')}")
            page.locator("#view-id").wait_for(state="visible")
            assert page.locator("#view-id").text_content() == HOSTILE
            assert page.evaluate("window.pwned") is None
            page.screenshot(path=shots / "4-hostile-id.png", full_page=True)
            assert errors == []
        finally:
            browser.close()
    for name in ("1-streams", "2-live-view", "3-flagged-face", "4-hostile-id"):
        assert (shots / f"{name}.png").stat().st_size > 0
    print(f"screenshots: {shots}")
