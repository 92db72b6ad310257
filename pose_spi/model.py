"""Pose-SPI model: a simulated single-pixel measurement encoder, an FSRCNN upsampler and a keypoint head.

    encoder (SxS image -> measurements -> FC -> 1x(S/2)x(S/2)) -> FSRCNN (-> 1xSxS) -> head (-> 3K)

The head is the seed's simple CNN (`train.py`) or an EfficientNet-b0 trunk cut at `reduction_4`
(`train_keypointrcnn.py`). Every size follows `input_size`; only the layers a configuration uses exist.
`build_model(**arch)` rebuilds a model from the `arch` dict its checkpoints store.
"""
import math
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.utils import url_map

from common.keypoints import COCO_SIGMAS, layout_from_coco_category, make_layout
from common.pretrained import resolve_pretrained
from common.runs import at_least, require

MODEL_NAME = "pose_spi"                              # runs of train.py
EFFICIENTNET_MODEL_NAME = "pose_spi_keypointrcnn"    # runs of train_keypointrcnn.py (the seed's script name)
EFFICIENTNET_B0_FILE = "efficientnet-b0-355c32eb.pth"  # efficientnet-pytorch's release file name
ARCH_KEYS = ("input_size", "num_keypoints", "head", "encoder", "reduce", "measurements", "patterns")
ENCODERS = ("product", "conv", "patterns")
PATTERN_KINDS = ("learned", "hadamard", "random")
HEADS = ("simple", "efficientnet")
# Pose-SPI's 13 points: COCO without eyes and ears, with the toy set's own skeleton (head to both shoulders,
# shoulders to hips). Its seed evaluated with the first 13 COCO sigmas (nose, eyes, ears, ...), which belong
# to other points; here each point keeps its own sigma.
POSE_SPI13 = make_layout(
    "pose_spi13",
    ["nose", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
     "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"],
    [(0, 1), (0, 2), (1, 2), (1, 3), (1, 7), (2, 4), (2, 8), (3, 5), (4, 6), (7, 9), (7, 8), (8, 10),
     (9, 11), (10, 12)],
    COCO_SIGMAS)


def hadamard_patterns(num_pixels, num_patterns):
    """First `num_patterns` rows of the num_pixels x num_pixels Hadamard matrix in sequency order (+1/-1).

    Row k of the sequency-ordered (Walsh) matrix is row bitreverse(gray(k)) of Sylvester's natural-order
    matrix, whose entry (i, j) is (-1)^popcount(i & j); row k then changes sign exactly k times.
    """
    if num_pixels < 1 or num_pixels & (num_pixels - 1):
        raise ValueError(f"Hadamard patterns need a power-of-two pixel count (S*S); got {num_pixels}")
    if not 1 <= num_patterns <= num_pixels:
        raise ValueError(f"--measurements must lie in 1..{num_pixels} for Hadamard patterns; got {num_patterns}")
    bits = num_pixels.bit_length() - 1
    sequency = np.arange(num_patterns, dtype=np.int64)
    gray = sequency ^ (sequency >> 1)
    natural = np.zeros_like(gray)
    for b in range(bits):  # bit reversal of the Gray code
        natural |= ((gray >> b) & 1) << (bits - 1 - b)
    columns = np.arange(num_pixels, dtype=np.int64)
    rows = np.empty((num_patterns, num_pixels), dtype=np.float32)
    for start in range(0, num_patterns, 256):  # chunks keep memory at 256 x S^2 for large S
        parity = np.bitwise_count(natural[start:start + 256, None] & columns[None, :]) & 1
        rows[start:start + 256] = 1.0 - 2.0 * parity
    return rows


def count_sign_changes(rows):
    """Sign changes along each row of a +1/-1 matrix (the sequency of a Walsh row)."""
    rows = np.asarray(rows)
    return (rows[:, 1:] != rows[:, :-1]).sum(axis=1)


class MeasurementEncoder(nn.Module):
    """Simulated single-pixel camera: measure the 1xSxS image, then an FC layer maps them to 1x(S/2)x(S/2).

    product : y = mask * x, one learnable weight per pixel (S^2 "measurements"; seed's default).
    conv    : y = one 1->1 conv with an SxS kernel (padding S/2), resized back to SxS (seed's other mode).
    patterns: y = Phi x, M patterns of SxS pixels, `learned`, fixed `hadamard` (sequency order) or fixed
              `random` (+1/-1); each scaled by 1/S so Hadamard rows are orthonormal.
    reduce  : 2x2 max-pool on the product/conv measurement map (the seed's "fewer measurements": S^2/4).
    """

    def __init__(self, input_size=64, mode="product", reduce=False, measurements=None, patterns="learned",
                 pattern_seed=0):
        super().__init__()
        if mode not in ENCODERS:
            raise ValueError(f"unknown encoder {mode!r}; choose one of {', '.join(ENCODERS)}")
        if input_size % 4:
            raise ValueError(f"--input-size must be a multiple of 4; got {input_size}")
        self.input_size, self.mode, self.reduce = input_size, mode, reduce
        num_pixels = input_size * input_size
        if mode == "product":
            self.mask = nn.Parameter(torch.empty(1, 1, input_size, input_size).uniform_(0.1, 1.0))
            num_measurements = num_pixels
        elif mode == "conv":
            self.conv = nn.Conv2d(1, 1, input_size, padding=input_size // 2)
            num_measurements = num_pixels
        else:
            if reduce:
                raise ValueError("--reduce applies to the product/conv encoders; use --measurements M with patterns")
            if patterns not in PATTERN_KINDS:
                raise ValueError(f"unknown --patterns {patterns!r}; choose one of {', '.join(PATTERN_KINDS)}")
            num_measurements = measurements or num_pixels // 4
            if not 1 <= num_measurements <= num_pixels:
                raise ValueError(f"--measurements must lie in 1..{num_pixels}; got {num_measurements}")
            scale = 1.0 / input_size  # 1/sqrt(S^2): orthonormal rows for Hadamard, unit-norm on average otherwise
            if patterns == "hadamard":
                phi = torch.from_numpy(hadamard_patterns(num_pixels, num_measurements)) * scale
            else:
                gen = torch.Generator().manual_seed(pattern_seed)
                phi = (torch.randint(0, 2, (num_measurements, num_pixels), generator=gen) * 2 - 1).float() * scale
            if patterns == "learned":
                self.phi = nn.Parameter(phi)
            else:   # a real camera's patterns are fixed: rebuilt from the arch, not stored in checkpoints
                self.register_buffer("phi", phi, persistent=False)
                # files written before issue 19 hold them: drop them on load
                self.register_load_state_dict_pre_hook(lambda _, state, prefix, *rest: state.pop(prefix + "phi", 0))
        if reduce:
            num_measurements //= 4
        self.num_measurements = num_measurements
        half = input_size // 2
        self.fc = nn.Linear(num_measurements, half * half)

    @torch.no_grad()
    def init_as_downsampling(self):
        """Start the FC layer as a reconstruction: measurements -> the image 2x2-average-pooled to (S/2)^2.

        With PyTorch's default init the FC layer maps measurements to noise, and the FSRCNN and head see no
        image until it has learned one; started as a (pseudo-)inverse of the measurement, the whole net trains
        from a meaningful picture. product: each pixel's mask weight is divided back out; conv: the kernel
        starts as a centerd delta (y = x up to the resize); reduce: the max-pooled map is already (S/2)^2, so
        the FC starts as a diagonal that divides out each 2x2 block's largest mask weight; patterns: the
        pseudo-inverse of Phi, then the 2x2 average.
        """
        s, half = self.input_size, self.input_size // 2
        if self.mode == "conv":
            self.conv.weight.zero_()
            self.conv.weight[0, 0, s // 2, s // 2] = 1.0
            self.conv.bias.zero_()
        if self.reduce:  # on a smooth image the max-pooled product is x times the block's largest mask weight
            scale = 1.0 / F.max_pool2d(self.mask, 2).flatten() if self.mode == "product" else torch.ones(half * half)
            self.fc.weight.copy_(torch.diag(scale))
        else:
            # the 2x2 average pool as a (S/2)^2 x S^2 matrix: the Kronecker square of the 1-D pair average
            pair_average = torch.kron(torch.eye(half), torch.full((1, 2), 0.5))
            pool = torch.kron(pair_average, pair_average)
            if self.mode == "product":
                pool = pool / self.mask.flatten()  # divide each pixel's mask weight back out
            elif self.mode == "patterns":
                pool = pool @ torch.linalg.pinv(self.phi.double()).float()  # (S/2)^2 x M
            self.fc.weight.copy_(pool)
        self.fc.bias.zero_()

    def forward(self, x):
        s = self.input_size
        if self.mode == "product":
            y = x * self.mask
        elif self.mode == "conv":
            y = F.interpolate(self.conv(x), size=(s, s), mode="bilinear", align_corners=False)
        else:
            y = x.flatten(1) @ self.phi.t()
        if self.reduce:
            y = F.max_pool2d(y, 2)
        y = self.fc(y.flatten(1))
        return y.view(-1, 1, s // 2, s // 2)


def conv_bn_relu(cin, cout, kernel):
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FSRCNN(nn.Module):
    """The seed's FSRCNN-style upsampler: 1x(S/2)x(S/2) -> 1xSxS (feature 56, shrink 12, 3 mapping layers)."""

    def __init__(self, output_size=64, features=56, shrink=12, mapping_layers=3):
        super().__init__()
        self.output_size = output_size
        layers = conv_bn_relu(1, features, 5) + conv_bn_relu(features, shrink, 3)
        for _ in range(mapping_layers):
            layers += conv_bn_relu(shrink, shrink, 3)
        self.body = nn.Sequential(*layers)
        self.reconstruct = nn.Conv2d(shrink, 1, 3, padding=1)

    def forward(self, x):
        x = self.body(x)
        x = F.interpolate(x, size=(self.output_size, self.output_size), mode="bilinear", align_corners=True)
        return self.reconstruct(x)


class SimpleHead(nn.Module):
    """The seed's simple head: two conv+avgpool stages, then FC 128*(S/4)^2 -> 512 -> 3K."""

    def __init__(self, input_size=64, num_keypoints=13):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2))
        quarter = input_size // 4
        self.fc1 = nn.Linear(128 * quarter * quarter, 512)
        self.fc2 = nn.Linear(512, 3 * num_keypoints)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def efficientnet_b0_trunk(input_size, endpoint=4):
    """EfficientNet-b0 (efficientnet-pytorch) stem + the blocks before its `reduction_<endpoint>` endpoint.

    efficientnet-pytorch records reduction_i just before the i-th stride-2 stage (the stem being the first
    reduction), so reduction_4 is the output of block 10 (112 channels, stride 16); later blocks are dropped.
    """
    # BN momentum 0.1 (PyTorch's default) instead of the TF port's 0.01: with 0.01 the running statistics of a
    # short CPU run still mostly hold their initial values, and eval-mode predictions are far off
    net = EfficientNet.from_name("efficientnet-b0", image_size=input_size, batch_norm_momentum=0.9)
    strided = [i for i, b in enumerate(net._blocks) if max(np.atleast_1d(b._block_args.stride)) > 1]
    cut = strided[endpoint - 1]  # first block of the next stage
    trunk = nn.Module()
    trunk.conv_stem, trunk.bn0, trunk.swish = net._conv_stem, net._bn0, net._swish
    trunk.blocks = nn.ModuleList(net._blocks[:cut])
    trunk.drop_connect_rate = net._global_params.drop_connect_rate
    trunk.total_blocks = len(net._blocks)  # keep the full net's drop-connect schedule
    trunk.out_channels = net._blocks[cut - 1]._block_args.output_filters
    return trunk


class EfficientNetHead(nn.Module):
    """The seed's `train_keypointrcnn.py` head: sigmoid, 1x1 conv 1->3, EfficientNet-b0 to reduction_4,
    1x1 conv 112->8, FC 8*(S/16)^2 -> 3K."""

    def __init__(self, input_size=64, num_keypoints=13):
        super().__init__()
        self.to_rgb = nn.Conv2d(1, 3, 1)
        self.trunk = efficientnet_b0_trunk(input_size)
        self.squeeze = nn.Conv2d(self.trunk.out_channels, 8, 1)
        side = math.ceil(input_size / 16)  # 'same' padding: each stride-2 stage rounds up
        self.fc = nn.Linear(8 * side * side, 3 * num_keypoints)

    def forward(self, x):
        x = self.to_rgb(torch.sigmoid(x))
        t = self.trunk
        x = t.swish(t.bn0(t.conv_stem(x)))
        for idx, block in enumerate(t.blocks):
            rate = t.drop_connect_rate * idx / t.total_blocks if t.drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
        return self.fc(self.squeeze(x).flatten(1))


class PoseSPI(nn.Module):
    """Measurement encoder -> FSRCNN -> keypoint head; output (B, 3K) laid out as (x, y, v) per keypoint."""

    def __init__(self, input_size=64, num_keypoints=13, head="simple", encoder="product", reduce=False,
                 measurements=None, patterns="learned"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        self.arch = dict(input_size=input_size, num_keypoints=num_keypoints, head=head, encoder=encoder,
                         reduce=reduce, measurements=measurements, patterns=patterns)
        self.input_size, self.num_keypoints = input_size, num_keypoints
        self.encoder = MeasurementEncoder(input_size, encoder, reduce, measurements, patterns)
        self.fsrcnn = FSRCNN(input_size)
        self.head = SimpleHead(input_size, num_keypoints) if head == "simple" else EfficientNetHead(
            input_size, num_keypoints)

    def reconstruct(self, image):
        """The FSRCNN's image: what the keypoint head sees."""
        return self.fsrcnn(self.encoder(image))

    def forward(self, image):
        return self.head(self.reconstruct(image))


def build_model(**arch) -> PoseSPI:
    return PoseSPI(**arch)


def arch_from_args(args) -> dict:
    """The keywords of build_model from parsed command-line args."""
    return {key: getattr(args, key) for key in ARCH_KEYS}


def upgrade_checkpoint(checkpoint, path) -> dict:
    """A checkpoint written before arch and settings had their own keys: both were flags in its "config"."""
    config = require(checkpoint, "config", path)
    arch = {key: require(config, key, path) for key in ARCH_KEYS}
    num_keypoints = arch["num_keypoints"]
    layout = POSE_SPI13 if num_keypoints == 13 else generic_layout(num_keypoints)
    settings = {"raw_targets": require(config, "raw_targets", path), "layout": layout.as_dict()}
    return {**checkpoint, "arch": arch, "settings": settings}


def generic_layout(num_keypoints):
    """Keypoints without names (kp0, kp1, ...): what a file without a matching category gets."""
    return layout_from_coco_category({"name": "custom", "keypoints": [f"kp{i}" for i in range(num_keypoints)]})


def load_pretrained_trunk(model, spec):
    """The shared --pretrained policy for the EfficientNet trunk: none | imagenet | PATH.

    An efficientnet-pytorch state dict (keys `_conv_stem.*`, `_bn0.*`, `_blocks.N.*`) fills the trunk's stem
    and its first blocks (the rest of b0 is not built); a Pose-SPI checkpoint fills the whole model.
    """
    def load(state):
        if any(key.startswith("_conv_stem") for key in state):
            trunk = model.head.trunk
            renamed = {}
            for key, value in state.items():
                if key.startswith("_blocks."):
                    index = int(key.split(".")[1])
                    if index < len(trunk.blocks):
                        renamed["blocks." + key[len("_blocks."):]] = value
                elif key.startswith(("_conv_stem.", "_bn0.")):
                    renamed[key[1:]] = value  # "_bn0.weight" -> "bn0.weight"
            missing, _ = trunk.load_state_dict(renamed, strict=False)
            if missing:
                sys.exit(f"error: --pretrained {spec}: the EfficientNet-b0 file lacks {len(missing)} trunk "
                         f"tensors (first: {missing[0]})")
        else:
            model.load_state_dict(state)

    url = url_map["efficientnet-b0"] if str(spec).lower() == "imagenet" else None
    return resolve_pretrained(spec, filename=EFFICIENTNET_B0_FILE, url=url, load_fn=load)


def add_model_args(parser, head="simple", encoder="product"):
    g = parser.add_argument_group("model")
    g.add_argument("--input-size", type=int, default=64, help="side S of the square grayscale input (default 64)")
    g.add_argument("--num-keypoints", "--num_keypoints", type=int, default=None,
                   help="keypoints per person (default: from the annotation file)")
    g.add_argument("--head", choices=HEADS, default=head, help=f"keypoint head (default {head})")
    g.add_argument("--encoder", choices=ENCODERS, default=encoder,
                   help=f"measurement layer: the seed's product/conv, or explicit patterns (default {encoder})")
    g.add_argument("--reduce", action="store_true", help="2x2 max-pool the product/conv measurements (S^2/4)")
    g.add_argument("--measurements", type=at_least(1), default=None,
                   help="number M of SxS patterns with --encoder patterns (default S^2/4)")
    g.add_argument("--patterns", choices=PATTERN_KINDS, default="learned",
                   help="pattern kind with --encoder patterns (default learned)")
    return parser
