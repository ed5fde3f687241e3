"""Detection and segmentation necks written the way model libraries write them: a YOLO-style
backbone (CSP blocks with chunk + concat, SPPF max-pool pyramid) and a UNet (concatenated skips,
transposed-conv upsampling, GroupNorm)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import usnet


def conv_bn(cin: int, cout: int, k: int = 1, s: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU()
    )


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = conv_bn(c, c, 3), conv_bn(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's CSP block: one conv, chunked in two; bottlenecks on the second half; all
    concatenated."""

    def __init__(self, cin: int, cout: int, n: int = 2):
        super().__init__()
        self.c = cout // 2
        self.cv1 = conv_bn(cin, 2 * self.c)
        self.cv2 = conv_bn((2 + n) * self.c, cout)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        y = [a, b]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__()
        self.cv1 = conv_bn(cin, cin // 2)
        self.cv2 = conv_bn(cin // 2 * 4, cout)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), 1))


class YoloBackbone(nn.Module):
    """Returns the three feature maps a detection head consumes (a tuple)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.stage1 = nn.Sequential(conv_bn(16, 32, 3, 2), C2f(32, 32))
        self.stage2 = nn.Sequential(conv_bn(32, 64, 3, 2), C2f(64, 64))
        self.stage3 = nn.Sequential(conv_bn(64, 64, 3, 2), C2f(64, 64), SPPF(64, 64))

    def forward(self, x):
        p3 = self.stage1(self.stem(x))
        p4 = self.stage2(p3)
        return p3, p4, self.stage3(p4)


class UNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU()
            )

        self.enc1, self.enc2, self.enc3 = block(3, 16), block(16, 32), block(32, 64)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec2 = block(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec1 = block(32, 16)
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return {"out": self.head(d1)}


def _outputs(out):
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out) if isinstance(out, (tuple, list)) else [out]


@torch.no_grad()
def _trained_looking(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m).__name__ == "FrozenBatchNorm2d":
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(1)
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
    return model


def feature_extractor() -> nn.Module:
    """A torchvision backbone used through create_feature_extractor: a dict of feature maps."""
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    return create_feature_extractor(resnet18(), {"layer2": "c3", "layer3": "c4", "layer4": "c5"})


def fpn_backbone() -> nn.Module:
    """ResNet + FeaturePyramidNetwork (FrozenBatchNorm2d, interpolate, dict outputs)."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)


MODELS = {"yolo": YoloBackbone, "unet": UNet, "features": feature_extractor, "fpn": fpn_backbone}


def _converted(name: str):
    torch.manual_seed(0)
    plain = _trained_looking(MODELS[name]()).eval()
    model = usnet.slimmable(copy.deepcopy(plain), input_size=(1, 3, 32, 32)).eval()
    return plain, model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_width_is_the_plain_model(name):
    plain, model = _converted(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(_outputs(plain(x)), _outputs(model(x)), strict=True):
            assert torch.equal(a, b)


_CALIBRATED = {}


def _calibrated(name: str):
    if name not in _CALIBRATED:
        _, model = _converted(name)
        _CALIBRATED[name] = model
    return _CALIBRATED[name]


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=3, deadline=None)
@given(width=st.floats(0.25, 1.0))
def test_export_equals_the_slimmable_model_at_random_widths(name, width):
    model = _calibrated(name)
    usnet.calibrate(model, [torch.randn(4, 3, 32, 32) for _ in range(2)], [width], num_images=8)
    plain = usnet.export(model, width)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), usnet.width(model, width):
        got, expected = _outputs(plain(x)), _outputs(model(x))
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    if name == "unet":
        assert expected[0].shape == (2, 3, 32, 32)  # the classes stay fixed
    profile = usnet.profile(model, width, (1, 3, 32, 32))
    assert profile.macs <= usnet.profile(model, 1.0, (1, 3, 32, 32)).macs


def test_csp_chunk_halves_are_segments_of_one_group():
    _, model = _converted("yolo")
    usnet.set_width(model, 0.5)
    c2f = model.stage1[1]
    cv1 = c2f.cv1[0]
    assert cv1.active_out_channels == 16
    assert cv1.active_out_index.tolist() == [*range(8), *range(16, 24)]
    # the outputs (a tuple of feature maps) follow the plan and are fixed
    p3, p4, p5 = model.train()(torch.randn(2, 3, 32, 32))
    assert (p3.shape[1], p4.shape[1], p5.shape[1]) == (32, 64, 64)


def test_multi_input_multi_output_models():
    class TwoStreams(nn.Module):
        def __init__(self):
            super().__init__()
            self.rgb, self.depth = conv_bn(3, 16, 3), conv_bn(1, 16, 3)
            self.fuse = conv_bn(32, 32)
            self.embed = nn.Conv2d(32, 8, 1)

        def forward(self, rgb, depth):
            fused = self.fuse(torch.cat([self.rgb(rgb), self.depth(depth)], 1))
            return [fused.mean((2, 3)), self.embed(fused)]

    plain = TwoStreams()
    gm_input = (torch.randn(1, 3, 8, 8), torch.randn(1, 1, 8, 8))
    with pytest.raises(usnet.ConversionError, match="cannot run"):
        usnet.slimmable(copy.deepcopy(plain), input_size=(1, 3, 8, 8))  # one input for two
    model = usnet.slimmable(plain, example_input=gm_input)
    usnet.set_width(model, 0.5)
    assert model.rgb[0].active_in_channels == 3 and model.depth[0].active_in_channels == 1
    assert model.fuse[0].active_in_index.tolist() == [*range(8), *range(16, 24)]
    assert model.fuse[0].active_out_channels == 32  # an output: fixed
    pooled, embedded = model.train()(torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8))
    assert pooled.shape == (2, 32) and embedded.shape == (2, 8, 8, 8)


def test_backbone_outputs_can_slim_with_the_plan():
    model = usnet.slimmable(feature_extractor(), input_size=(1, 3, 32, 32), slim_outputs=True,
                            fixed_outputs=["layer4.1.conv2"])  # fmt: skip
    model = _trained_looking(model).eval()
    usnet.calibrate(model, [torch.randn(4, 3, 32, 32)], [0.5], num_images=4)
    usnet.set_width(model, 0.5)
    out = model(torch.randn(1, 3, 32, 32))
    assert (out["c3"].shape[1], out["c4"].shape[1], out["c5"].shape[1]) == (64, 128, 512)
    plain = usnet.export(model, 0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for key, value in plain(x).items():
            assert torch.allclose(value, model(x)[key], atol=1e-4)
