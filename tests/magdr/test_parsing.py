from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magdr.faces import parsing
from magdr.faces.parsenet import ParseNet
from magdr.faces.parsing import (
    BiSeNet,
    CheckpointError,
    FaceParser,
    LandmarkParser,
    ParseNetParser,
    load_parser,
    rasterize_landmarks,
    read_state_dict,
    sniff_parser,
)
from magdr.faces.regions import BISENET_CLASSES, REGIONS, group_regions
from tests.conftest import data_dir, needs_landmarks

DATA = data_dir()
C = {name: i for i, name in enumerate(BISENET_CLASSES)}


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def _assert_probs(p: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert p.shape == shape
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(shape[0], *shape[2:]), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def bisenet_sd() -> dict[str, torch.Tensor]:
    """A state dict in the 79999_iter.pth layout, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = BiSeNet()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.state_dict()


@pytest.fixture()
def parsenet_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return ParseNet(width=4, depth=3).state_dict()


class TestBiSeNet:
    def test_key_layout(self, bisenet_sd):
        sd = bisenet_sd
        assert len(sd) == 191  # 79999_iter.pth: ResNet-18 trunk (no fc) + context path + heads
        for k, shape in {
            "cp.resnet.conv1.weight": (64, 3, 7, 7),
            "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
            "cp.resnet.layer4.1.bn2.running_var": (512,),
            "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
            "cp.arm32.conv_atten.weight": (128, 128, 1, 1),
            "cp.arm32.bn_atten.num_batches_tracked": (),
            "cp.conv_head32.bn.weight": (128,),
            "cp.conv_avg.conv.weight": (128, 512, 1, 1),
            "ffm.convblk.conv.weight": (256, 256, 1, 1),  # 128 (res 1/8) + 128 (context)
            "ffm.conv1.weight": (64, 256, 1, 1),
            "ffm.conv2.weight": (256, 64, 1, 1),
            "conv_out.conv.conv.weight": (256, 256, 3, 3),
            "conv_out.conv_out.weight": (19, 256, 1, 1),
            "conv_out16.conv_out.weight": (19, 64, 1, 1),
            "conv_out32.conv.bn.running_mean": (64,),
        }.items():
            assert tuple(sd[k].shape) == shape, k
        assert not any(k.startswith(("cp.resnet.fc", "mean", "std", "cp.sp")) for k in sd)

    def test_load_file_forward_at_512(self, bisenet_sd, tmp_path):
        path = tmp_path / "79999_iter.pth"
        torch.save(bisenet_sd, path)
        P = load_parser(path)
        assert isinstance(P, BiSeNet) and P.size == 512 and not P.training
        torch.testing.assert_close(
            P.cp.resnet.bn1.running_mean, bisenet_sd["cp.resnet.bn1.running_mean"]
        )
        assert not any(p.requires_grad for p in P.parameters())
        with torch.no_grad():
            p = P(_images(1, 24, 20))
        _assert_probs(p, (1, 19, 24, 20))
        r = group_regions(p)
        assert r.shape == (1, len(REGIONS), 24, 20)
        torch.testing.assert_close(r.sum(1), torch.ones(1, 24, 20))

    def test_parse_normalises_like_imagenet(self, bisenet_sd):
        P = BiSeNet.from_state_dict(bisenet_sd).eval()
        x = _images(1, 32, 32)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            ref = P.net(((x + 1) / 2 - mean) / std)[0].softmax(1)
            torch.testing.assert_close(P.parse(x), ref)
            out, aux16, aux32 = P.net(x)
        assert out.shape == aux16.shape == aux32.shape == (1, 19, 32, 32)

    def test_old_checkpoint_without_bn_counters_and_containers(self, bisenet_sd, tmp_path):
        sd = {k: v for k, v in bisenet_sd.items() if not k.endswith("num_batches_tracked")}
        BiSeNet.from_state_dict(sd)
        path = tmp_path / "wrapped.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
        assert sniff_parser(read_state_dict(path)) == "bisenet"

    def test_strict_key_errors(self, bisenet_sd):
        sd = dict(bisenet_sd)
        del sd["ffm.conv1.weight"]
        with pytest.raises(CheckpointError, match=r"missing 1 \(ffm\.conv1\.weight\)"):
            BiSeNet.from_state_dict(sd)
        sd = {**bisenet_sd, "cp.sp.conv1.conv.weight": torch.zeros(1)}
        with pytest.raises(CheckpointError, match=r"unexpected 1 \(cp\.sp\.conv1"):
            BiSeNet.from_state_dict(sd)
        sd = {**bisenet_sd, "ffm.conv2.weight": torch.zeros(256, 32, 1, 1)}
        with pytest.raises(CheckpointError, match=r"wrong shape 1 \(ffm\.conv2\.weight \[256, 32"):
            BiSeNet.from_state_dict(sd)
        with pytest.raises(CheckpointError, match="not a BiSeNet layout"):
            BiSeNet.from_state_dict({"cp.resnet.conv1.weight": torch.zeros(1)})


class TestParseNetParser:
    def test_load_and_forward(self, parsenet_sd, tmp_path):
        path = tmp_path / "parser.pt"
        torch.save({"state_dict": parsenet_sd, "step": torch.tensor(3)}, path)
        P = load_parser(path)
        assert isinstance(P, ParseNetParser) and P.size == 128
        x = _images(2, 40, 48)
        with torch.no_grad():
            p = P(x)
        _assert_probs(p, (2, 19, 40, 48))
        net = ParseNet.from_state_dict(parsenet_sd).eval()
        with torch.no_grad():
            x128 = F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False)
            probs = net(x128).softmax(1)
            ref = F.interpolate(probs, (40, 48), mode="bilinear", antialias=True)
        torch.testing.assert_close(p, ref)

    def test_inference_folds_batch_norms_into_the_convs(self, parsenet_sd):
        P = ParseNetParser.from_state_dict(parsenet_sd).eval()
        # non-trivial batch-norm statistics, so folding has something to do
        g = torch.Generator().manual_seed(0)
        for m in P.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
        P.load_state_dict(P.state_dict())  # drops any folded copy made before
        x = _images(2, 128, 128)
        with torch.enable_grad():
            want = P(x).detach()  # gradients on: the module as it is
        with torch.no_grad():
            got = P(x)  # the folded copy
        folded = P.__dict__["_folded"]
        assert folded is not None
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert set(P.state_dict()) == {f"net.{k}" for k in parsenet_sd}  # nothing extra saved
        P.train()
        assert P.__dict__["_folded"] is None  # training changes the weights: fold again later

    def test_bfloat16_autocast_shrinks_the_probabilities_back(self, parsenet_sd):
        """The daemon runs the parser under bfloat16 autocast where the CPU has it; the
        antialiased shrink back to a smaller crop then runs in float32 (no bf16 kernel)."""
        P = ParseNetParser.from_state_dict(parsenet_sd).eval()
        x = _images(2, 96, 96)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            p = P(x)
        assert p.shape == (2, 19, 96, 96)
        with torch.no_grad():
            torch.testing.assert_close(p.float(), P(x), atol=0.05, rtol=0)

    def test_differentiable_wrt_input(self, parsenet_sd):
        P = ParseNetParser.from_state_dict(parsenet_sd).eval()
        x = _images(1, 32, 32).requires_grad_(True)
        P(x)[:, C["skin"]].sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0

    def test_strict_keys(self, parsenet_sd):
        sd = {**parsenet_sd, "extra.weight": torch.zeros(1)}
        with pytest.raises(CheckpointError, match=r"ParseNet layout.*Unexpected.*extra\.weight"):
            ParseNetParser.from_state_dict(sd)
        del sd["head.weight"]
        with pytest.raises(CheckpointError, match="not a ParseNet layout"):
            ParseNetParser.from_state_dict(sd)


class TestLoadParser:
    def test_unknown_layout_and_unsafe_files(self, tmp_path):
        path = tmp_path / "other.pt"
        torch.save({"main.0.weight": torch.zeros(2)}, path)
        with pytest.raises(CheckpointError, match="not a known parser layout"):
            load_parser(path)
        path = tmp_path / "pickled.pt"
        torch.save({"w": torch.zeros(1), "obj": Path("x")}, path)
        with pytest.raises(CheckpointError, match="refused"):
            load_parser(path)
        with pytest.raises(FileNotFoundError):
            load_parser(tmp_path / "nope.pth")

    def test_default_without_anything_says_how_to_get_one(self, tmp_path, monkeypatch):
        monkeypatch.setattr(parsing, "DEFAULT_WEIGHTS", tmp_path / "parser.pt")
        monkeypatch.setattr(parsing, "find_landmark_model", lambda: None)
        with pytest.raises(
            FileNotFoundError, match="parser.pt is missing.*libdlib-data.*face-recog"
        ):
            load_parser("default")

    def test_default_prefers_shipped_weights(self, parsenet_sd, tmp_path, monkeypatch):
        torch.save(parsenet_sd, tmp_path / "parser.pt")
        monkeypatch.setattr(parsing, "DEFAULT_WEIGHTS", tmp_path / "parser.pt")
        assert isinstance(load_parser("default"), ParseNetParser)

    def test_base_class_is_abstract(self):
        with pytest.raises(NotImplementedError):
            FaceParser()(_images(1, 8, 8))
        with pytest.raises(ValueError, match=r"expected shape \[B,3,H,W\]"):
            ParseNetParser(ParseNet(width=4, depth=2))(torch.zeros(1, 1, 8, 8))


def _synthetic_landmarks() -> np.ndarray:
    """A frontal 68-point face (iBUG order) drawn by hand in a 256×256 image."""
    p = np.zeros((68, 2))
    t = np.linspace(np.pi, 0, 17)
    p[0:17] = np.stack([128 + 70 * np.cos(t), 120 + 85 * np.sin(t)], 1)  # jaw
    for s, cx in ((17, 92.5), (22, 163.5)):  # brows: arcs traced along their upper edge
        xs = np.linspace(cx - 22.5, cx + 22.5, 5)
        p[s : s + 5] = np.stack([xs, 95 - 8 * np.sin(np.linspace(0, np.pi, 5))], 1)
    p[27:31] = np.stack([np.full(4, 128.0), np.linspace(105, 150, 4)], 1)  # nose bridge
    p[31:36] = np.stack([np.linspace(113, 143, 5), [155, 157, 158, 157, 155]], 1)

    def ellipse(cx, cy, rx, ry, degrees):
        a = np.deg2rad(degrees)
        return np.stack([cx + rx * np.cos(a), cy - ry * np.sin(a)], 1)

    eye = [180, 120, 60, 0, -60, -120]
    p[36:42], p[42:48] = ellipse(95, 115, 13, 5, eye), ellipse(161, 115, 13, 5, eye)
    p[48:60] = ellipse(128, 178, 25, 10, [180 - 30 * i for i in range(12)])
    p[60:68] = ellipse(128, 178, 18, 4, [180 - 45 * i for i in range(8)])
    return p


class TestLandmarks:
    def test_rasterize_classes(self):
        probs = rasterize_landmarks(_synthetic_landmarks(), 256)
        assert probs.shape == (19, 256, 256) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        assert probs.min() >= 0
        lab = probs.argmax(0)
        for (x, y), name in {
            (80, 150): "skin", (128, 70): "skin", (128, 150): "nose", (95, 115): "l_eye",
            (161, 115): "r_eye", (92, 92): "l_brow", (163, 92): "r_brow", (128, 178): "mouth",
            (128, 171): "u_lip", (128, 185): "l_lip", (5, 5): "background",
            (128, 240): "background",
        }.items():  # fmt: skip
            assert lab[y, x] == C[name], (x, y, name, BISENET_CLASSES[lab[y, x]])
        for name in ("hair", "l_ear", "neck", "cloth", "hat", "eye_g"):
            assert probs[C[name]].max() == 0
        edge = probs[C["skin"], 150, 40:70]  # soft edge at the jaw, not a step
        assert edge[0] == 0 and edge[-1] > 0.99 and (np.diff(edge) >= -1e-6).all()
        assert ((edge > 0.05) & (edge < 0.95)).sum() >= 3

    def test_missing_model_message(self, tmp_path):
        pytest.importorskip("dlib")
        with pytest.raises(FileNotFoundError, match="libdlib-data.*face-recognition-models"):
            LandmarkParser(tmp_path / "none.dat")

    @needs_landmarks
    def test_parser_on_noise_falls_back_to_the_celeba_box(self):
        P = load_parser("landmarks")
        assert isinstance(P, LandmarkParser) and P.size == 256
        p = P(_images(2, 64, 64))
        _assert_probs(p, (2, 19, 64, 64))
        assert (p[:, C["skin"]] > 0.5).any() and (p[:, C["hair"]] == 0).all()

    @needs_landmarks
    @pytest.mark.data
    def test_parser_on_celeba_faces(self):
        cv2 = pytest.importorskip("cv2")
        imgs = []
        for name in ("008001.jpg", "008009.jpg"):
            path = DATA / "celeba/images" / name
            if not path.is_file():
                pytest.skip(f"face data not found: {path}")
            im = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            im = cv2.resize(im, (178, 218))[20:198]  # StarGAN's centre crop
            imgs.append(cv2.resize(im, (128, 128), interpolation=cv2.INTER_AREA))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        p = load_parser("landmarks")(x)
        _assert_probs(p, (2, 19, 128, 128))
        lab = p.argmax(1)
        assert (lab[:, 64, 64] != C["background"]).all()  # the crop's centre is face
        for name in ("skin", "nose", "l_eye", "r_eye", "u_lip"):
            area = (lab == C[name]).float().mean((1, 2))
            assert (area > 0.001).all(), name
        assert ((lab == C["skin"]).float().mean((1, 2)) > 0.15).all()
