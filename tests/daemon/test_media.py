from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from daemon import media
from daemon.media import MediaError, VideoWriter
from tests.daemon.helpers import make_clip, read_pts

ASSET = Path(__file__).resolve().parents[2] / "daemon" / "assets" / "demo.mp4"


def test_decode_frames_and_timestamps(tmp_path):
    pts = make_clip(tmp_path / "a.mp4", frames=5, rate=10, time_base=Fraction(1, 12800))
    frames = list(media.decode(tmp_path / "a.mp4", 1 << 30))
    assert [f.pts for f in frames] == pts
    assert frames[0].image.shape == (32, 48, 3) and frames[0].image.dtype == np.uint8


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".avi", ".webm"])
def test_writer_keeps_rate_and_timestamps(tmp_path, ext):
    src = tmp_path / "src.mp4"
    pts = make_clip(src, frames=4, rate=10, time_base=Fraction(1, 12800))
    info = media.probe(src)
    w = VideoWriter(tmp_path / f"out{ext}", info)
    for f in media.decode(src, 1 << 30):
        w.write(f.image, f.pts)
    w.close()
    assert not media.temp_name(tmp_path / f"out{ext}").exists()
    got, tb = read_pts(tmp_path / f"out{ext}")
    assert len(got) == 4
    secs = [float(p * tb) for p in got]
    np.testing.assert_allclose(secs, [float(p * Fraction(1, 12800)) for p in pts], atol=1e-3)


def test_audio_is_copied(tmp_path):
    info = media.probe(ASSET)
    assert info.audio
    with media.audio_source(ASSET) as a:
        w = VideoWriter(tmp_path / "o.mp4", info, audio=a)
        for f in media.decode(ASSET, 1 << 30, on_audio=w.mux_audio):
            w.write(f.image, f.pts)
        w.close()
    with av.open(str(tmp_path / "o.mp4")) as c, av.open(str(ASSET)) as s:
        assert c.streams.audio[0].codec_context.name == "aac"
        assert sum(1 for _ in c.demux(c.streams.audio[0]) if _.size) == sum(
            1 for _ in s.demux(s.streams.audio[0]) if _.size
        )


def test_uncommitted_writer_leaves_nothing(tmp_path):
    src = tmp_path / "src.mp4"
    make_clip(src, frames=2)
    w = VideoWriter(tmp_path / "o.mp4", media.probe(src))
    for f in media.decode(src, 1 << 30):
        w.write(f.image, f.pts)
    assert not (tmp_path / "o.mp4").exists()
    w.close(commit=False)
    assert list(tmp_path.iterdir()) == [src]


class TestBadInput:
    def test_missing(self, tmp_path):
        with pytest.raises(MediaError) as e:
            list(media.decode(tmp_path / "nope.mp4", 1 << 30))
        assert e.value.reason == "missing"

    def test_garbage(self, tmp_path):
        (tmp_path / "g.mp4").write_bytes(b"\0garbage" * 100)
        with pytest.raises(MediaError) as e:
            list(media.decode(tmp_path / "g.mp4", 1 << 30))
        assert e.value.reason == "decode"

    def test_truncated(self, tmp_path):
        make_clip(tmp_path / "t.mp4", frames=6)
        data = (tmp_path / "t.mp4").read_bytes()
        (tmp_path / "t.mp4").write_bytes(data[: len(data) // 2])  # moov atom lost
        with pytest.raises(MediaError):
            list(media.decode(tmp_path / "t.mp4", 1 << 30))

    def test_too_large(self, tmp_path):
        make_clip(tmp_path / "a.mp4", frames=1)
        with pytest.raises(MediaError) as e:
            list(media.decode(tmp_path / "a.mp4", 100))
        assert e.value.reason == "too_large"

    def test_bad_image(self, tmp_path):
        (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
        with pytest.raises(MediaError):
            list(media.decode(tmp_path / "x.png", 1 << 30))


def test_atomic_bytes(tmp_path):
    media.write_bytes(tmp_path / "a.json", b"{}")
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


class TestOverlapped:
    """Decode ahead and encode behind: same frames, same order, errors not lost."""

    def test_read_ahead_yields_what_decode_does(self, tmp_path):
        make_clip(tmp_path / "a.mp4", frames=12, rate=10)
        plain = list(media.decode(tmp_path / "a.mp4", 1 << 30))
        ahead = list(media.read_ahead(media.decode(tmp_path / "a.mp4", 1 << 30), depth=2))
        assert [f.pts for f in ahead] == [f.pts for f in plain]
        for a, b in zip(ahead, plain, strict=True):
            np.testing.assert_array_equal(a.image, b.image)

    def test_read_ahead_raises_the_decoders_error_after_its_frames(self):
        def frames():
            yield "one"
            yield "two"
            raise MediaError("decode", "broken at frame 3")

        got = []
        with pytest.raises(MediaError, match="frame 3"):
            for f in media.read_ahead(frames(), depth=1):
                got.append(f)
        assert got == ["one", "two"]

    def test_closing_read_ahead_early_stops_and_closes_the_decoder(self):
        closed = []

        def frames():
            try:
                yield from range(1000)
            finally:
                closed.append(True)

        it = media.read_ahead(frames(), depth=2)
        assert next(it) == 0
        it.close()
        assert closed == [True]

    def test_encode_behind_writes_every_frame_in_order(self, tmp_path):
        src = tmp_path / "src.mp4"
        pts = make_clip(src, frames=9, rate=10, time_base=Fraction(1, 12800))
        w = media.EncodeBehind(VideoWriter(tmp_path / "o.mp4", media.probe(src)), depth=2)
        for f in media.decode(src, 1 << 30):
            w.write(f.image, f.pts)
        w.close()
        got, tb = read_pts(tmp_path / "o.mp4")
        np.testing.assert_allclose(
            [float(p * tb) for p in got], [float(p * Fraction(1, 12800)) for p in pts], atol=1e-3
        )

    def test_encode_behind_reports_an_encoder_error_and_commits_nothing(self, tmp_path):
        src = tmp_path / "src.mp4"
        make_clip(src, frames=2)
        w = media.EncodeBehind(VideoWriter(tmp_path / "o.mp4", media.probe(src)), depth=1)
        w.write(np.zeros((5, 7), np.uint8), 0)  # not (H, W, 3): the encoder's thread fails
        with pytest.raises(ValueError):
            w.close()
        assert list(tmp_path.iterdir()) == [src]
