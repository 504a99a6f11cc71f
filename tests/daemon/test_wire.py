from __future__ import annotations

import json

import numpy as np
import pytest

from daemon import wire
from daemon.wire import WireError

MAX = 4096 * 4096


def _img(h: int = 16, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


class TestV1:
    def test_rgb24_round_trip(self):
        img = _img()
        parts = wire.encode_frame(
            "cam1", 7, img, "rgb24", pts=3600, time_base=(1, 90000), cond={"Blond_Hair": 1}
        )
        assert parts[0] == b"frame.cam1"
        m = wire.decode_v1(parts, MAX)
        assert (m.stream, m.seq, m.pts, m.time_base, m.cond) == (
            "cam1",
            7,
            3600,
            (1, 90000),
            {"Blond_Hair": 1.0},
        )
        np.testing.assert_array_equal(m.image, img)

    def test_png_lossless_jpeg_close(self):
        img = _img()
        np.testing.assert_array_equal(
            wire.decode_v1(wire.encode_frame("s", 0, img, "png"), MAX).image, img
        )
        smooth = np.full((16, 16, 3), (200, 30, 90), np.uint8)
        out = wire.decode_v1(wire.encode_frame("s", 0, smooth, "jpeg"), MAX).image
        assert np.abs(out.astype(int) - smooth).max() < 8  # RGB order kept through JPEG

    def test_two_parts_on_pull(self):
        parts = wire.encode_frame("s", 1, _img(), "rgb24")
        assert wire.decode_v1(parts[1:], MAX).seq == 1

    @pytest.mark.parametrize(
        "change, reason",
        [
            ({"v": 2}, "bad_version"),
            ({"format": "bmp"}, "bad_header"),
            ({"seq": -1}, "bad_header"),
            ({"width": "16"}, "bad_header"),
            ({"extra": 1}, "bad_header"),
            ({"time_base": [1]}, "bad_header"),
            ({"cond": {"a": "x"}}, "bad_header"),
            ({"stream": ""}, "bad_header"),
        ],
    )
    def test_bad_headers(self, change, reason):
        topic, header, payload = wire.encode_frame("s", 0, _img(), "rgb24")
        h = {**json.loads(header), **change}
        with pytest.raises(WireError) as e:
            wire.decode_v1(
                [topic if "stream" not in change else b"", json.dumps(h).encode(), payload], MAX
            )
        assert e.value.reason == reason

    def test_missing_key(self):
        with pytest.raises(WireError, match="missing"):
            wire.decode_v1([b"", json.dumps({"v": 1}).encode(), b""], MAX)

    def test_not_json_and_parts(self):
        with pytest.raises(WireError) as e:
            wire.decode_v1([b"frame.s", b"\xff{", b""], MAX)
        assert e.value.reason == "bad_json"
        with pytest.raises(WireError) as e:
            wire.decode_v1([b"a", b"b", b"c", b"d"], MAX)
        assert e.value.reason == "bad_parts"

    def test_wrong_payload_size_and_topic(self):
        topic, header, payload = wire.encode_frame("s", 0, _img(), "rgb24")
        with pytest.raises(WireError, match="expected 1152 bytes"):
            wire.decode_v1([topic, header, payload[:-1]], MAX)
        with pytest.raises(WireError) as e:
            wire.decode_v1([b"frame.other", header, payload], MAX)
        assert e.value.reason == "bad_topic"

    def test_huge_frame_refused_before_decoding(self):
        h = {"v": 1, "stream": "s", "seq": 0, "format": "rgb24", "width": 100000, "height": 100000}
        with pytest.raises(WireError) as e:
            wire.decode_v1([b"frame.s", json.dumps(h).encode(), b""], MAX)
        assert e.value.reason == "too_large"

    def test_garbage_jpeg(self):
        h = {"v": 1, "stream": "s", "seq": 0, "format": "jpeg", "width": 4, "height": 4}
        with pytest.raises(WireError) as e:
            wire.decode_v1([b"frame.s", json.dumps(h).encode(), b"not a jpeg"], MAX)
        assert e.value.reason == "bad_payload"


class TestImagezmq:
    def test_array_bgr(self):
        img = _img()
        md = json.dumps({"msg": "pi-cam", "dtype": "uint8", "shape": list(img.shape)}).encode()
        m = wire.decode_imagezmq([md, img.tobytes()], MAX, seq=3)
        assert (m.stream, m.seq) == ("pi-cam", 3)
        np.testing.assert_array_equal(m.image, img[..., ::-1])  # OpenCV senders send BGR

    def test_gray_and_jpeg(self):
        g = np.arange(12, dtype=np.uint8).reshape(3, 4)
        md = json.dumps({"msg": "g", "dtype": "uint8", "shape": [3, 4]}).encode()
        assert wire.decode_imagezmq([md, g.tobytes()], MAX, 0).image.shape == (3, 4, 3)
        jpg = wire.encode_image(_img(), "jpeg")
        assert wire.decode_imagezmq([b'{"msg": "j"}', jpg], MAX, 0).image.shape == (16, 24, 3)

    @pytest.mark.parametrize(
        "md, reason",
        [
            ({"msg": "x", "dtype": "float32", "shape": [2, 2, 3]}, "bad_header"),
            ({"msg": "x", "dtype": "uint8", "shape": [2, 2, 4]}, "bad_shape"),
            ({"msg": "x", "dtype": "uint8", "shape": [2, 2, 3]}, "bad_payload"),
            ({"dtype": "uint8"}, "bad_header"),
        ],
    )
    def test_wrong_shapes(self, md, reason):
        with pytest.raises(WireError) as e:
            wire.decode_imagezmq([json.dumps(md).encode(), b"\0" * 5], MAX, 0)
        assert e.value.reason == reason


def test_verdict_topic():
    topic, body = wire.encode_verdict({"stream": "cam", "seq": 1})
    assert topic == b"verdict.cam" and json.loads(body)["seq"] == 1
