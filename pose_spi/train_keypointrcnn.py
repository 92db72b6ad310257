"""Train Pose-SPI with the EfficientNet-b0 head (the seed's `train_keypointrcnn.py`) through the shared loop.

    python pose_spi/train_keypointrcnn.py                           # built-in data, from scratch, default preset
    python pose_spi/train_keypointrcnn.py --pretrained imagenet     # efficientnet-pytorch's b0 weights (cache or download)
    python pose_spi/train_keypointrcnn.py --preset seed --encoder conv   # the seed's recipe: SGD 1e-4, batch 4, L1
Same data, evaluation and flags as pose_spi/train.py; `--loss smooth_l1` is the seed's other choice.
"""
import sys

from pose_spi.train import KEYPOINTRCNN_PRESETS, main, parse_args

MODEL_NAME = "pose_spi_keypointrcnn"
EFFICIENTNET_B0_FILE = "efficientnet-b0-355c32eb.pth"  # efficientnet-pytorch's release file name


def load_pretrained_trunk(model, spec):
    """The shared --pretrained policy for the EfficientNet trunk: none | imagenet | PATH.

    An efficientnet-pytorch state dict (keys `_conv_stem.*`, `_bn0.*`, `_blocks.N.*`) fills the trunk's stem
    and its first blocks (the rest of b0 is not built); a Pose-SPI checkpoint fills the whole model.
    """
    from common.pretrained import resolve_pretrained

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

    url = None
    if str(spec).lower() == "imagenet":
        from efficientnet_pytorch.utils import url_map
        url = url_map["efficientnet-b0"]
    return resolve_pretrained(spec, filename=EFFICIENTNET_B0_FILE, url=url, load_fn=load)


if __name__ == "__main__":
    from common.data import exit_on_bad_input

    exit_on_bad_input(main, parse_args(KEYPOINTRCNN_PRESETS, "efficientnet", __doc__), model_name=MODEL_NAME)
