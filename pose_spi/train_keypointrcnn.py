"""Train Pose-SPI with the EfficientNet-b0 head (the seed's `train_keypointrcnn.py`).

    python pose_spi/train_keypointrcnn.py                           # built-in data, from scratch, cpu preset
    python pose_spi/train_keypointrcnn.py --pretrained imagenet     # efficientnet-pytorch's b0 weights (cache or download)
    python pose_spi/train_keypointrcnn.py --preset seed --encoder conv   # the seed's recipe: SGD 1e-4, batch 4, L1
Same data, evaluation and flags as pose_spi/train.py; `--loss smooth_l1` is the seed's other choice.
"""
from common.data import exit_on_bad_input
from pose_spi.model import EFFICIENTNET_MODEL_NAME
from pose_spi.train import KEYPOINTRCNN_PRESETS, main, parse_args

if __name__ == "__main__":
    args = parse_args(KEYPOINTRCNN_PRESETS, "efficientnet", __doc__)
    exit_on_bad_input(main, args, model_name=EFFICIENTNET_MODEL_NAME)
