"""The real-time student: Context-Aware Modules (Progressive Context Refinement) with a human
segmentation head used as attention, plus a color branch. Two sizes: `seed` (the seed's default
student on the frozen HigherHRNet stem, bugs fixed: 1,905,290 parameters) and `light` (own small
stem, sized for >= 30 FPS image->keypoints at 256x256 on 2 CPU threads).
Output: (segmentation logits (B,1,H/4,W/4), keypoint map (B,K+1,H/4,W/4) = K heatmap logits + 1 tag).
`build_model(**arch)` rebuilds a student from the `arch` dict its checkpoints store.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck

from common.data import IMAGENET_MEAN, IMAGENET_STD
from common.heatmaps import HeatmapCodec
from common.keypoints import COCO17
from common.runs import require

MODEL_NAME = "rtpe"
STRIDE = 4  # the student's maps are the input at 1/4 (map pixel = input pixel / 4)

# Architecture sizes. `seed` follows the seed's AttentionStudentSteps (inplanes 80, color 50->80);
# `light` was sized on the 2-core benchmark (rtpe/benchmark.py) to keep image->keypoints >= 30 FPS.
SIZES = {
    "seed": dict(stem="hrnet", mid_channels=(168, 80), color_channels=(50, 80),
                 color_input_stride=1, attention_dilations=(1, 2, 3, 4), detector_dilations=(1, 2, 3),
                 detector_blocks=3),
    # light: channel counts multiples of 8 after the +3 color channels (faster channels_last kernels);
    # the color branch reads a half-resolution image (the pointwise LAB maths dominated at full size)
    "light": dict(stem="light", stem_channels=(16, 32), mid_channels=(29,), color_channels=(8, 16),
                  color_input_stride=2, attention_dilations=(1, 2), detector_dilations=(1, 2, 3),
                  detector_blocks=2),
}


def conv_bn_relu(in_channels, out_channels, kernel_size=3, stride=1, dilation=1):
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ContextAwareModule(nn.Module):
    """Context-Aware Module of Progressive Context Refinement (Nie et al. 2019):
    out = ReLU(residual(x) + hybrid_dilated(x) * squeeze_excitation_gates(x))."""

    def __init__(self, channels, dilations=(1, 2, 3, 4)):
        super().__init__()
        hidden = channels // 4
        self.residual = conv_bn_relu(channels, channels, kernel_size=1)
        # 1x1 convs with bias instead of Linear layers: same parameters, no reshapes (ONNX, channels_last)
        self.gates = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1), nn.Sigmoid())
        self.dilated = nn.ModuleList(conv_bn_relu(channels, hidden, 3, dilation=d) for d in dilations)
        self.fuse = conv_bn_relu(hidden * len(dilations), channels, kernel_size=1)

    def forward(self, x):
        hybrid = self.fuse(torch.cat([branch(x) for branch in self.dilated], dim=1))
        return F.relu(self.residual(x) + hybrid * self.gates(x))


class HRNetStem(nn.Module):
    """The HigherHRNet stem (conv1, bn1, conv2, bn2, layer1): 256 channels at stride 4, 325,056
    parameters. Attribute names equal the official model's so its weights load by name."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        downsample = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256))
        self.layer1 = nn.Sequential(Bottleneck(64, 64, downsample=downsample),
                                    *[Bottleneck(256, 64) for _ in range(3)])
        self.out_channels = 256

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.layer1(x)


class LightStem(nn.Module):
    """A small trainable stride-4 stem for the `light` size (can be distilled from HRNetStem
    with `train.py --stage stem`)."""

    def __init__(self, channels=(16, 32)):
        super().__init__()
        self.layers = nn.Sequential(conv_bn_relu(3, channels[0], 3, stride=2),
                                    conv_bn_relu(channels[0], channels[1], 3, stride=2),
                                    conv_bn_relu(channels[1], channels[1], 3))
        self.out_channels = channels[1]

    def forward(self, x):
        return self.layers(x)


def _srgb_to_linear(rgb):
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).clamp(min=0) ** 2.4)


def rgb_to_lab(rgb):
    """sRGB in [0,1] (B,3,H,W) -> CIE L*a*b* (D65) with L in [0,100], as cv2.COLOR_RGB2Lab on float."""
    linear = _srgb_to_linear(rgb.clamp(0, 1))
    matrix = rgb.new_tensor([[0.412453, 0.357580, 0.180423],
                             [0.212671, 0.715160, 0.072169],
                             [0.019334, 0.119193, 0.950227]])
    white = rgb.new_tensor([0.950456, 1.0, 1.088754]).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white
    epsilon = 0.008856
    f = torch.where(xyz > epsilon, xyz.clamp(min=epsilon) ** (1 / 3), 7.787 * xyz + 16 / 116)
    y = xyz[:, 1:2]
    lightness = torch.where(y > epsilon, 116 * f[:, 1:2] - 16, 903.3 * y)
    a = 500 * (f[:, 0:1] - f[:, 1:2])
    b = 200 * (f[:, 1:2] - f[:, 2:3])
    return torch.cat([lightness, a, b], dim=1)


def rgb_to_hsv(rgb):
    """sRGB in [0,1] (B,3,H,W) -> (hue degrees [0,360), saturation [0,1], value [0,1]),
    as cv2.COLOR_RGB2HSV on float."""
    rgb = rgb.clamp(0, 1)
    red, green, blue = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    value, _ = rgb.max(dim=1, keepdim=True)
    chroma = value - rgb.min(dim=1, keepdim=True)[0]
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(value == red, 60 * (green - blue) / safe,
                      torch.where(value == green, 120 + 60 * (blue - red) / safe,
                                  240 + 60 * (red - green) / safe))
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = torch.where(hue < 0, hue + 360, hue)
    return torch.cat([hue, saturation, value], dim=1)


class ColorTransform(nn.Module):
    """Turns the ImageNet-normalized RGB input into the color branch's input inside the network,
    so the model has one input and exports as one graph."""

    def __init__(self, color="lab"):
        super().__init__()
        if color not in ("lab", "hsv", "none"):
            raise ValueError(f"color must be lab, hsv or none, not {color!r}")
        self.color = color
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, normalized):
        if self.color == "none":
            return normalized
        rgb = normalized * self.std + self.mean
        if self.color == "lab":
            lab = rgb_to_lab(rgb)
            # roughly unit range for the convolutions
            return torch.cat([lab[:, :1] / 50 - 1, lab[:, 1:] / 100], dim=1)
        hsv = rgb_to_hsv(rgb)
        # hue is circular: embed it as a saturation-weighted point on the color wheel
        angle = hsv[:, :1] * (math.pi / 180)
        return torch.cat([hsv[:, 1:2] * torch.cos(angle), hsv[:, 1:2] * torch.sin(angle),
                          hsv[:, 2:3] * 2 - 1], dim=1)


class RealtimePoseStudent(nn.Module):
    """Stem -> mid-stem (+ color image at 1/4) -> attention pyramid of CAMs at 1/4, 1/8, 1/16
    summed -> 1-channel segmentation logits; features * sigmoid(logits / divisor), concatenated with
    the color branch -> CAMs -> 3x3 conv to K heatmap logits + 1 tag channel."""

    def __init__(self, size="seed", color="lab", num_joints=17):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
        config = SIZES[size]
        self.arch = {"size": size, "color": color, "num_joints": num_joints}
        self.size, self.color, self.num_joints = size, color, num_joints
        self.frozen_stem = config["stem"] == "hrnet"
        self.stem = HRNetStem() if self.frozen_stem else LightStem(config["stem_channels"])
        if self.frozen_stem:
            self.stem.requires_grad_(False)

        mids, previous = [], self.stem.out_channels
        for channels in config["mid_channels"]:
            mids.append(conv_bn_relu(previous, channels, 3))
            previous = channels
        self.mid_stem = nn.Sequential(*mids)
        features = previous + 3  # mid-stem output + the color image resized to 1/4

        self.color_transform = ColorTransform(color)
        self.color_input_stride = 1
        color_out = 0
        if color != "none":
            first, second = config["color_channels"]
            # two 5x5 convolutions down to 1/4 (seed: both stride 2 on the full-resolution image)
            self.color_input_stride = config["color_input_stride"]
            self.color_branch = nn.Sequential(
                conv_bn_relu(3, first, 5, stride=4 // (2 * self.color_input_stride)),
                conv_bn_relu(first, second, 5, stride=2))
            color_out = second

        dilations = config["attention_dilations"]
        self.attention_high = ContextAwareModule(features, dilations)
        self.attention_mid = ContextAwareModule(features, dilations)
        self.attention_low = ContextAwareModule(features, dilations)
        self.attention_head = nn.Conv2d(features, 1, 3, padding=1)

        detector_channels = features + color_out
        self.detector = nn.Sequential(*[ContextAwareModule(detector_channels, config["detector_dilations"])
                                        for _ in range(config["detector_blocks"])])
        self.detector_head = nn.Conv2d(detector_channels, num_joints + 1, 3, padding=1)

        # Training state kept in the state dict, so checkpoints and resume carry it: the seed divides
        # the attention logits by 1 + 20 exp(-0.001 step) so the attention does not collapse early.
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("attention_divisor", torch.tensor(21.0))
        self._init_weights()

    def add_stem_adapter(self, out_channels):
        """The 1x1 conv `--stage stem` trains with, from this stem's channels to the teacher stem's."""
        self.stem_adapter = nn.Conv2d(self.stem.out_channels, out_channels, 1)
        self.arch["stem_adapter"] = out_channels

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and not (self.frozen_stem and _is_inside(module, self.stem)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # start the heatmap logits at a low prior (most pixels are background)
        nn.init.normal_(self.detector_head.weight, std=1e-3)
        nn.init.constant_(self.detector_head.bias[: self.num_joints], -4.0)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen_stem:
            self.stem.eval()  # the teacher's BN statistics must never move
        return self

    @staticmethod
    def divisor_at(step):
        return 1.0 + 20.0 * math.exp(-0.001 * step)

    def advance_training_step(self):
        """Called once per optimiser step by the training loss: moves the attention divisor."""
        self.train_step += 1
        self.attention_divisor.fill_(self.divisor_at(int(self.train_step)))

    def stem_features(self, x):
        if self.frozen_stem:
            with torch.no_grad():
                return self.stem(x)
        return self.stem(x)

    def forward(self, x):
        stem = self.stem_features(x)
        features = self.mid_stem(stem)
        size = features.shape[-2:]
        if self.color != "none" and self.color_input_stride > 1:
            x = F.avg_pool2d(x, self.color_input_stride)
        color_image = self.color_transform(x)
        small_color = F.interpolate(color_image, size=size, mode="bilinear", align_corners=False)
        features = torch.cat([features, small_color], dim=1)

        high = self.attention_high(features)
        mid = self.attention_mid(F.avg_pool2d(features, 3, 2, 1, count_include_pad=False))
        low = self.attention_low(F.avg_pool2d(mid, 3, 2, 1, count_include_pad=False))
        # the seed overwrote the middle branch with the low one; all three are summed here
        summed = (high + F.interpolate(mid, size=size, mode="nearest")
                  + F.interpolate(low, size=size, mode="nearest"))
        segmentation = self.attention_head(summed)
        # a copy: the training loss advances the divisor in place before backward
        attention = torch.sigmoid(segmentation / self.attention_divisor.clone())

        detector_in = features * attention
        if self.color != "none":
            color = self.color_branch(color_image)
            if color.shape[-2:] != size:
                color = F.interpolate(color, size=size, mode="bilinear", align_corners=False)
            detector_in = torch.cat([detector_in, color], dim=1)
        keypoints = self.detector_head(self.detector(detector_in))
        return segmentation, keypoints


def _is_inside(module, parent):
    return any(module is m for m in parent.modules())


def build_model(size="light", color="lab", num_joints=17, stem_adapter=None) -> RealtimePoseStudent:
    model = RealtimePoseStudent(size, color, num_joints)
    if stem_adapter:
        model.add_stem_adapter(stem_adapter)
    return model


def upgrade_checkpoint(checkpoint, path) -> dict:
    """A checkpoint written before arch and settings had their own keys: the student's size was its
    config's "preset" and its color "colour" (also in the weights' names); the joint count is in the
    weights; the target and decoding settings were constants (stride 4, sigma 1.75, pos_weight 100)."""
    config = require(checkpoint, "config", path)
    weights = {k.replace("colour_", "color_"): v for k, v in require(checkpoint, "model", path).items()
               if not k.startswith("stem_adapter.")}    # only the stem stage trained with the adapter
    arch = {"size": require(config, "preset", path), "color": require(config, "colour", path),
            "num_joints": int(weights["detector_head.weight"].shape[0]) - 1}
    crop = require(config, "crop_size", path)
    codec = HeatmapCodec((crop, crop), (crop // STRIDE, crop // STRIDE), 1.75, "subpixel")
    settings = {"stride": STRIDE, "heatmap_pos_weight": 100.0, "input_size": require(config, "input_size", path),
                "layout": COCO17.as_dict(), "codec": codec.as_dict()}
    return {**checkpoint, "model": weights, "arch": arch, "settings": settings}


def stem_state_from_higher_hrnet(state_dict):
    """The HRNet stem's entries (conv1, bn1, conv2, bn2, layer1) of a HigherHRNet state dict."""
    prefixes = ("conv1.", "bn1.", "conv2.", "bn2.", "layer1.")
    return {k: v for k, v in state_dict.items() if k.startswith(prefixes)}


def load_teacher_stem(student, higher_hrnet_state_dict, source="the teacher checkpoint"):
    """Copies the teacher's stem weights into a `seed` student (strict: every stem key, same shapes)."""
    if not student.frozen_stem:
        raise ValueError("only the `seed` size carries the HigherHRNet stem")
    stem_state = stem_state_from_higher_hrnet(higher_hrnet_state_dict)
    expected = student.stem.state_dict()
    missing = [k for k in expected if k not in stem_state and not k.endswith("num_batches_tracked")]
    wrong = [k for k in expected if k in stem_state and stem_state[k].shape != expected[k].shape]
    if missing or wrong:
        raise ValueError(f"{source}: not a HigherHRNet stem (missing {missing[:3]}, wrong shape {wrong[:3]})")
    merged = {}
    for key, default in expected.items():
        value = stem_state.get(key, default)
        merged[key] = value.float() if value.is_floating_point() else value  # fp16 checkpoints
    student.stem.load_state_dict(merged)
    return student
