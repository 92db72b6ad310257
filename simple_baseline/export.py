"""Export a simple_baseline checkpoint to ONNX (dynamic batch; the crop size is part of the architecture;
BatchNorm folded), check onnxruntime against torch on random and real inputs (max |diff| <= 1e-4), and time both
side by side (common/export.py has the steps).

    python simple_baseline/export.py                           # newest checkpoint -> <checkpoint>.onnx beside it
    python simple_baseline/export.py --checkpoint CKPT --input photos/ --frames 0
    python simple_baseline/infer.py --backend onnxruntime      # infer.py's pipeline on the exported file
"""
import sys

from common.data import exit_on_bad_input
from common.export import export_main, export_parser
from simple_baseline.infer import MODEL_NAME, Predictor, builtin_inputs


def main(args):
    return export_main(args, Predictor, MODEL_NAME, "python simple_baseline/train.py", builtin_inputs,
                       dynamic_size=False)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main, export_parser(__doc__).parse_args()))
