"""Export a higher_hrnet checkpoint to ONNX (dynamic batch, height and width; BatchNorm folded), check
onnxruntime against torch on random and real inputs (max |diff| <= 1e-4), and time both side by side
(common/export.py has the steps). Works for our checkpoints and the official ones.

    python higher_hrnet/export.py                           # newest checkpoint -> <checkpoint>.onnx beside it
    python higher_hrnet/export.py --checkpoint CKPT --input photos/ --frames 0
    python higher_hrnet/infer.py --backend onnxruntime      # infer.py's pipeline on the exported file
"""
import sys

from common.data import exit_on_bad_input
from common.export import export_main, export_parser
from higher_hrnet.infer import MODEL_NAME, Predictor, builtin_inputs


def main(args):
    return export_main(args, Predictor, MODEL_NAME, "python higher_hrnet/train.py", builtin_inputs, dynamic_size=True,
                       plain_network=True)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main, export_parser(__doc__).parse_args()))