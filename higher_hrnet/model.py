"""HRNet backbone, the HigherHRNet pose model and the ImageNet ClassificationHRNet, in one file.

Module and parameter names follow the official code (HRNet/HigherHRNet-Human-Pose-Estimation and
HRNet/HRNet-Image-Classification) exactly, so official checkpoints load with `load_state_dict`
(see `checkpoints.py`). Widths 32 and 48 are the official models; a width below 32 is a test/CPU
size in which the fixed-size parts (64-channel stem, classification head) shrink by width/32.
`build_model(**arch)` rebuilds a HigherHRNet from the `arch` dict its checkpoints store.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

MODEL_NAME = "higher_hrnet"

# The official code uses momentum 0.1 (PyTorch's default) for every BatchNorm.
BN_MOMENTUM = 0.1

# Per stage: (number of HighResolutionModules, number of branches). Every branch of every module
# holds 4 BasicBlocks (official W32/W48 config: NUM_MODULES 1/4/3, NUM_BLOCKS 4).
STAGE_MODULES = {2: 1, 3: 4, 4: 3}
BLOCKS_PER_BRANCH = 4


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv_bn(in_channels, out_channels, kernel_size, stride=1, relu=True, conv_bias=False):
    """Conv + BatchNorm (+ ReLU) as one nn.Sequential: the official naming (`.0` conv, `.1` bn)."""
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=conv_bias),
        nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)



def input_size(text) -> int:
    """argparse type of --input-size: HRNet takes multiples of 32, so `--input-size 100` stops at parse time."""
    size = int(text)
    if size <= 0 or size % 32:
        raise argparse.ArgumentTypeError(f"{text} is not a positive multiple of 32 (e.g. 256, 512)")
    return size

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(channels, channels * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_residual_layer(block, in_channels, channels, num_blocks, stride=1):
    """A stack of residual blocks; the first gets a 1x1 projection when the shape changes."""
    downsample = None
    if stride != 1 or in_channels != channels * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels * block.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(channels * block.expansion, momentum=BN_MOMENTUM),
        )
    layers = [block(in_channels, channels, stride, downsample)]
    layers += [block(channels * block.expansion, channels) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks followed by an all-to-all fusion of their outputs.

    Output i is relu(sum_j f_ij(x_j)): f_ii is the identity, a lower-resolution input (j > i) goes
    through 1x1 conv + BN + nearest upsampling, a higher-resolution one (j < i) through i-j strided
    3x3 convs (ReLU between them, none after the last). With multi_scale_output=False only the
    highest-resolution output is computed (the last module of HigherHRNet's stage 4).
    """

    def __init__(self, channels, num_blocks=BLOCKS_PER_BRANCH, multi_scale_output=True):
        super().__init__()
        self.num_branches = len(channels)
        self.branches = nn.ModuleList(
            make_residual_layer(BasicBlock, c, c, num_blocks) for c in channels)
        num_outputs = self.num_branches if multi_scale_output else 1
        self.fuse_layers = None
        if self.num_branches > 1:
            self.fuse_layers = nn.ModuleList(
                nn.ModuleList(self._fuse_layer(channels, j, i) for j in range(self.num_branches))
                for i in range(num_outputs))
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def _fuse_layer(channels, src, dst):
        if src == dst:
            return None
        if src > dst:
            return nn.Sequential(
                nn.Conv2d(channels[src], channels[dst], 1, bias=False),
                nn.BatchNorm2d(channels[dst], momentum=BN_MOMENTUM),
                nn.Upsample(scale_factor=2 ** (src - dst), mode="nearest"),
            )
        steps = []
        for k in range(dst - src):
            last = k == dst - src - 1
            steps.append(conv_bn(channels[src], channels[dst] if last else channels[src], 3,
                                 stride=2, relu=not last))
        return nn.Sequential(*steps)

    def forward(self, xs):
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        fused = []
        for i, fuse_row in enumerate(self.fuse_layers):
            # Summed in branch order, as the official code does, so outputs match it bit for bit.
            y = None
            for j, fuse in enumerate(fuse_row):
                term = xs[j] if fuse is None else fuse(xs[j])
                y = term if y is None else y + term
            fused.append(self.relu(y))
        return fused


def make_transition(in_channels, out_channels):
    """Maps the branches of one stage onto the next: a 3x3 conv where the width changes (None
    where it does not), and each new lower-resolution branch from the last existing one by
    strided 3x3 convs (official layout: `transition{k}.{i}.{step}.{0 conv, 1 bn}`)."""
    layers = []
    for i, c_out in enumerate(out_channels):
        if i < len(in_channels):
            layers.append(conv_bn(in_channels[i], c_out, 3) if in_channels[i] != c_out else None)
        else:
            steps = []
            for k in range(i + 1 - len(in_channels)):
                last = k == i - len(in_channels)
                steps.append(conv_bn(in_channels[-1], c_out if last else in_channels[-1], 3,
                                     stride=2))
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


def apply_transition(transition, features):
    # A new branch always grows from the lowest-resolution output of the previous stage.
    out = []
    for i, layer in enumerate(transition):
        x = features[i] if i < len(features) else features[-1]
        out.append(x if layer is None else layer(x))
    return out


def stem_channels_for(width):
    """The official stem and layer1 are 64 channels wide for every width; tiny widths shrink them."""
    return 64 if width >= 32 else 2 * width


class HRNetBackbone(nn.Module):
    """Stem (two stride-2 3x3 convs) + layer1 (4 Bottlenecks) + stages 2-4 with 2, 3, 4 branches
    of widths (w, 2w, 4w, 8w) at strides 4, 8, 16, 32. Returns the list of branch outputs."""

    def __init__(self, width=32, last_stage_multi_scale=True):
        super().__init__()
        stem = stem_channels_for(width)
        self.width = width
        self.conv1 = nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(stem, stem, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_residual_layer(Bottleneck, stem, stem, 4)

        previous = [stem * Bottleneck.expansion]
        for stage in (2, 3, 4):
            channels = [width * 2 ** b for b in range(stage)]
            modules = []
            for m in range(STAGE_MODULES[stage]):
                last = stage == 4 and m == STAGE_MODULES[stage] - 1
                modules.append(HighResolutionModule(
                    channels, multi_scale_output=last_stage_multi_scale or not last))
            setattr(self, f"transition{stage - 1}", make_transition(previous, channels))
            setattr(self, f"stage{stage}", nn.Sequential(*modules))
            previous = channels
        self.branch_channels = previous

    def forward_stem(self, x):
        """Stride-4 features after layer1 (the frozen teacher stem used by rtpe)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.layer1(x)

    def forward(self, x):
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            # Four halvings after the stride-4 stem: other sizes break the fusion of branches.
            raise ValueError(f"HRNet input {x.shape[-2]}x{x.shape[-1]}: height and width must be "
                             f"multiples of 32 (the official pipeline uses multiples of 64)")
        features = [self.forward_stem(x)]
        for stage in (2, 3, 4):
            features = apply_transition(getattr(self, f"transition{stage - 1}"), features)
            features = getattr(self, f"stage{stage}")(features)
        return features


class HigherHRNet(HRNetBackbone):
    """Bottom-up pose model (Cheng et al., CVPR 2020).

    forward(x) -> [out_quarter (B, K + T, H/4, W/4), out_half (B, K, H/2, W/2)]: the first K
    channels of out_quarter are heatmaps, the next T the associative-embedding tags (T = K with
    tag_per_joint, else 1). The 1/2-resolution head concatenates the 1/4 features with the 1/4
    output, upsamples by a 4x4 stride-2 transposed conv and refines with 4 BasicBlocks.
    """

    def __init__(self, width=32, num_joints=17, tag_per_joint=True):
        super().__init__(width, last_stage_multi_scale=False)
        self.arch = {"width": width, "num_joints": num_joints, "tag_per_joint": tag_per_joint}
        self.num_joints = num_joints
        self.tag_per_joint = tag_per_joint
        quarter_channels = num_joints + (num_joints if tag_per_joint else 1)
        # FINAL_CONV_KERNEL 1 (no padding); only the 1/4 output carries tags (WITH_AE_LOSS [True, False]).
        self.final_layers = nn.ModuleList([
            nn.Conv2d(width, quarter_channels, 1),
            nn.Conv2d(width, num_joints, 1),
        ])
        # One deconv stage: CAT_OUTPUT True, NUM_CHANNELS = width, kernel 4 (padding 1), 4 BasicBlocks.
        deconv = [nn.Sequential(
            nn.ConvTranspose2d(width + quarter_channels, width, 4, stride=2, padding=1,
                               output_padding=0, bias=False),
            nn.BatchNorm2d(width, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
        )]
        deconv += [nn.Sequential(BasicBlock(width, width)) for _ in range(4)]
        self.deconv_layers = nn.ModuleList([nn.Sequential(*deconv)])
        self.init_weights()

    def init_weights(self):
        # Official pose init: N(0, 0.001) convolutions, zero biases, BN at identity.
        if self.conv1.weight.is_meta:  # nothing to fill (and meta normal_ imports torch._dynamo: slow)
            return
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        features = super().forward(x)[0]
        out_quarter = self.final_layers[0](features)
        x = self.deconv_layers[0](torch.cat((features, out_quarter), dim=1))
        out_half = self.final_layers[1](x)
        return [out_quarter, out_half]


def classification_head_channels(width):
    """(incre_modules widths, final_layer width): fixed at (32, 64, 128, 256) and 2048 in the
    official model for every backbone width; shrunk by width/32 for tiny widths."""
    scale = min(1.0, width / 32)
    return [int(c * scale) for c in (32, 64, 128, 256)], int(2048 * scale)


class ClassificationHRNet(HRNetBackbone):
    """HRNet with the ImageNet head: each branch widened by a Bottleneck (incre_modules), merged
    from high to low resolution by strided convs (downsamp_modules), a 1x1 conv to 2048 channels
    (final_layer), global average pooling and a linear classifier."""

    def __init__(self, width=32, num_classes=1000):
        super().__init__(width, last_stage_multi_scale=True)
        self.arch = {"width": width, "num_classes": num_classes}
        head, final_channels = classification_head_channels(width)
        self.incre_modules = nn.ModuleList(
            make_residual_layer(Bottleneck, c, h, 1)
            for c, h in zip(self.branch_channels, head))
        widened = [h * Bottleneck.expansion for h in head]
        self.downsamp_modules = nn.ModuleList(
            conv_bn(widened[i], widened[i + 1], 3, stride=2, conv_bias=True)
            for i in range(len(widened) - 1))
        self.final_layer = conv_bn(widened[-1], final_channels, 1, conv_bias=True)
        self.classifier = nn.Linear(final_channels, num_classes)
        self.init_weights()

    def init_weights(self):
        # Official classification init: Kaiming (fan_out) convolutions, BN at identity.
        if self.conv1.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        features = super().forward(x)
        y = self.incre_modules[0](features[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](features[i + 1]) + down(y)
        y = self.final_layer(y)
        return self.classifier(F.adaptive_avg_pool2d(y, 1).flatten(1))


def build_model(width=32, num_joints=17, tag_per_joint=True):
    """HigherHRNet-W32 / W48 (official), or a tiny width (4 for tests, 8 or 16 for CPU training)."""
    if width < 4 or width % 4:
        raise ValueError(f"HigherHRNet width must be a positive multiple of 4 (32, 48, or tiny 4/8/16), "
                         f"got {width}")
    return HigherHRNet(width, num_joints, tag_per_joint)
