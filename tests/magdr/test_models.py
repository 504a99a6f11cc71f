"""Generators in the original checkpoint layouts, and the registry that loads them.

Each family is checked against an independent transcription of the original module (the
``Ref*`` classes below, copied from the upstream code with only names changed), on the same
random weights, saved and loaded through :func:`magdr.models.registry.load_generator`.
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from torch import nn

import magdr
from magdr.faces.regions import REGIONS, TARGETS, region_indicator
from magdr.models import registry
from magdr.models.cyclegan import CycleGAN
from magdr.models.ganimation import ACTION_UNITS, GANimation
from magdr.models.registry import CheckpointError, load_generator, sniff_kind
from magdr.models.stargan import StarGAN


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions on a shared 2-core machine: OpenMP threads spinning against other jobs
    # make each forward ~100x slower than running them on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Reference transcriptions of the original code
# --------------------------------------------------------------------------------------------


class RefStarGANResidualBlock(nn.Module):
    """yunjey/stargan model.py ResidualBlock."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=1, padding=1, bias=False),
            nn.InstanceNorm2d(dim_out, affine=True, track_running_stats=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim_out, dim_out, kernel_size=3, stride=1, padding=1, bias=False),
            nn.InstanceNorm2d(dim_out, affine=True, track_running_stats=True),
        )

    def forward(self, x):
        return x + self.main(x)


class RefStarGAN(nn.Module):
    """yunjey/stargan model.py Generator."""

    def __init__(self, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        layers = []
        layers.append(
            nn.Conv2d(3 + c_dim, conv_dim, kernel_size=7, stride=1, padding=3, bias=False)
        )  # noqa: E501
        layers.append(nn.InstanceNorm2d(conv_dim, affine=True, track_running_stats=True))
        layers.append(nn.ReLU(inplace=True))
        curr_dim = conv_dim
        for _ in range(2):
            layers.append(
                nn.Conv2d(curr_dim, curr_dim * 2, kernel_size=4, stride=2, padding=1, bias=False)
            )  # noqa: E501
            layers.append(nn.InstanceNorm2d(curr_dim * 2, affine=True, track_running_stats=True))
            layers.append(nn.ReLU(inplace=True))
            curr_dim = curr_dim * 2
        for _ in range(repeat_num):
            layers.append(RefStarGANResidualBlock(dim_in=curr_dim, dim_out=curr_dim))
        for _ in range(2):
            layers.append(
                nn.ConvTranspose2d(
                    curr_dim, curr_dim // 2, kernel_size=4, stride=2, padding=1, bias=False
                )
            )  # noqa: E501
            layers.append(nn.InstanceNorm2d(curr_dim // 2, affine=True, track_running_stats=True))
            layers.append(nn.ReLU(inplace=True))
            curr_dim = curr_dim // 2
        layers.append(nn.Conv2d(curr_dim, 3, kernel_size=7, stride=1, padding=3, bias=False))
        layers.append(nn.Tanh())
        self.main = nn.Sequential(*layers)

    def forward(self, x, c):
        c = c.view(c.size(0), c.size(1), 1, 1)
        c = c.repeat(1, 1, x.size(2), x.size(3))
        x = torch.cat([x, c], dim=1)
        return self.main(x)


class RefGANimationResidualBlock(nn.Module):
    """albertpumarola/GANimation networks/generator_wasserstein_gan.py ResidualBlock."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=1, padding=1, bias=False),
            nn.InstanceNorm2d(dim_out, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim_out, dim_out, kernel_size=3, stride=1, padding=1, bias=False),
            nn.InstanceNorm2d(dim_out, affine=True),
        )

    def forward(self, x):
        return x + self.main(x)


class RefGANimation(nn.Module):
    """albertpumarola/GANimation networks/generator_wasserstein_gan.py Generator."""

    def __init__(self, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        layers = []
        layers.append(
            nn.Conv2d(3 + c_dim, conv_dim, kernel_size=7, stride=1, padding=3, bias=False)
        )  # noqa: E501
        layers.append(nn.InstanceNorm2d(conv_dim, affine=True))
        layers.append(nn.ReLU(inplace=True))
        curr_dim = conv_dim
        for _ in range(2):
            layers.append(
                nn.Conv2d(curr_dim, curr_dim * 2, kernel_size=4, stride=2, padding=1, bias=False)
            )  # noqa: E501
            layers.append(nn.InstanceNorm2d(curr_dim * 2, affine=True))
            layers.append(nn.ReLU(inplace=True))
            curr_dim = curr_dim * 2
        for _ in range(repeat_num):
            layers.append(RefGANimationResidualBlock(dim_in=curr_dim, dim_out=curr_dim))
        for _ in range(2):
            layers.append(
                nn.ConvTranspose2d(
                    curr_dim, curr_dim // 2, kernel_size=4, stride=2, padding=1, bias=False
                )
            )  # noqa: E501
            layers.append(nn.InstanceNorm2d(curr_dim // 2, affine=True))
            layers.append(nn.ReLU(inplace=True))
            curr_dim = curr_dim // 2
        self.main = nn.Sequential(*layers)
        layers = []
        layers.append(nn.Conv2d(curr_dim, 3, kernel_size=7, stride=1, padding=3, bias=False))
        layers.append(nn.Tanh())
        self.img_reg = nn.Sequential(*layers)
        layers = []
        layers.append(nn.Conv2d(curr_dim, 1, kernel_size=7, stride=1, padding=3, bias=False))
        layers.append(nn.Sigmoid())
        self.attetion_reg = nn.Sequential(*layers)

    def forward(self, x, c):
        c = c.unsqueeze(2).unsqueeze(3)
        c = c.expand(c.size(0), c.size(1), x.size(2), x.size(3))
        x = torch.cat([x, c], dim=1)
        features = self.main(x)
        return self.img_reg(features), self.attetion_reg(features)


def ref_ganimation_output(G, x, c):
    """albertpumarola models/ganimation.py forward (do_saturate_mask False)."""
    fake_imgs, fake_img_mask = G.forward(x, c)
    return fake_img_mask * x + (1 - fake_img_mask) * fake_imgs


class RefRuizResidualBlock(nn.Module):
    """natanielruiz/disrupting-deepfakes ganimation/model.py ResidualBlock."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=1, padding=1, bias=False),
            nn.InstanceNorm2d(dim_out, affine=True, track_running_stats=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim_out, dim_out, kernel_size=3, stride=1, padding=1, bias=False),
            nn.InstanceNorm2d(dim_out, affine=True, track_running_stats=True),
        )

    def forward(self, x):
        return x + self.main(x)


class RefRuizGANimation(nn.Module):
    """natanielruiz/disrupting-deepfakes ganimation/model.py Generator (vipermu fork)."""

    def __init__(self, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        layers = []
        layers.append(
            nn.Conv2d(3 + c_dim, conv_dim, kernel_size=7, stride=1, padding=3, bias=False)
        )  # noqa: E501
        layers.append(nn.InstanceNorm2d(conv_dim, affine=True, track_running_stats=True))
        layers.append(nn.ReLU(inplace=True))
        self.debug1 = nn.Sequential(*layers)
        curr_dim = conv_dim
        for _ in range(2):
            layers.append(
                nn.Conv2d(curr_dim, curr_dim * 2, kernel_size=4, stride=2, padding=1, bias=False)
            )  # noqa: E501
            layers.append(nn.InstanceNorm2d(curr_dim * 2, affine=True, track_running_stats=True))
            layers.append(nn.ReLU(inplace=True))
            curr_dim = curr_dim * 2
        self.debug2 = nn.Sequential(*layers)
        for _ in range(repeat_num):
            layers.append(RefRuizResidualBlock(dim_in=curr_dim, dim_out=curr_dim))
        self.debug3 = nn.Sequential(*layers)
        for _ in range(2):
            layers.append(
                nn.ConvTranspose2d(
                    curr_dim, curr_dim // 2, kernel_size=4, stride=2, padding=1, bias=False
                )
            )  # noqa: E501
            layers.append(nn.InstanceNorm2d(curr_dim // 2, affine=True, track_running_stats=True))
            layers.append(nn.ReLU(inplace=True))
            curr_dim = curr_dim // 2
        self.main = nn.Sequential(*layers)
        self.debug4 = nn.Sequential(*layers)
        layers = []
        layers.append(nn.Conv2d(curr_dim, 3, kernel_size=7, stride=1, padding=3, bias=False))
        layers.append(nn.Tanh())
        self.im_reg = nn.Sequential(*layers)
        layers = []
        layers.append(nn.Conv2d(curr_dim, 1, kernel_size=7, stride=1, padding=3, bias=False))
        layers.append(nn.Sigmoid())
        self.im_att = nn.Sequential(*layers)

    def forward(self, x, c):
        c = c.unsqueeze(2).unsqueeze(3)
        c = c.expand(c.size(0), c.size(1), x.size(2), x.size(3))
        x = torch.cat([x, c], dim=1)
        features = self.main(x)
        reg = self.im_reg(features)
        att = self.im_att(features)
        return att, reg


def ref_ruiz_output(G, x, c):
    """disrupting-deepfakes ganimation: att, reg = G(x, c); imFromAttReg(att, reg, x)."""
    att, reg = G(x, c)
    return (1 - att) * reg + att * x


class RefResnetBlock(nn.Module):
    """junyanz/pytorch-CycleGAN-and-pix2pix models/networks.py ResnetBlock."""

    def __init__(self, dim, padding_type, norm_layer, use_dropout, use_bias):
        super().__init__()
        self.conv_block = self.build_conv_block(
            dim, padding_type, norm_layer, use_dropout, use_bias
        )  # noqa: E501

    def build_conv_block(self, dim, padding_type, norm_layer, use_dropout, use_bias):
        conv_block = []
        p = 0
        if padding_type == "reflect":
            conv_block += [nn.ReflectionPad2d(1)]
        conv_block += [
            nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias),
            norm_layer(dim),
            nn.ReLU(True),
        ]  # noqa: E501
        if use_dropout:
            conv_block += [nn.Dropout(0.5)]
        p = 0
        if padding_type == "reflect":
            conv_block += [nn.ReflectionPad2d(1)]
        conv_block += [
            nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias),
            norm_layer(dim),
        ]  # noqa: E501
        return nn.Sequential(*conv_block)

    def forward(self, x):
        out = x + self.conv_block(x)
        return out


class RefResnetGenerator(nn.Module):
    """junyanz/pytorch-CycleGAN-and-pix2pix models/networks.py ResnetGenerator."""

    def __init__(
        self,
        input_nc,
        output_nc,
        ngf=64,
        norm_layer=nn.BatchNorm2d,
        use_dropout=False,
        n_blocks=6,
        padding_type="reflect",
    ):  # noqa: E501
        assert n_blocks >= 0
        super().__init__()
        if type(norm_layer) == functools.partial:  # noqa: E721
            use_bias = norm_layer.func == nn.InstanceNorm2d
        else:
            use_bias = norm_layer == nn.InstanceNorm2d
        model = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
            norm_layer(ngf),
            nn.ReLU(True),
        ]  # noqa: E501
        n_downsampling = 2
        for i in range(n_downsampling):
            mult = 2**i
            model += [
                nn.Conv2d(
                    ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias
                ),
                norm_layer(ngf * mult * 2),
                nn.ReLU(True),
            ]  # noqa: E501
        mult = 2**n_downsampling
        for _ in range(n_blocks):
            model += [
                RefResnetBlock(
                    ngf * mult,
                    padding_type=padding_type,
                    norm_layer=norm_layer,
                    use_dropout=use_dropout,
                    use_bias=use_bias,
                )
            ]  # noqa: E501
        for i in range(n_downsampling):
            mult = 2 ** (n_downsampling - i)
            model += [
                nn.ConvTranspose2d(
                    ngf * mult,
                    int(ngf * mult / 2),
                    kernel_size=3,
                    stride=2,
                    padding=1,
                    output_padding=1,
                    bias=use_bias,
                ),
                norm_layer(int(ngf * mult / 2)),
                nn.ReLU(True),
            ]  # noqa: E501
        model += [nn.ReflectionPad2d(3)]
        model += [nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0)]
        model += [nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, input):
        return self.model(input)


def ref_cyclegan(ngf=8, n_blocks=2, use_dropout=False, running_stats=False):
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=running_stats)
    return RefResnetGenerator(
        3, 3, ngf, norm_layer=norm, use_dropout=use_dropout, n_blocks=n_blocks
    )  # noqa: E501


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, including IN affine params and running stats (non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.dim() == 1 and name.endswith("weight"):  # norm scale
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.15 * torch.randn(t.shape, generator=g))
    return module


def save(sd, tmp_path, name) -> str:
    path = tmp_path / name
    torch.save(sd, path)
    return str(path)


def images(b=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def conds(b, c_dim, seed=1):
    return torch.rand(b, c_dim, generator=torch.Generator().manual_seed(seed))


class Evil:
    """Pickles to a call that creates a directory: a stand-in for arbitrary code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --------------------------------------------------------------------------------------------
# StarGAN
# --------------------------------------------------------------------------------------------


class TestStarGAN:
    def test_matches_original_train_mode(self, tmp_path):
        ref = randomize(RefStarGAN(conv_dim=8, c_dim=5, repeat_num=2), 0)
        G = load_generator(save(ref.state_dict(), tmp_path, "200000-G.ckpt"))
        assert isinstance(G, StarGAN) and not G.training
        x, c = images(), conds(2, 5)
        before = {k: v.clone() for k, v in G.state_dict().items()}
        with torch.no_grad():
            want = ref.train()(x, c)
            got_eval = G(x, c)
            got_train = G.train()(x, c)
            ref_eval = ref.eval()(x, c)
        torch.testing.assert_close(got_eval, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got_eval, got_train)
        # the original in eval() would use the running stats: visibly different outputs
        assert (ref_eval - want).abs().max() > 1e-2
        # guarding frames must not change the model
        for k, v in G.state_dict().items():
            assert torch.equal(v, before[k]), k

    def test_pre_041_checkpoint_without_num_batches_tracked(self, tmp_path):
        sd = randomize(RefStarGAN(conv_dim=8, repeat_num=1), 1).state_dict()
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        G = load_generator(save(sd, tmp_path, "G.ckpt"))
        assert G.c_dim == 5 and G.repeat_num == 1

    def test_features(self):
        G = StarGAN(conv_dim=8, c_dim=5, repeat_num=2)
        feats = G.features(images(1), conds(1, 5))
        assert [f.shape for f in feats] == [torch.Size([1, 32, 4, 4])] * 3


# --------------------------------------------------------------------------------------------
# GANimation
# --------------------------------------------------------------------------------------------


class TestGANimation:
    def test_matches_original(self, tmp_path):
        ref = randomize(RefGANimation(conv_dim=8, c_dim=17, repeat_num=2), 2)
        G = load_generator(save(ref.state_dict(), tmp_path, "net_epoch_30_id_G.pth"))
        assert isinstance(G, GANimation) and G.variant == "original" and not G.running_stats
        x, c = images(), conds(2, 17)
        with torch.no_grad():
            want = ref_ganimation_output(ref.eval(), x, c)
            got = G(x, c)
            color, mask = G.color_and_mask(x, c)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert mask.shape == (2, 1, 16, 16) and color.shape == (2, 3, 16, 16)
        assert 0 < mask.min() and mask.max() < 1  # a real blend, so the convention matters
        # A near 1 keeps the input: swapping the roles would not match the original
        assert (mask * color + (1 - mask) * x - want).abs().max() > 1e-3

    def test_pytorch03_checkpoint_with_running_stats(self, tmp_path):
        ref = randomize(RefGANimation(conv_dim=8, c_dim=17, repeat_num=1), 3)
        sd = dict(ref.state_dict())
        for k in list(sd):  # PyTorch 0.3 InstanceNorm saved running_mean/var, no counter
            if k.endswith(".bias") and sd[k].dim() == 1 and "reg" not in k:
                base = k[: -len("bias")]
                sd[base + "running_mean"] = torch.randn_like(sd[k])
                sd[base + "running_var"] = torch.rand_like(sd[k]) + 0.5
        G = load_generator(save(sd, tmp_path, "net_epoch_1_id_G.pth"))
        assert G.running_stats
        x, c = images(), conds(2, 17)
        with torch.no_grad():
            torch.testing.assert_close(G(x, c), ref_ganimation_output(ref, x, c))

    def test_matches_ruiz_fork_in_train_mode(self, tmp_path):
        ref = randomize(RefRuizGANimation(conv_dim=8, c_dim=17, repeat_num=2), 4)
        sd = ref.state_dict()
        assert any(k.startswith("debug3.") for k in sd)  # the fork's duplicate keys
        G = load_generator(save(sd, tmp_path, "7001-37-G.ckpt"))
        assert G.variant == "ruiz" and G.running_stats
        x, c = images(), conds(2, 17)
        with torch.no_grad():
            want = ref_ruiz_output(ref.train(), x, c)
            got = G(x, c)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    def test_debug_alias_must_equal_main(self, tmp_path):
        sd = dict(randomize(RefRuizGANimation(conv_dim=8, c_dim=17, repeat_num=1), 5).state_dict())
        sd["debug2.3.weight"] = sd["debug2.3.weight"] + 1
        with pytest.raises(CheckpointError, match="debug2.3.weight"):
            load_generator(save(sd, tmp_path, "bad-G.ckpt"))

    def test_condition_and_targets(self):
        G = GANimation(conv_dim=8, repeat_num=1)
        assert G.attributes == ACTION_UNITS and G.c_dim == 17 and G.task == "reenact"
        c = magdr.condition(G, {"AU12": 0.8, "AU25": 0.4}, batch=3)
        assert c.shape == (3, 17) and c[0, ACTION_UNITS.index("AU12")] == pytest.approx(0.8)
        assert c.sum(1).tolist() == pytest.approx([1.2] * 3)
        want = region_indicator(TARGETS["reenact"]).expand(3, -1)
        assert torch.equal(G.target_regions(c), want)
        assert len(G.features(images(1), c[:1])) == 2


# --------------------------------------------------------------------------------------------
# CycleGAN
# --------------------------------------------------------------------------------------------


class TestCycleGAN:
    def test_matches_original(self, tmp_path):
        ref = randomize(ref_cyclegan(ngf=8, n_blocks=2), 6)
        sd = ref.state_dict()
        assert "model.10.conv_block.5.weight" in sd and "model.10.conv_block.1.bias" in sd
        G = load_generator(save(sd, tmp_path, "latest_net_G_A.pth"))
        assert isinstance(G, CycleGAN) and G.n_blocks == 2 and G.ngf == 8 and G.c_dim == 0
        x = images()
        with torch.no_grad():
            want = ref.train()(x)
            torch.testing.assert_close(G(x, None), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(G(x, torch.zeros(2, 0)), want, rtol=1e-5, atol=1e-5)

    def test_running_stats_era_checkpoint(self, tmp_path):
        ref = randomize(ref_cyclegan(ngf=4, n_blocks=1, running_stats=True), 7)
        G = load_generator(save(ref.state_dict(), tmp_path, "latest_net_G_A.pth"))
        assert G.running_stats
        x = images()
        with torch.no_grad():  # the original test.py runs in train mode: per-image statistics
            torch.testing.assert_close(G(x), ref.train()(x), rtol=1e-5, atol=1e-5)

    def test_dropout_layout(self, tmp_path):
        ref = randomize(ref_cyclegan(ngf=4, n_blocks=2, use_dropout=True), 8)
        G = load_generator(save(ref.state_dict(), tmp_path, "latest_net_G_A.pth"))
        assert G.use_dropout
        x = images()
        with torch.no_grad():
            torch.testing.assert_close(G(x), ref.eval()(x), rtol=1e-5, atol=1e-5)

    def test_targets_and_condition(self):
        G = CycleGAN(ngf=4, n_blocks=1)
        assert G.task == "replace" and G.attributes == [] and G.image_size == 256
        t = G.target_regions(None, batch=3)
        assert torch.equal(t, region_indicator(TARGETS["replace"]).expand(3, -1))
        assert magdr.condition(G, None, batch=2).shape == (2, 0)
        assert len(G.features(images(1))) == 2


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def stargan_sd(seed=9):
    return randomize(RefStarGAN(conv_dim=8, c_dim=5, repeat_num=1), seed).state_dict()


class TestRegistry:
    def test_sniff_kind(self):
        assert sniff_kind(stargan_sd()) == "stargan"
        assert sniff_kind(RefGANimation(8, 17, 1).state_dict()) == "ganimation"
        assert sniff_kind(RefRuizGANimation(8, 17, 1).state_dict()) == "ganimation"
        assert sniff_kind(ref_cyclegan(4, 1).state_dict()) == "cyclegan"
        assert sniff_kind({"fc.weight": torch.zeros(2, 2)}) is None

    def test_unknown_layout_raises(self, tmp_path):
        path = save({"fc.weight": torch.zeros(2, 2)}, tmp_path, "other.pth")
        with pytest.raises(CheckpointError, match="cannot tell the generator kind"):
            load_generator(path)

    def test_missing_and_unexpected_keys_named(self, tmp_path):
        sd = dict(stargan_sd())
        del sd["main.9.main.1.weight"]
        sd["main.99.extra"] = torch.zeros(3)
        path = save(sd, tmp_path, "broken-G.ckpt")
        with pytest.raises(CheckpointError) as err:
            load_generator(path)
        msg = str(err.value)
        assert "broken-G.ckpt" in msg and "stargan" in msg
        assert "missing 1 (main.9.main.1.weight)" in msg and "unexpected 1 (main.99.extra)" in msg

    def test_wrong_shape_named(self, tmp_path):
        sd = dict(stargan_sd())
        sd["main.9.main.0.weight"] = torch.zeros(32, 32, 1, 1)
        with pytest.raises(CheckpointError, match=r"main\.9\.main\.0\.weight \[32, 32, 1, 1\]"):
            load_generator(save(sd, tmp_path, "G.ckpt"))

    def test_explicit_wrong_kind(self, tmp_path):
        path = save(stargan_sd(), tmp_path, "G.ckpt")
        with pytest.raises(CheckpointError, match="cyclegan") as err:
            load_generator(path, kind="cyclegan")
        assert "G.ckpt" in str(err.value)
        with pytest.raises(CheckpointError, match="unknown kind"):
            load_generator(path, kind="pix2pix")

    def test_containers_and_dataparallel(self, tmp_path):
        sd = stargan_sd()
        x, c = images(1), conds(1, 5)
        want = load_generator(save(sd, tmp_path, "a.ckpt"))(x, c)
        for i, obj in enumerate(
            [
                {"state_dict": sd, "epoch": 3},
                {"G": {f"module.{k}": v for k, v in sd.items()}},
                {f"module.{k}": v for k, v in sd.items()},
            ]
        ):
            G = load_generator(save(obj, tmp_path, f"w{i}.pth"))
            assert torch.equal(G(x, c), want)
        with pytest.raises(CheckpointError, match="exactly one"):
            load_generator(save({"G": sd, "state_dict": sd}, tmp_path, "two.pth"))

    def test_malicious_pickle_refused_and_not_run(self, tmp_path):
        marker = tmp_path / "pwned"
        sd = dict(stargan_sd())
        path = save({**sd, "payload": Evil(str(marker))}, tmp_path, "evil-G.ckpt")
        with pytest.raises(CheckpointError, match="refused") as err:
            load_generator(path)
        assert "evil-G.ckpt" in str(err.value)
        assert not marker.exists()
        # control: a plain pickle load would really have run the payload
        torch.load(path, weights_only=False)
        assert marker.exists()

    def test_not_a_checkpoint(self, tmp_path):
        path = tmp_path / "junk.pth"
        path.write_bytes(b"not a checkpoint at all")
        with pytest.raises(CheckpointError, match="junk.pth"):
            load_generator(path)
        with pytest.raises(FileNotFoundError):
            load_generator(tmp_path / "absent.pth")

    def test_default_missing_and_present(self, tmp_path, monkeypatch):
        monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
        with pytest.raises(FileNotFoundError, match="not there yet"):
            load_generator("default")
        ref = randomize(RefStarGAN(conv_dim=8, c_dim=4, repeat_num=1), 10)
        torch.save(ref.state_dict(), tmp_path / "default_G.pt")
        attrs = ["Black_Hair", "Blond_Hair", "Male", "Young"]
        meta = {"image_size": 64, "attributes": attrs, "neutral": [1, 0, 0, 1], "iters": 5000}
        (tmp_path / "default_G.json").write_text(json.dumps(meta))
        G = load_generator("default", device="auto")
        assert isinstance(G, StarGAN) and not G.training
        assert (G.image_size, G.c_dim, G.attributes, G.neutral) == (64, 4, attrs, [1.0, 0, 0, 1])
        assert G.meta["iters"] == 5000 and G.meta["kind"] == "stargan"
        assert all(p.requires_grad for p in G.parameters())
        # hair colours are exclusive; the neutral fills the rest
        assert magdr.condition(G, {"Blond_Hair": 1}).tolist() == [[0.0, 1.0, 0.0, 1.0]]
        (tmp_path / "default_G.json").write_text(json.dumps({"attributes": attrs[:3]}))
        with pytest.raises(CheckpointError, match="attributes has 3 entries"):
            load_generator("default")
        (tmp_path / "default_G.json").write_text(json.dumps({"attribute_targets": {"Male": "x"}}))
        with pytest.raises(CheckpointError, match="attribute_targets"):
            magdr.load_generator("default")


# --------------------------------------------------------------------------------------------
# condition() and target regions on StarGAN
# --------------------------------------------------------------------------------------------


class TestConditionAndTargets:
    def test_hair_colours_exclusive(self):
        G = StarGAN(conv_dim=8, repeat_num=1, neutral=[1, 0, 0, 1, 1])
        c = magdr.condition(G, {"Blond_Hair": 1}, batch=2)
        assert c.tolist() == [[0.0, 1.0, 0.0, 1.0, 1.0]] * 2
        assert magdr.condition(G, {"Male": 0}).tolist() == [[1.0, 0.0, 0.0, 0.0, 1.0]]
        assert magdr.condition(G).tolist() == [[1.0, 0.0, 0.0, 1.0, 1.0]]

    def test_unknown_attribute(self):
        G = StarGAN(conv_dim=8, repeat_num=1)
        with pytest.raises(KeyError, match="Smiling"):
            magdr.condition(G, {"Smiling": 1})

    def test_target_regions_hair_vs_male(self):
        G = StarGAN(conv_dim=8, repeat_num=1)
        hair = magdr.condition(G, {"Blond_Hair": 1})
        male = magdr.condition(G, {"Male": 1})
        t = G.target_regions(torch.cat([hair, male]))
        assert t.shape == (2, len(REGIONS))
        assert torch.equal(t[0], region_indicator(TARGETS["hair"]))
        assert torch.equal(t[1], region_indicator(TARGETS["face+hair"]))
