"""process_file and the frame pipeline with the real engine (tiny G)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from daemon.config import load_config
from daemon.metrics import Metrics
from daemon.pipeline import Aborted, process_file
from daemon.service import build_pipeline
from magdr.faces.align import CELEBA_ANCHOR, CELEBA_ANCHOR_5, anchor_points, five_point_anchors
from magdr.faces.detector import CROP_FRAMING, load_detector
from magdr.faces.locate import crop_rects, locate_faces
from magdr.faces.parsing import landmarks_available
from tests.daemon.helpers import make_clip, write_config


@pytest.fixture
def pipeline(tmp_path, tiny_models):
    def make(**kw):
        cfg = load_config(write_config(tmp_path / "c.toml", tiny_models, **kw))
        engine, batcher, pipe = build_pipeline(cfg, Metrics())
        made.append(batcher)
        return pipe

    made = []
    yield make
    for b in made:
        b.close(5)


def test_abort_commits_nothing(tmp_path, pipeline):
    pipe = pipeline()
    make_clip(tmp_path / "a.mp4", frames=6)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Aborted):
        process_file(tmp_path / "a.mp4", "a", out, pipe, should_abort=lambda: True)
    assert list(out.iterdir()) == []


def test_no_face_frames_pass_through(tmp_path, pipeline):
    pipe = pipeline(faces="detect")
    img = np.full((48, 64, 3), 77, np.uint8)  # nothing face-like
    g = pipe.submit(img, stream="s", seq=0, source="t").result(10)
    assert g.verdict["faces"] == [] and g.verdict["disrupted"] is False
    assert g.verdict["score"] is None
    np.testing.assert_array_equal(g.image, img)


def test_frame_mode_pastes_g_output(tmp_path, pipeline):
    pipe = pipeline(faces="frame")
    img = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    g = pipe.submit(img, stream="s", seq=3, source="t", pts=7).result(10)
    assert g.image.shape == img.shape and not np.array_equal(g.image, img)
    assert (g.verdict["seq"], g.verdict["pts"], g.verdict["faces"][0]["box"]) == (
        3,
        7,
        [0, 0, 56, 40],
    )
    with pytest.raises(KeyError):
        pipe.submit(img, stream="s", seq=4, source="t", cond={"Nope": 1})
    with pytest.raises(ValueError):
        pipe.submit(img[..., :2], stream="s", seq=5, source="t")


def test_real_faces_are_found_and_pasted(pipeline):
    pipe = pipeline(faces="detect")
    from daemon.media import decode

    asset = Path(__file__).resolve().parents[2] / "daemon" / "assets" / "demo.mp4"
    frame = next(decode(asset, 1 << 30)).image
    g = pipe.submit(frame, stream="demo", seq=0, source="t").result(10)
    assert len(g.verdict["faces"]) == 1
    x, y, w, h = g.verdict["faces"][0]["box"]
    assert w >= 32 and 0 <= x < frame.shape[1]
    diff = np.abs(g.image.astype(int) - frame).sum(2) > 0
    assert diff[y + h // 2, x + w // 2] and not diff[0, 0]  # pasted on the face, not the corner


def test_detect_every_follows_faces_between_detections_per_stream(pipeline):
    """detect_every = 3: a stream's face is detected on its first frame and followed (found in
    a window around its last box) on the next two; a lost face triggers a full detection at
    once. Other streams keep their own followers."""
    pipe = pipeline(faces="detect")
    pipe.engine.cfg.guard.detect_every = 3
    face = _demo_frame()
    moved = np.roll(face, (3, 5), (0, 1))  # the head moves a little
    blank = np.full_like(face, 90)

    def faces(img, stream):
        return pipe.submit(img, stream=stream, seq=0, source="t").result(10).verdict["faces"]

    first = faces(face, "a")
    assert len(first) == 1
    follower = pipe.engine.framing._followers["a"]
    again = faces(moved, "a")
    assert len(again) == 1 and (follower.stats.detections, follower.stats.followed) == (1, 1)
    x0, y0 = first[0]["box"][:2]
    x1, y1 = again[0]["box"][:2]
    assert abs(x1 - x0 - 5) <= 3 and abs(y1 - y0 - 3) <= 3  # it followed the move
    assert faces(blank, "a") == []  # lost: detected again at once, no face left
    assert (follower.stats.lost, follower.stats.detections) == (1, 2)
    assert faces(blank, "b") == [] and len(faces(face, "b")) == 1
    pipe.engine.cfg.guard.detect_every = 1
    assert len(faces(face, "c")) == 1 and faces(blank, "c") == []


def test_a_stream_reuses_the_chain_that_cured_its_previous_frame(tmp_path, tiny_models):
    """[guard] reuse_chains: the second frame of a stream tries the first frame's chain and
    keeps it (no search); another stream, or reuse_chains = false, searches."""
    from magdr.profile import Profile

    frame = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    flag_all = Profile.load(tiny_models["flag_all"])

    def build(threshold: float, reuse: bool = True):
        prof = tmp_path / f"p{len(made)}.json"
        Profile(**{**flag_all.__dict__, "threshold": threshold}).save(prof)
        models = {**tiny_models, "profile": prof}
        cfg = load_config(write_config(tmp_path / "c.toml", models, guard=True))
        cfg.guard.reuse_chains = reuse
        metrics = Metrics()
        _, batcher, pipe = build_pipeline(cfg, metrics)
        made.append(batcher)
        return pipe, metrics

    def guard(pipe, stream):
        return pipe.submit(frame, stream=stream, seq=0, source="t").result(30).verdict["faces"][0]

    made: list = []
    try:
        # A threshold just under the frame's score: flagged, and Rec-Net's first improvement
        # brings it below, so the chain cures it.
        probe, _ = build(1e6)
        score = guard(probe, "a")["score"]
        pipe, metrics = build(score - 1e-4 * abs(score))
        first = guard(pipe, "a")
        assert first["disrupted"] and first["chain"]
        again = guard(pipe, "a")
        assert again["disrupted"] and again["chain"] == first["chain"]
        assert metrics.chains_reused.value() == 1
        other = guard(pipe, "b")  # another stream: its own search
        assert other["chain"] == first["chain"] and metrics.chains_reused.value() == 1
        off, off_metrics = build(score - 1e-4 * abs(score), reuse=False)
        guard(off, "a")
        guard(off, "a")
        assert off_metrics.chains_reused.value() == 0
    finally:
        for b in made:
            b.close(5)


def test_a_configured_purifier_is_loaded_and_named_in_the_summary(tmp_path, tiny_models):
    """[model] purifier: a path (relative to the config file) is loaded into the guard; 'auto'
    finds none for a generator the shipped purifier was not trained against. purify = "all"
    sends every face through it."""
    from magdr.purifier import Purifier, save_purifier

    save_purifier(Purifier(width=4), tmp_path / "p.pt")
    clip = tmp_path / "clip.mp4"
    make_clip(clip, frames=2)
    for purifier, loaded in (("p.pt", True), ("auto", False), ("none", False)):
        text = write_config(tmp_path / "c.toml", tiny_models, guard=True).read_text()
        (tmp_path / "c.toml").write_text(
            text.replace("[guard]", f'purifier = "{purifier}"\n\n[guard]', 1)
        )
        cfg = load_config(tmp_path / "c.toml")
        _, batcher, pipe = build_pipeline(cfg, Metrics())
        try:
            assert (pipe.engine.guard.purifier is not None) == loaded, purifier
            out = tmp_path / f"out-{purifier}"
            out.mkdir()
            s = process_file(clip, "clip", out, pipe)
        finally:
            batcher.close(5)
        want = str(tmp_path / "p.pt") if loaded else "off"
        assert s["purifier"] == want and s["purified_faces"] == 0 and s["frames"] == 2
    # purify = "all": every face goes through the purifier, flagged or not.
    text = write_config(tmp_path / "c.toml", tiny_models, guard=True).read_text()
    (tmp_path / "c.toml").write_text(
        text.replace("[guard]", 'purifier = "p.pt"\npurify = "all"\n\n[guard]', 1)
    )
    _, batcher, pipe = build_pipeline(load_config(tmp_path / "c.toml"), Metrics())
    try:
        assert pipe.engine.guard.purify_all
        out = tmp_path / "out-all"
        out.mkdir()
        s = process_file(clip, "clip", out, pipe)
    finally:
        batcher.close(5)
    assert s["faces"] > 0 and s["purified_faces"] == s["faces"]


def test_each_stream_settles_in_the_order_it_was_submitted():
    """Batches on several replicas finish in any order; a stream's frames come out in order,
    and a stream does not wait on another."""
    from daemon.pipeline import InOrder

    order = InOrder()
    a0, a1, b0, a2 = order.slot("a"), order.slot("a"), order.slot("b"), order.slot("a")
    done: list[str] = []
    for name, s in (("a0", a0), ("a1", a1), ("b0", b0), ("a2", a2)):
        s.future.add_done_callback(lambda f, n=name: done.append(n))
    order.settle(a2, "r2")
    order.settle(a1, error=RuntimeError("lost"))
    order.settle(b0, "rb")
    assert done == ["b0"]
    order.settle(a0, "r0")
    assert done == ["b0", "a0", "a1", "a2"]
    assert a2.future.result() == "r2" and isinstance(a1.future.exception(), RuntimeError)
    c0, c1 = order.slot("c"), order.slot("c")
    c0.future.cancel()  # its file stopped waiting (process_file's clean-up)
    order.settle(c1, "r1")
    order.settle(c0, "late")
    assert c1.future.result() == "r1"


def test_frames_in_flight_fill_every_replica():
    from daemon.config import Config
    from daemon.pipeline import MAX_WINDOW, frames_in_flight

    cfg = Config()
    cfg.guard.batch_size = 8
    assert frames_in_flight(cfg) == 16  # local: one batch guarded, the next gathering
    cfg.engine.backend, cfg.engine.replicas, cfg.engine.max_inflight = "ray", 3, 2
    assert frames_in_flight(cfg) == 48
    cfg.engine.replicas = 100
    assert frames_in_flight(cfg) == MAX_WINDOW
    cfg.guard.batch_size = 1024
    assert frames_in_flight(cfg) == 2048  # never fewer than two batches


def _demo_frame() -> np.ndarray:
    from daemon.media import decode

    asset = Path(__file__).resolve().parents[2] / "daemon" / "assets" / "demo.mp4"
    return next(decode(asset, 1 << 30)).image


def test_aligned_faces_are_warped_and_pasted_back(pipeline):
    """[guard] align (the default) with YuNet: the face is cut by its five landmarks'
    similarity, with no dlib; the guarded face goes back through the inverse warp, inside a
    soft disc that never reaches the crop's square border."""
    pipe = pipeline(faces="detect")
    engine, frame = pipe.engine, _demo_frame()
    assert engine.landmarks is None  # YuNet's own points: dlib not loaded
    crops = engine.find_faces(frame)
    assert crops.matrices is not None and crops.matrices.shape == (1, 2, 3)
    (box,) = load_detector("yunet")(frame, max_side=engine.cfg.guard.detect_side)
    m, size = crops.matrices[0], engine.size
    mapped = five_point_anchors(box.points) @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(mapped[2], CELEBA_ANCHOR_5[2] * size, atol=1e-6)
    g = pipe.submit(frame, stream="demo", seq=0, source="t").result(10)
    x, y, w, h = g.verdict["faces"][0]["box"]
    diff = np.abs(g.image.astype(int) - frame).sum(2) > 0
    assert diff[y + h // 2, x + w // 2] and not diff[0, 0]
    # the crop's corners map to frame pixels the paste leaves alone
    inv = cv2.invertAffineTransform(m)
    for cx, cy in ((0, 0), (size - 1, 0), (0, size - 1), (size - 1, size - 1)):
        fx, fy = inv @ (cx, cy, 1)
        if 0 <= fx < frame.shape[1] and 0 <= fy < frame.shape[0]:
            assert not diff[int(fy), int(fx)]


def test_region_paste_changes_only_the_edits_regions_and_parses_every_nth_frame(pipeline):
    """paste_mask = "region": the change is the window's change inside the edit's regions
    (a subset of it), and a stream's face is parsed once per region_every frames."""
    pipe = pipeline(faces="detect")
    engine, frame = pipe.engine, _demo_frame()
    engine.cfg.guard.region_every = 3
    crops = engine.find_faces(frame)
    faces = (crops.x + 0.5).clamp(-1, 1)  # a smooth edit: brighter everywhere
    calls = []
    parse = engine._parse
    engine._parse = lambda x: calls.append(len(x)) or parse(x)
    region = [engine.paste(frame, faces, crops, stream="s") for _ in range(4)]
    assert calls == [1, 1]  # frames 0 and 3
    assert all(np.array_equal(r, region[0]) for r in region)
    engine.paste(frame, faces, crops)  # no stream: nothing to reuse
    assert calls == [1, 1, 1]
    engine.cfg.guard.paste_mask = "window"
    window = engine.paste(frame, faces, crops)
    changed_r = np.abs(region[0].astype(int) - frame).sum(2) > 2
    changed_w = np.abs(window.astype(int) - frame).sum(2) > 2
    assert 0 < changed_r.sum() < changed_w.sum()
    assert not (changed_r & ~changed_w).any()


def _haar(tmp_path, tiny_models, extra=""):
    text = write_config(tmp_path / "c.toml", tiny_models, faces="detect").read_text()
    (tmp_path / "c.toml").write_text(
        text.replace("[guard]", f'[guard]\ndetector = "haar"\ndetect_side = 640\n{extra}', 1)
    )
    return build_pipeline(load_config(tmp_path / "c.toml"), Metrics())


@pytest.mark.skipif(not landmarks_available(), reason="dlib's landmark model is not installed")
def test_haar_faces_are_aligned_by_dlib_landmarks(tmp_path, tiny_models):
    """detector = "haar": dlib's 68 landmarks behind the Haar box put the eyes and mouth where
    CelebA's are."""
    _, batcher, pipe = _haar(tmp_path, tiny_models)
    try:
        engine, frame = pipe.engine, _demo_frame()
        assert engine.landmarks is not None
        crops = engine.find_faces(frame)
        eyes_mouth = anchor_points(engine.landmarks(frame, locate_faces(frame, max_side=640)))[0]
        m = crops.matrices[0]
        mapped = eyes_mouth @ m[:, :2].T + m[:, 2]
        np.testing.assert_allclose(mapped[2], CELEBA_ANCHOR[2] * engine.size, atol=1e-6)
    finally:
        batcher.close(5)


def test_without_the_landmark_model_haar_faces_are_box_cropped(tmp_path, tiny_models, monkeypatch):
    """A Haar machine without dlib's model keeps working: a warning, then the square crops."""
    from structlog.testing import capture_logs

    import magdr.faces.parsing

    monkeypatch.setattr(magdr.faces.parsing, "find_landmark_model", lambda: None)
    with capture_logs() as logs:
        _, batcher, pipe = _haar(tmp_path, tiny_models)
    try:
        assert pipe.engine.landmarks is None
        assert any(
            e["event"].startswith("face alignment off") and e["log_level"] == "warning"
            for e in logs
        )
        frame = _demo_frame()
        crops = pipe.engine.find_faces(frame)
        boxes = locate_faces(frame, max_side=640)
        assert crops.matrices is None
        np.testing.assert_array_equal(crops.rects, crop_rects(boxes))
    finally:
        batcher.close(5)


def test_align_off_crops_the_box_square(tmp_path, tiny_models):
    text = write_config(tmp_path / "c.toml", tiny_models, faces="detect").read_text()
    (tmp_path / "c.toml").write_text(text.replace("[guard]", "[guard]\nalign = false", 1))
    _, batcher, pipe = build_pipeline(load_config(tmp_path / "c.toml"), Metrics())
    try:
        frame = _demo_frame()
        crops = pipe.engine.find_faces(frame)
        assert pipe.engine.landmarks is None and crops.matrices is None
        boxes = load_detector("yunet")(frame, max_side=pipe.engine.cfg.guard.detect_side)
        np.testing.assert_array_equal(crops.rects, crop_rects(boxes, *CROP_FRAMING["yunet"]))
    finally:
        batcher.close(5)


def test_temporal_rule_reconstructs_a_track_from_its_kth_flagged_frame(tmp_path, tiny_models):
    """[guard] temporal_k = 2 of temporal_n = 3: a face above the threshold passes (G's plain
    output, its own score in the verdict) until its track has two such frames; from then on it
    is reconstructed. Another stream starts its own track."""
    from magdr.profile import Profile

    frame = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    prof = tmp_path / "p.json"
    flag_all = Profile.load(tiny_models["flag_all"])
    Profile(**{**flag_all.__dict__, "threshold": -1e9}).save(prof)  # every face is above it
    cfg = load_config(
        write_config(tmp_path / "c.toml", {**tiny_models, "profile": prof}, guard=True)
    )
    cfg.guard.temporal_k, cfg.guard.temporal_n = 2, 3
    cfg.guard.edit_lowpass = 0  # G's own pixels pasted, comparable with a plain pass
    cfg.guard.paste_mask = "window"
    _, batcher, pipe = build_pipeline(cfg, Metrics())
    crops = pipe.engine.find_faces(frame)
    with torch.no_grad():
        plain = pipe.engine.G(crops.x, pipe.engine.default_cond[None])
    try:

        def guard(stream):
            return pipe.submit(frame, stream=stream, seq=0, source="t").result(60)

        first = guard("a")
        face = first.verdict["faces"][0]
        assert not face["disrupted"] and face["chain"] == [] and face["score"] > -1e9
        assert not first.verdict["disrupted"]
        np.testing.assert_array_equal(first.image, pipe.engine.paste(frame, plain, crops))
        second = guard("a")
        assert second.verdict["faces"][0]["disrupted"] and second.verdict["faces"][0]["chain"]
        assert second.verdict["faces"][0]["score"] == pytest.approx(face["score"])
        assert not guard("b").verdict["disrupted"]  # a new stream's first frame
    finally:
        batcher.close(5)


def test_an_unconditional_generator_is_pasted_inside_its_task_region(tmp_path, tiny_models):
    """CycleGAN-style G (no condition, c_dim 0): the region paste takes the task's region."""
    import torch

    from magdr.models.cyclegan import CycleGAN

    torch.manual_seed(0)
    G = CycleGAN(ngf=4, n_blocks=1, image_size=32)
    torch.save({k: v.detach() for k, v in G.state_dict().items()}, tmp_path / "cyc.pt")
    models = {**tiny_models, "G": tmp_path / "cyc.pt"}
    cfg = load_config(write_config(tmp_path / "c.toml", models, faces="detect"))
    cfg.model.kind, cfg.model.condition = "cyclegan", {}
    engine, batcher, pipe = build_pipeline(cfg, Metrics())
    try:
        assert engine.default_cond.shape == (0,)
        frame = _demo_frame()
        g = pipe.submit(frame, stream="cyc", seq=0, source="t").result(10)
        assert len(g.verdict["faces"]) == 1 and g.image.shape == frame.shape
        assert (g.image != frame).any()
    finally:
        batcher.close(5)
