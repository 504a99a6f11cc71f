"""ZeroMQ wire format, version 1 (DESIGN §6), and imagezmq's two message shapes.

Input frame (multipart)::

    [b"frame." + stream, header JSON, payload]
    header = {"v": 1, "stream": str, "seq": int, "pts": int|null, "time_base": [n, d]|null,
              "format": "jpeg"|"png"|"rgb24", "width": int, "height": int,
              "cond": {attr: value}|null}

Output: ``[b"verdict." + stream, verdict JSON]`` and ``[b"clean." + stream, header, payload]``.

imagezmq (``ImageSender.send_image`` / ``send_jpg``)::

    [{"msg": text, "dtype": "uint8", "shape": [h, w, 3]} JSON, raw array bytes]
    [{"msg": text} JSON, jpeg bytes]

Decoding is strict: anything unexpected raises :class:`WireError` with a short ``reason`` (a
metrics label) and a message; the source counts it and carries on.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

VERSION = 1
FORMATS = ("jpeg", "png", "rgb24")
_HEADER_KEYS = {"v", "stream", "seq", "pts", "time_base", "format", "width", "height", "cond"}
_REQUIRED = {"v", "stream", "seq", "format", "width", "height"}


class WireError(ValueError):
    """A malformed message; ``reason`` is a short label for counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class FrameMsg:
    """One decoded input frame.

    Attributes:
        stream: stream id.
        seq: sender's sequence number.
        image: ``(H, W, 3)`` uint8 RGB.
        pts, time_base: presentation time stamp and its unit, when the sender knows them.
        cond: per-frame condition override ``{attr: value}`` or None.
    """

    stream: str
    seq: int
    image: np.ndarray
    pts: int | None = None
    time_base: tuple[int, int] | None = None
    cond: dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _int(h: dict[str, Any], k: str, lo: int = 0) -> int:
    v = h[k]
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise WireError("bad_header", f"header.{k}: expected an integer >= {lo}, got {v!r}")
    return v


def parse_header(raw: bytes) -> dict[str, Any]:
    """Decode and validate a v1 header (unknown keys, types, version)."""
    try:
        h = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        # RecursionError: deeply nested arrays ("[[[[...") exhaust the parser's stack
        raise WireError("bad_json", f"header: not JSON ({type(e).__name__})") from None
    if not isinstance(h, dict):
        raise WireError("bad_header", "header: expected a JSON object")
    if h.get("v") != VERSION:
        raise WireError("bad_version", f"header.v: expected {VERSION}, got {h.get('v')!r}")
    missing = _REQUIRED - set(h)
    if missing:
        raise WireError("bad_header", f"header: missing {sorted(missing)}")
    unknown = set(h) - _HEADER_KEYS
    if unknown:
        raise WireError("bad_header", f"header: unknown keys {sorted(unknown)}")
    if (
        not isinstance(h["stream"], str)
        or not h["stream"]
        or len(h["stream"]) > 200
        or not h["stream"].isprintable()
    ):
        # printable: no NUL/control characters or lone surrogates (it becomes a topic and a log
        # field; it is never a path)
        raise WireError(
            "bad_header",
            "header.stream: expected a non-empty printable string "
            f"of at most 200 characters, got {h['stream']!r:.80}",
        )
    _int(h, "seq")
    _int(h, "width", 1), _int(h, "height", 1)
    if h["format"] not in FORMATS:
        raise WireError(
            "bad_header", f"header.format: expected one of {'|'.join(FORMATS)}, got {h['format']!r}"
        )
    if h.get("pts") is not None and (not isinstance(h["pts"], int) or isinstance(h["pts"], bool)):
        raise WireError("bad_header", f"header.pts: expected an integer or null, got {h['pts']!r}")
    tb = h.get("time_base")
    if tb is not None and not (
        isinstance(tb, list) and len(tb) == 2 and all(isinstance(t, int) and t > 0 for t in tb)
    ):
        raise WireError("bad_header", f"header.time_base: expected [n, d] > 0, got {tb!r}")
    cond = h.get("cond")
    if cond is not None and not (
        isinstance(cond, dict)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in cond.values())
    ):
        raise WireError("bad_header", f"header.cond: expected {{attr: number}}, got {cond!r}")
    return h


_PNG_SIG = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (all but DHT C4, JPG C8, DAC CC) carry the frame size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_size(data: bytes, fmt: str) -> tuple[int, int]:
    """``(width, height)`` read from a JPEG's SOF or a PNG's IHDR, without decoding.

    The decoder allocates the frame its header declares before it reads the pixels, so a
    few-kilobyte message can ask for gigabytes (a decompression bomb); the size is checked
    against the limit first. Only the declared format is accepted: OpenCV would otherwise decode
    whatever it recognises (BMP, TIFF, ...), each with its own header to trust.

    Raises:
        WireError: ``bad_payload`` when ``data`` is not a ``fmt`` image with a readable size.
    """
    if fmt == "png":
        if len(data) >= 24 and data[:8] == _PNG_SIG and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        raise WireError("bad_payload", "png payload: no PNG signature and IHDR")
    if data[:2] != b"\xff\xd8":
        raise WireError("bad_payload", f"{fmt} payload: no JPEG start-of-image marker")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            break
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a length
            i += 2
            continue
        if m in _SOF and i + 9 <= n:
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        if m in (0xDA, 0xD9):  # scan data or end of image before any frame header
            break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise WireError("bad_payload", f"{fmt} payload: no readable frame header")


def decode_image(
    payload: bytes, fmt: str, width: int, height: int, max_pixels: int, bgr: bool = False
) -> np.ndarray:
    """Payload -> ``(H, W, 3)`` uint8 RGB, checked against the declared size and the limit.

    JPEG/PNG sizes are read from the image header and checked before decoding
    (:func:`image_size`).
    """
    if width * height > max_pixels:
        raise WireError("too_large", f"frame {width}x{height} exceeds {max_pixels} pixels")
    if fmt == "rgb24":
        if len(payload) != width * height * 3:
            raise WireError(
                "bad_payload",
                f"rgb24 payload: expected {width * height * 3} bytes, got {len(payload)}",
            )
        img = np.frombuffer(payload, np.uint8).reshape(height, width, 3)
        return img[..., ::-1].copy() if bgr else img.copy()
    w, h = image_size(payload, fmt)
    if w * h > max_pixels:
        raise WireError("too_large", f"{fmt} header declares {w}x{h}, over {max_pixels} pixels")
    if not w or not h or width and height and (w, h) != (width, height):
        raise WireError("bad_payload", f"{fmt} header says {w}x{h}, message {width}x{height}")
    buf = np.frombuffer(payload, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise WireError("bad_payload", f"{fmt} payload: cannot decode {len(payload)} bytes")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise WireError("too_large", f"decoded frame {img.shape[1]}x{img.shape[0]} too large")
    if width and height and (img.shape[1], img.shape[0]) != (width, height):
        raise WireError(
            "bad_payload",
            f"{fmt} payload is {img.shape[1]}x{img.shape[0]}, header says {width}x{height}",
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_v1(parts: list[bytes], max_pixels: int) -> FrameMsg:
    """``[topic, header, payload]`` -> :class:`FrameMsg` (also ``[header, payload]`` on PULL)."""
    if len(parts) == 2:
        parts = [b"", *parts]
    if len(parts) != 3:
        raise WireError("bad_parts", f"expected 3 message parts, got {len(parts)}")
    topic, raw, payload = parts
    h = parse_header(raw)
    if topic and topic != b"frame." + h["stream"].encode():
        raise WireError("bad_topic", f"topic {topic[:64]!r} does not match stream {h['stream']!r}")
    img = decode_image(payload, h["format"], h["width"], h["height"], max_pixels)
    tb = tuple(h["time_base"]) if h.get("time_base") else None
    return FrameMsg(
        h["stream"],
        h["seq"],
        img,
        h.get("pts"),
        tb,  # type: ignore[arg-type]
        {k: float(v) for k, v in (h.get("cond") or {}).items()} or None,
    )


def decode_imagezmq(
    parts: list[bytes], max_pixels: int, seq: int, stream: str = "", bgr: bool = True
) -> FrameMsg:
    """Decode imagezmq's ``[{"msg","dtype","shape"}, array]`` or ``[{"msg"}, jpeg]``."""
    if len(parts) != 2:
        raise WireError("bad_parts", f"imagezmq: expected 2 message parts, got {len(parts)}")
    try:
        md = json.loads(parts[0])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError("bad_json", f"imagezmq metadata: not JSON ({type(e).__name__})") from None
    if not isinstance(md, dict) or "msg" not in md:
        raise WireError("bad_header", "imagezmq metadata: expected an object with 'msg'")
    # the sender's text names the stream: keep it printable (a topic and a log field)
    name = (
        stream
        or "".join(ch if ch.isprintable() else "?" for ch in str(md["msg"])[:200])
        or "imagezmq"
    )
    if "shape" in md or "dtype" in md:
        shape, dtype = md.get("shape"), md.get("dtype")
        if dtype != "uint8":
            raise WireError("bad_header", f"imagezmq dtype: expected uint8, got {dtype!r}")
        if not (
            isinstance(shape, list)
            and len(shape) in (2, 3)
            and all(isinstance(s, int) and s > 0 for s in shape)
            and (len(shape) == 2 or shape[2] in (1, 3))
        ):
            raise WireError("bad_shape", f"imagezmq shape: expected [h, w(, 1|3)], got {shape!r}")
        h, w = shape[0], shape[1]
        ch = shape[2] if len(shape) == 3 else 1
        if h * w > max_pixels:
            raise WireError("too_large", f"frame {w}x{h} exceeds {max_pixels} pixels")
        if len(parts[1]) != h * w * ch:
            raise WireError(
                "bad_payload", f"imagezmq array: expected {h * w * ch} bytes, got {len(parts[1])}"
            )
        arr = np.frombuffer(parts[1], np.uint8).reshape(h, w, ch)
        img = np.repeat(arr, 3, axis=2) if ch == 1 else (arr[..., ::-1] if bgr else arr)
        return FrameMsg(name, seq, np.ascontiguousarray(img))
    img = decode_image(parts[1], "jpeg", 0, 0, max_pixels)
    return FrameMsg(name, seq, img)


def encode_image(image: np.ndarray, fmt: str, jpeg_quality: int = 90) -> bytes:
    """``(H, W, 3)`` uint8 RGB -> payload bytes in ``fmt``."""
    if fmt == "rgb24":
        return np.ascontiguousarray(image).tobytes()
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ext, params = (
        (".jpg", [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]) if fmt == "jpeg" else (".png", [])
    )
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise WireError("encode", f"cannot encode a {image.shape} frame as {fmt}")
    return buf.tobytes()


def encode_frame(
    stream: str,
    seq: int,
    image: np.ndarray,
    fmt: str = "jpeg",
    pts: int | None = None,
    time_base: tuple[int, int] | None = None,
    cond: dict[str, float] | None = None,
    topic: str = "frame.",
    jpeg_quality: int = 90,
) -> list[bytes]:
    """A v1 frame message ``[topic, header, payload]`` (senders, and the ``clean.`` output)."""
    h, w = image.shape[:2]
    header = {
        "v": VERSION,
        "stream": stream,
        "seq": seq,
        "pts": pts,
        "time_base": list(time_base) if time_base else None,
        "format": fmt,
        "width": w,
        "height": h,
        "cond": cond,
    }
    # surrogateescape: a file's NAME (the stream of its frames) may hold non-UTF-8 bytes
    return [
        (topic + stream).encode("utf-8", "surrogateescape"),
        json.dumps(header).encode(),
        encode_image(image, fmt, jpeg_quality),
    ]


def encode_verdict(verdict: dict[str, Any]) -> list[bytes]:
    """``[b"verdict." + stream, verdict JSON]``."""
    return [
        b"verdict." + verdict["stream"].encode("utf-8", "surrogateescape"),
        json.dumps(verdict).encode(),
    ]
