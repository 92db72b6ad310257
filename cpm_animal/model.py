"""Convolutional Pose Machines (Wei et al., CVPR 2016) as used by the seed "Animal Pose Estimation".

`CPM(CPMConfig(...))` returns one heatmap stack per stage, shape (stages, B, K, h, w), every stage
supervised. `SIZES["original"]` is the seed network exactly (40,205,052 parameters, 368 -> 45x45);
`SIZES["small"]` is the CPU size trained by default. Everything else is a config field.
`build_model(**arch)` rebuilds a model from the `arch` dict (the CPMConfig fields) its checkpoints store.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from common.heatmaps import HeatmapCodec
from common.keypoints import get_layout, layout_from_coco_category
from common.runs import require

MODEL_NAME = "cpm_animal"
NORMS = ("none", "batch", "group", "layer")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}
DROPOUT_PLACES = ("features", "output")


@dataclass(frozen=True)
class CPMConfig:
    num_keypoints: int = 16
    input_size: tuple[int, int] = (368, 368)  # (W, H); the "layer" norm shapes are derived from it
    stages: int = 7
    trunk_channels: int = 128
    trunk_kernel: int = 9
    trunk_blocks: int = 3           # conv + activation (+ pool) blocks per trunk
    trunk_pools: int = 3            # the first `trunk_pools` blocks end in a 3x3/2 max-pool
    stage1_own_trunk: bool = True   # the seed: stage 1 has its own trunk; False: it reads the shared one
    stage1_features: int = 32       # stage 1: conv 5x5 trunk -> 32, conv 9x9 -> 512, 1x1 512 -> 512
    stage1_channels: int = 512
    stage1_kernel: int = 9
    stage_features: int = 64        # later stages: conv 5x5 on the shared trunk
    stage_channels: int = 128
    stage_kernel: int = 11
    stage_convs: int = 3            # large-kernel convs per later stage
    activation: str = "gelu"
    norm_layer: str = "layer"       # none | batch | group | layer
    group_norm_groups: int = 8
    drop_rate: float = 0.0
    dropout_on: str = "features"    # features (trunk outputs) | output (each stage's heatmaps, the seed)
    center_map: bool = False        # CPM center-map Gaussian fed to every later stage
    center_sigma: float = 21.0      # input pixels, as in the CPM release
    background: bool = False        # one extra output channel: background = 1 - max |target|

    def __post_init__(self):
        if self.norm_layer not in NORMS:
            raise ValueError(f"model.norm_layer must be one of {NORMS}, got {self.norm_layer!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        if self.dropout_on not in DROPOUT_PLACES:
            raise ValueError(f"model.dropout_on must be one of {DROPOUT_PLACES}, got {self.dropout_on!r}")
        if self.stages < 1 or self.trunk_pools > self.trunk_blocks:
            raise ValueError("model.stages must be >= 1 and model.trunk_pools <= model.trunk_blocks")

    @property
    def out_channels(self) -> int:
        return self.num_keypoints + int(self.background)


# Architecture sizes (the YAML's model.size); every field can still be set on its own.
SIZES = {
    # The seed's network: GELU, LayerNorm on the input and in every later stage, 7 stages.
    "original": CPMConfig(),
    # CPU size: 96 px input, two pools (23x23 heatmaps), one trunk shared by all 3 stages, 5x5 kernels.
    "small": CPMConfig(input_size=(96, 96), stages=3, trunk_channels=32, trunk_kernel=5, trunk_pools=2,
                       stage1_own_trunk=False, stage1_features=32, stage1_channels=64, stage1_kernel=5,
                       stage_features=32, stage_channels=32, stage_kernel=5, norm_layer="batch",
                       activation="relu"),
    # For tests: a few thousand parameters.
    "tiny": CPMConfig(input_size=(64, 64), stages=2, trunk_channels=8, trunk_kernel=3, trunk_pools=2,
                      stage1_features=8, stage1_channels=8, stage1_kernel=3, stage_features=8,
                      stage_channels=8, stage_kernel=3),
}


def config_from_dict(options: dict) -> CPMConfig:
    """Builds a CPMConfig from the YAML `model` group: `size` first, then any field overrides."""
    options = {key: value for key, value in options.items() if value is not None}  # null: the size's
    size = options.pop("size", "original")
    if size not in SIZES:
        raise ValueError(f"model.size must be one of {tuple(SIZES)}, got {size!r}")
    known = {f.name for f in fields(CPMConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; known: {sorted(known)}")
    if "input_size" in options:
        side = options["input_size"]
        options["input_size"] = (int(side), int(side)) if isinstance(side, int) else tuple(int(s) for s in side)
    return replace(SIZES[size], **options)


def pooled_size(length: int, pools: int) -> int:
    """Length after `pools` 3x3 stride-2 max-pools without padding (rounding down: 368 -> 45)."""
    for _ in range(pools):
        length = (length - 3) // 2 + 1
    return length


def heatmap_size(config: CPMConfig) -> tuple[int, int]:
    """(W, H) of the output heatmaps for the configured input size."""
    width, height = config.input_size
    return pooled_size(width, config.trunk_pools), pooled_size(height, config.trunk_pools)


def heatmap_stride(config: CPMConfig) -> tuple[int, float]:
    """(stride, offset): heatmap pixel j is centered on input pixel stride * j + offset.

    An unpadded 3x3/2 pool puts output j on input 2j + 1; stacking n of them gives 2^n j + 2^n - 1.
    """
    stride = 2 ** config.trunk_pools
    return stride, float(stride - 1)


def input_to_heatmap(xy, config: CPMConfig):
    stride, offset = heatmap_stride(config)
    return (xy - offset) / stride


def heatmap_to_input(xy, config: CPMConfig):
    stride, offset = heatmap_stride(config)
    return xy * stride + offset


def make_norm(kind: str, channels: int, size_hw: tuple[int, int], groups: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, groups), channels)
    # The seed's LayerNorm((H, W)): normalises each channel over its pixels, one affine weight per pixel.
    return nn.LayerNorm(tuple(size_hw))


def conv(in_ch: int, out_ch: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)


class Trunk(nn.Sequential):
    """Image features: input norm, then conv/activation/pool blocks, then optional feature dropout."""

    def __init__(self, cfg: CPMConfig):
        width, height = cfg.input_size
        layers = [make_norm(cfg.norm_layer, 3, (height, width), cfg.group_norm_groups)]
        in_ch = 3
        for block in range(cfg.trunk_blocks):
            layers += [conv(in_ch, cfg.trunk_channels, cfg.trunk_kernel), ACTIVATIONS[cfg.activation]()]
            if block < cfg.trunk_pools:
                layers.append(nn.MaxPool2d(3, 2))
            in_ch = cfg.trunk_channels
        if cfg.dropout_on == "features" and cfg.drop_rate > 0:
            layers.append(nn.Dropout2d(cfg.drop_rate))
        super().__init__(*layers)


class FirstStage(nn.Sequential):
    """Stage 1 head on its own trunk: conv 5x5, conv 9x9, 1x1, 1x1 -> keypoint maps."""

    def __init__(self, cfg: CPMConfig):
        act = ACTIVATIONS[cfg.activation]
        super().__init__(
            conv(cfg.trunk_channels, cfg.stage1_features, 5), act(),
            conv(cfg.stage1_features, cfg.stage1_channels, cfg.stage1_kernel), act(),
            conv(cfg.stage1_channels, cfg.stage1_channels, 1), act(),
            conv(cfg.stage1_channels, cfg.out_channels, 1),
        )


class LaterStage(nn.Module):
    """Stage t >= 2: own 5x5 features of the shared trunk + previous maps (+ center map) -> refined maps."""

    def __init__(self, cfg: CPMConfig):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        self.features = nn.Sequential(conv(cfg.trunk_channels, cfg.stage_features, 5), act())
        in_ch = cfg.stage_features + cfg.out_channels + int(cfg.center_map)
        map_w, map_h = heatmap_size(cfg)
        self.norm = make_norm(cfg.norm_layer, in_ch, (map_h, map_w), cfg.group_norm_groups)
        layers = []
        for _ in range(cfg.stage_convs):
            layers += [conv(in_ch, cfg.stage_channels, cfg.stage_kernel), act()]
            in_ch = cfg.stage_channels
        layers += [conv(in_ch, cfg.stage_channels, 1), act(), conv(cfg.stage_channels, cfg.out_channels, 1)]
        self.refine = nn.Sequential(*layers)

    def forward(self, shared_features, previous_maps, center_map=None):
        parts = [self.features(shared_features), previous_maps]
        if center_map is not None:
            parts.append(center_map)
        return self.refine(self.norm(torch.cat(parts, dim=1)))


class CPM(nn.Module):
    def __init__(self, config: CPMConfig | None = None):
        super().__init__()
        self.config = cfg = config or SIZES["original"]
        self.arch = arch_of(cfg)
        self.stage1_trunk = Trunk(cfg) if cfg.stage1_own_trunk else None
        self.shared_trunk = Trunk(cfg) if cfg.stages > 1 or not cfg.stage1_own_trunk else None
        self.stage1 = FirstStage(cfg)
        self.later_stages = nn.ModuleList(LaterStage(cfg) for _ in range(cfg.stages - 1))
        self.output_dropout = (nn.Dropout(cfg.drop_rate) if cfg.dropout_on == "output" and cfg.drop_rate > 0
                               else nn.Identity())
        # Each stage's last 1x1 starts near zero so the first MSE steps are not dominated by
        # random heatmaps (the targets are zero almost everywhere).
        for head in [self.stage1[-1]] + [stage.refine[-1] for stage in self.later_stages]:
            nn.init.normal_(head.weight, std=0.001)
            nn.init.zeros_(head.bias)

    def make_center_map(self, batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """The CPM center map: a Gaussian at the middle of the crop, in heatmap pixels."""
        stride = self.config.input_size[0] / max(heatmap_size(self.config)[0], 1)
        sigma = self.config.center_sigma / stride
        ys = torch.arange(height, dtype=like.dtype, device=like.device) - (height - 1) / 2
        xs = torch.arange(width, dtype=like.dtype, device=like.device) - (width - 1) / 2
        gauss = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma ** 2))
        return gauss.expand(batch, 1, height, width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.norm_layer == "layer" and tuple(images.shape[-2:]) != tuple(reversed(self.config.input_size)):
            raise ValueError(f"norm_layer=layer fixes the input to {self.config.input_size} (W, H); "
                             f"got {tuple(images.shape[-1:-3:-1])}")
        shared = self.shared_trunk(images) if self.shared_trunk is not None else None
        maps = self.stage1(self.stage1_trunk(images) if self.stage1_trunk is not None else shared)
        outputs = [self.output_dropout(maps)]
        if self.config.stages > 1:
            center = (self.make_center_map(images.shape[0], shared.shape[2], shared.shape[3], shared)
                      if self.config.center_map else None)
            for stage in self.later_stages:
                maps = stage(shared, maps, center)
                outputs.append(self.output_dropout(maps))
        return torch.stack(outputs)


def arch_of(config: CPMConfig) -> dict:
    """The CPMConfig as plain types: what checkpoints store and build_model takes."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def build_model(**arch) -> CPM:
    return CPM(CPMConfig(**{**arch, "input_size": tuple(arch["input_size"])}))


def target_codec(config: CPMConfig, sigma: float) -> HeatmapCodec:
    """The targets' owner: Gaussians of `sigma` heatmap pixels at the exact sub-pixel position on the
    model's heatmaps (input_to_heatmap maps input pixels onto them)."""
    return HeatmapCodec(tuple(config.input_size), heatmap_size(config), sigma, center="subpixel")


def layout_named(name: str, num_keypoints: int):
    """The dataset.layout of a preset: a known layout's name, or from_file (names unknown here)."""
    if name != "from_file":
        return get_layout(name)
    return layout_from_coco_category({"keypoints": [str(k) for k in range(num_keypoints)]})


def upgrade_checkpoint(checkpoint, path) -> dict:
    """A checkpoint written before arch and settings had their own keys: the model was "cpm_model" in its
    config (with the British center_map spelling), the YAML "cpm_config", the mean shape "mean_shape"."""
    config = require(checkpoint, "config", path)
    arch = {("center" + k[len("centre"):] if k.startswith("centre") else k): v
            for k, v in require(config, "cpm_model", path).items()}
    preset = require(config, "cpm_config", path)
    preset["model"] = {("size" if k == "preset" else k): v for k, v in preset["model"].items()}
    preset["model"] = {("center_map" if k == "centre_map" else k): v for k, v in preset["model"].items()}
    model_config = CPMConfig(**{**arch, "input_size": tuple(arch["input_size"])})
    dataset = preset["dataset"]
    settings = {"codec": target_codec(model_config, dataset["sigma"]).as_dict(), "preset": preset,
                "layout": layout_named(dataset["layout"], model_config.num_keypoints).as_dict(),
                "mean_shape": require(config, "mean_shape", path)}
    return {**checkpoint, "arch": arch, "settings": settings}
