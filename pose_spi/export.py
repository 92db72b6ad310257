"""Export a pose_spi checkpoint to ONNX (dynamic batch; the 64x64 input size is part of the architecture;
BatchNorm folded), check onnxruntime against torch on random and real inputs (max |diff| <= 1e-4), and time both
side by side (common/export.py has the steps).

    python pose_spi/export.py                           # newest checkpoint -> <checkpoint>.onnx beside it
    python pose_spi/export.py --checkpoint CKPT --input photos/ --frames 0
    python pose_spi/infer.py --backend onnxruntime      # infer.py's pipeline on the exported file
"""
import sys

from common.data import exit_on_bad_input
from common.export import export_main, export_parser
from pose_spi.infer import MODEL_NAMES, Predictor, builtin_inputs


def main(args):
    return export_main(args, Predictor, MODEL_NAMES, "python pose_spi/train.py", builtin_inputs, dynamic_size=False)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main, export_parser(__doc__).parse_args()))
