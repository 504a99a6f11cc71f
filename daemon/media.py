"""PyAV decode and encode, audio stream copy, atomic output files (STYLE: PyAV examples).

Containers are always opened with ``with av.open(...)``; decoding uses
``thread_type = "AUTO"``; encoding follows PyAV's examples (``VideoFrame.from_ndarray`` ->
``stream.encode`` -> ``mux``, flushed with ``stream.encode()``), with ``time_base`` and ``pts``
set explicitly so the output keeps the source's frame rate and timestamps. Audio packets are
copied untouched (no re-encode). Every output is written under a temporary name, fsynced, then
renamed, so a final name never holds a half-written file.

Decoding and encoding each run on a thread of their own (:func:`read_ahead`,
:class:`EncodeBehind`) with a bounded queue between them and the guard, so one file's frames
are decoded, guarded and encoded at the same time; FFmpeg releases the GIL while it works.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import structlog

from daemon.config import IMAGE_EXTS, VIDEO_EXTS

log = structlog.get_logger()

#: container format per extension (the temporary name hides the extension from FFmpeg).
FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm"}
#: codec chosen by ``codec = "auto"`` per extension.
AUTO_CODECS = {
    ".mp4": "libx264",
    ".mov": "libx264",
    ".mkv": "libx264",
    ".avi": "mpeg4",
    ".webm": "libvpx-vp9",
}


class MediaError(RuntimeError):
    """A file that cannot be read or written; ``reason`` is a short label for counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Frame:
    """A decoded frame: ``image`` ``(H, W, 3)`` uint8 RGB, ``pts`` in ``time_base`` units."""

    index: int
    image: np.ndarray
    pts: int | None
    time_base: Fraction | None


@dataclass
class VideoInfo:
    """What the writer needs to keep the source's geometry, rate and timestamps."""

    width: int
    height: int
    rate: Fraction | None
    time_base: Fraction | None
    frames: int
    audio: bool


def is_media(path: str | os.PathLike[str]) -> bool:  # noqa: D103
    return Path(path).suffix.lower() in VIDEO_EXTS + IMAGE_EXTS


def is_image(path: str | os.PathLike[str]) -> bool:  # noqa: D103
    return Path(path).suffix.lower() in IMAGE_EXTS


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Geometry, rate, time base and frame count (0 when the container does not say)."""
    if not Path(path).is_file():
        raise MediaError("missing", f"{Path(path).name}: no such file")
    if Path(path).stat().st_size == 0:
        raise MediaError("empty", f"{Path(path).name}: empty file (0 bytes)")
    if is_image(path):
        w, h = image_header_size(Path(path).read_bytes(), Path(path).name)
        return VideoInfo(w, h, None, None, 1, False)
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise MediaError("no_video", f"{Path(path).name}: no video stream")
            v = c.streams.video[0]
            return VideoInfo(
                v.codec_context.width,
                v.codec_context.height,
                v.average_rate,
                v.time_base,
                v.frames or 0,
                bool(c.streams.audio),
            )
    except av.FFmpegError as e:
        raise MediaError("decode", f"{Path(path).name}: {e}") from None


def image_header_size(data: bytes, name: str) -> tuple[int, int]:
    """``(width, height)`` of a JPEG or PNG from its header, without decoding it.

    Raises:
        MediaError: ``decode`` when ``data`` is neither a JPEG nor a PNG with a readable size.
    """
    from daemon.wire import WireError, image_size

    fmt = "png" if data[:4] == b"\x89PNG" else "jpeg"
    try:
        return image_size(data, fmt)
    except WireError:
        raise MediaError("decode", f"{name}: not a readable JPEG or PNG image") from None


def read_image(path: str | os.PathLike[str], max_pixels: int) -> np.ndarray:
    """A jpg/png as ``(H, W, 3)`` uint8 RGB.

    The size in the image header is checked against ``max_pixels`` before decoding: a small
    file can declare a frame of gigabytes, which the decoder would allocate first.
    """
    data = Path(path).read_bytes()
    w, h = image_header_size(data, Path(path).name)
    if w * h > max_pixels:
        raise MediaError(
            "too_large", f"{Path(path).name}: header declares {w}x{h}, over {max_pixels} pixels"
        )
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise MediaError("decode", f"{Path(path).name}: not a readable image")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise MediaError(
            "too_large",
            f"{Path(path).name}: {img.shape[1]}x{img.shape[0]} exceeds {max_pixels} pixels",
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode(
    path: str | os.PathLike[str],
    max_pixels: int,
    on_audio: Callable[[av.Packet], None] | None = None,
    on_corrupt: Callable[[int | None, str], None] | None = None,
) -> Iterator[Frame]:
    """Yield the frames of a video (or the one frame of an image) in presentation order.

    Args:
        path: the file.
        max_pixels: a frame larger than this raises :class:`MediaError` ("too_large").
        on_audio: called with every packet of the first audio stream, in demux order, so the
            caller can copy audio into its output while the video is being processed.
        on_corrupt: called with ``(pts, error)`` for a video packet the decoder rejects; the
            packet's frames are skipped and decoding goes on. Without it the file fails.

    Raises:
        MediaError: the file is missing, not a video, corrupt or truncated.
    """
    name = Path(path).name
    if not Path(path).is_file():
        raise MediaError("missing", f"{name}: no such file")
    if is_image(path):
        yield Frame(0, read_image(path, max_pixels), 0, None)
        return
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise MediaError("no_video", f"{name}: no video stream")
            v = c.streams.video[0]
            v.thread_type = "AUTO"
            if v.codec_context.width * v.codec_context.height > max_pixels:
                raise MediaError(
                    "too_large",
                    f"{name}: {v.codec_context.width}x"
                    f"{v.codec_context.height} exceeds {max_pixels} pixels",
                )
            streams = [v] + ([c.streams.audio[0]] if on_audio and c.streams.audio else [])
            i = 0
            for packet in c.demux(*streams):
                if packet.stream.type == "audio":
                    if packet.dts is not None and on_audio:
                        on_audio(packet)
                    continue
                try:
                    decoded = packet.decode()
                except av.InvalidDataError as e:
                    # one corrupt packet mid-stream loses its frames, not the whole file
                    if on_corrupt is None:
                        raise
                    on_corrupt(packet.pts, str(e))
                    continue
                for f in decoded:
                    yield Frame(i, f.to_ndarray(format="rgb24"), f.pts, f.time_base)
                    i += 1
            if i == 0:
                raise MediaError("empty", f"{name}: no decodable video frame")
    except av.FFmpegError as e:
        raise MediaError("decode", f"{name}: {e}") from None


def fsync_replace(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk and rename it over ``final`` (then flush the folder entry)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    """The hidden temporary name an output is written under before its rename."""
    return final.with_name(f".{final.name}.part")


class VideoWriter:
    """Encode RGB frames at the source's rate and timestamps; copy its audio packets.

    Args:
        final: the output's final path (its extension picks the container).
        info: the source's :class:`VideoInfo`.
        codec: ``"auto"`` or an FFmpeg encoder name.
        crf: quality for x264/VP9 (lower is better; 0 with libx264rgb is lossless).
        audio: the source's audio stream to copy, or None.
    """

    def __init__(
        self,
        final: Path,
        info: VideoInfo,
        codec: str = "auto",
        crf: int = 18,
        audio: av.audio.stream.AudioStream | None = None,
    ) -> None:
        self.final, self.tmp = Path(final), temp_name(Path(final))
        ext = self.final.suffix.lower()
        self.codec = AUTO_CODECS.get(ext, "libx264") if codec == "auto" else codec
        self.rate = info.rate or Fraction(25)
        self.time_base = info.time_base or 1 / self.rate
        self._next_pts = 0
        self._last_pts: int | None = None
        self.frames = 0
        self.audio_ok = False
        # the encoder's thread and the decoder's (audio copy) mux into the same container
        self._mux = threading.Lock()
        self.out = av.open(str(self.tmp), "w", format=FORMATS.get(ext, "mp4"))
        try:
            s = self.out.add_stream(self.codec, rate=self.rate)
            s.width, s.height = info.width, info.height
            rgb = self.codec in ("libx264rgb", "png", "ffv1")
            odd = info.width % 2 or info.height % 2
            s.pix_fmt = (
                "rgb24"
                if rgb and self.codec != "ffv1"
                else ("bgr0" if self.codec == "ffv1" else "yuv444p" if odd else "yuv420p")
            )
            s.time_base = self.time_base
            s.codec_context.time_base = self.time_base
            if self.codec.startswith("libx264"):
                s.options = {"crf": str(crf), "preset": "veryfast"}
            elif self.codec.startswith("libvpx"):
                s.options = {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8"}
            elif self.codec == "mpeg4":
                s.options = {"qscale": "2"}
                s.codec_context.qscale = 2
            self.stream = s
            #: what the summary records of the encoder
            self.settings = {"codec": self.codec, "pix_fmt": s.pix_fmt, **dict(s.options)}
            self.astream = None
            if audio is not None:
                try:
                    self.astream = self.out.add_stream_from_template(audio)
                    self.audio_ok = True
                except (av.FFmpegError, ValueError) as e:
                    log.warning("audio not copied", reason=str(e))
        except Exception:
            self.out.close()
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, image: np.ndarray, pts: int | None) -> None:
        """Encode one ``(H, W, 3)`` uint8 RGB frame at ``pts`` (source time base)."""
        if pts is None or (self._last_pts is not None and pts <= self._last_pts):
            # Missing or repeated stamps (some AVIs): continue the sequence at the nominal rate.
            pts = self._next_pts
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts, frame.time_base = pts, self.time_base
        packets = self.stream.encode(frame)
        with self._mux:
            self.out.mux(packets)
        self._last_pts = pts
        self._next_pts = pts + max(1, round(1 / (self.rate * self.time_base)))
        self.frames += 1

    def mux_audio(self, packet: av.Packet) -> None:
        """Copy one audio packet from the source (stream copy, no re-encode)."""
        if self.astream is None or not self.audio_ok:
            return
        try:
            packet.stream = self.astream
            with self._mux:
                self.out.mux(packet)
        except av.FFmpegError as e:
            self.audio_ok = False
            log.warning("audio copy stopped", reason=str(e))

    def close(self, commit: bool = True) -> None:
        """Flush the encoder; with ``commit`` fsync and rename to the final name."""
        try:
            if commit:
                packets = self.stream.encode()
                with self._mux:
                    self.out.mux(packets)
        finally:
            with self._mux:
                self.out.close()
        if commit:
            fsync_replace(self.tmp, self.final)
        else:
            self.tmp.unlink(missing_ok=True)


class EncodeBehind:
    """A :class:`VideoWriter` whose frames are encoded on a thread of its own.

    :meth:`write` returns once the frame is queued; at most ``depth`` frames wait, so a slow
    encoder holds the caller back instead of filling memory. An encoder error is raised by the
    next :meth:`write` or by :meth:`close`.

    Args:
        writer: the writer to feed (its audio copy, :meth:`VideoWriter.mux_audio`, stays with
            the decoder's thread).
        depth: frames queued at most.
    """

    _DONE = object()

    def __init__(self, writer: VideoWriter, depth: int = 8) -> None:
        self.writer = writer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="encode", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._DONE:
            if self._error is None:  # after an error, frames are drained, not encoded
                try:
                    self.writer.write(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self._error = e

    def write(self, image: np.ndarray, pts: int | None) -> None:
        """Queue one frame (see :meth:`VideoWriter.write`)."""
        if self._error is not None:
            raise self._error
        self._queue.put((image, pts))

    def close(self, commit: bool = True) -> None:
        """Encode what is queued, then :meth:`VideoWriter.close` (``commit`` unless it failed)."""
        self._queue.put(self._DONE)
        self._thread.join()
        if self._error is not None:
            self.writer.close(commit=False)
            if commit:
                raise self._error
            return
        self.writer.close(commit)


def read_ahead(frames: Iterator[Frame], depth: int = 8) -> Iterator[Frame]:
    """The frames of ``frames`` (:func:`decode`), decoded on a thread up to ``depth`` ahead.

    The decoder's errors are raised here, in order after the frames before them; closing this
    generator early stops the decoder (and closes its file) on its own thread.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def run() -> None:
        try:
            for frame in frames:
                while not stop.is_set():
                    try:
                        q.put(frame, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - raised in the consumer
            q.put(e)
        finally:
            frames.close()  # type: ignore[attr-defined]  # a generator: closes the container

    thread = threading.Thread(target=run, name="decode", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a decoder waiting on a full queue
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)
        thread.join()


def write_image(final: Path, image: np.ndarray) -> None:
    """Write a jpg/png atomically (temporary name, fsync, rename)."""
    final = Path(final)
    ext = final.suffix.lower()
    ok, buf = cv2.imencode(
        ".png" if ext == ".png" else ".jpg",
        cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
        [] if ext == ".png" else [cv2.IMWRITE_JPEG_QUALITY, 95],
    )
    if not ok:
        raise MediaError("encode", f"{final.name}: cannot encode")
    write_bytes(final, buf.tobytes())


def write_bytes(final: Path, data: bytes) -> None:
    """Write bytes atomically (temporary name, fsync, rename)."""
    tmp = temp_name(Path(final))
    with open(tmp, "wb") as f:
        f.write(data)
    fsync_replace(tmp, Path(final))


@contextlib.contextmanager
def audio_source(path: str | os.PathLike[str]) -> Iterator[av.audio.stream.AudioStream | None]:
    """The first audio stream of ``path`` (a template for :class:`VideoWriter`), or None."""
    if is_image(path):
        yield None
        return
    try:
        c = av.open(str(path))
    except av.FFmpegError:
        yield None
        return
    with c:
        yield c.streams.audio[0] if c.streams.audio else None
