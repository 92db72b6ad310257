"""Simple Baselines pose network (Xiao et al. 2018): a torchvision ResNet without avgpool/fc,
a few stride-2 transposed convolutions, and a 1x1 convolution giving one heatmap per joint.

`PoseResNet("resnet18", num_joints=16)` is the default; `deconv_filters=(512, 512, 512)` with
`sigmoid_output=True` reproduces the seed's head. The output stride is 32 / 2**len(deconv_filters).
`build_model(**arch)` rebuilds a model from the `arch` dict its checkpoints store.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision

from common.heatmaps import HeatmapCodec
from common.keypoints import COCO17, LIP16
from common.pretrained import resolve_pretrained
from common.runs import require

MODEL_NAME = "simple_baseline"
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class PoseResNet(nn.Module):
    def __init__(self, backbone="resnet18", num_joints=16, deconv_filters=(256, 256, 256),
                 deconv_kernel=4, sigmoid_output=False):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        self.arch = {"backbone": backbone, "num_joints": int(num_joints),
                     "deconv_filters": [int(f) for f in deconv_filters],
                     "deconv_kernel": int(deconv_kernel), "sigmoid_output": bool(sigmoid_output)}

        resnet = getattr(torchvision.models, backbone)(weights=None)
        # Same child names as torchvision's ResNet so its ImageNet state dict loads as is.
        self.backbone = nn.Sequential(OrderedDict(
            (name, getattr(resnet, name))
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")))
        backbone_channels = resnet.fc.in_features  # 512 for resnet18/34, 2048 for the bottleneck ones

        self.deconv_layers = self._make_deconv_layers(backbone_channels, deconv_filters, deconv_kernel)
        head_channels = deconv_filters[-1] if deconv_filters else backbone_channels
        self.final_layer = nn.Conv2d(head_channels, num_joints, kernel_size=1)
        # Paper init for the head; the backbone keeps torchvision's init (or ImageNet weights).
        nn.init.normal_(self.final_layer.weight, std=0.001)
        nn.init.zeros_(self.final_layer.bias)
        # The paper's heatmaps are linear; the seed squashed them with a sigmoid.
        self.output_activation = nn.Sigmoid() if sigmoid_output else nn.Identity()

    @staticmethod
    def _make_deconv_layers(in_channels, filters, kernel):
        # kernel 4 -> padding 1, kernel 3 -> padding 1 + output_padding 1, kernel 2 -> 0/0:
        # each exactly doubles the spatial size.
        padding, output_padding = {4: (1, 0), 3: (1, 1), 2: (0, 0)}[kernel]
        layers = []
        for out_channels in filters:
            deconv = nn.ConvTranspose2d(in_channels, out_channels, kernel, stride=2, padding=padding,
                                        output_padding=output_padding, bias=False)
            bn = nn.BatchNorm2d(out_channels)
            nn.init.normal_(deconv.weight, std=0.001)
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
            layers += [deconv, bn, nn.ReLU(inplace=True)]
            in_channels = out_channels
        return nn.Sequential(*layers)

    @property
    def stride(self):
        return 32 // 2 ** len(self.arch["deconv_filters"])

    def forward(self, images):
        features = self.backbone(images)
        return self.output_activation(self.final_layer(self.deconv_layers(features)))

    def load_backbone_state_dict(self, state_dict):
        """Load an ImageNet ResNet state dict (torchvision key names; fc.* is ignored), or the
        backbone part of one of our own checkpoints (keys `backbone.*`)."""
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        if any(k.startswith("backbone.") for k in state_dict):
            state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        missing, unexpected = self.backbone.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"ImageNet weights do not fit {self.arch['backbone']}: "
                             f"{len(missing)} missing keys (e.g. {missing[:2]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")


def imagenet_weights_url(backbone):
    """torchvision's ImageNet-1k (V1, as in the paper) weights for a backbone; the file name
    (e.g. resnet18-f37072fd.pth) is what `--pretrained imagenet` looks for in the torch hub cache."""
    return torchvision.models.get_model_weights(backbone).IMAGENET1K_V1.url


def build_model(**arch) -> PoseResNet:
    """PoseResNet from the `arch` dict its checkpoints store (backbone weights: load_pretrained_backbone)."""
    return PoseResNet(**arch)


def load_pretrained_backbone(model: PoseResNet, spec) -> None:
    """The shared `--pretrained none|imagenet|PATH` policy applied to the model's ResNet."""
    url = imagenet_weights_url(model.arch["backbone"])
    resolve_pretrained(spec, filename=url.rsplit("/", 1)[-1], url=url, load_fn=model.load_backbone_state_dict)


def architecture_mismatch(saved_arch, wanted_arch):
    """One line naming what differs between two `PoseResNet.arch` dicts, or '' when they match."""
    diffs = [f"{key}: checkpoint {saved_arch.get(key)!r} vs requested {wanted_arch.get(key)!r}"
             for key in wanted_arch if saved_arch.get(key) != wanted_arch.get(key)]
    return "; ".join(diffs)


def upgrade_checkpoint(checkpoint, path) -> dict:
    """A checkpoint written before arch and settings had their own keys: both were in its "config"."""
    config = require(checkpoint, "config", path)
    arch = require(config, "arch", path)
    width, height = require(config, "input_size", path)
    stride = 32 // 2 ** len(arch["deconv_filters"])
    data_format = require(config, "format", path)
    codec = HeatmapCodec((width, height), (width // stride, height // stride), require(config, "sigma", path))
    layout = COCO17 if data_format == "coco" else LIP16
    settings = {"codec": codec.as_dict(), "format": data_format, "layout": layout.as_dict()}
    return {**checkpoint, "arch": arch, "settings": settings}


if __name__ == "__main__":
    with torch.device("meta"):
        for name in BACKBONES:
            model = PoseResNet(name)
            print(f"{name} + 3x256, 16 joints: {sum(p.numel() for p in model.parameters()):,} parameters")
