"""Export an rtpe student checkpoint to ONNX (dynamic batch, height and width; BatchNorm folded; the color
conversion is part of the graph), check onnxruntime against torch on random and real inputs (max |diff| <= 1e-4),
and time both side by side (common/export.py has the steps).

    python rtpe/export.py                           # newest checkpoint -> <checkpoint>.onnx beside it
    python rtpe/export.py --checkpoint CKPT --input photos/ --frames 0
    python rtpe/infer.py --backend onnxruntime      # infer.py's pipeline on the exported file
Input `image` (B,3,H,W) ImageNet-normalized RGB; outputs (B,1,H/4,W/4) segmentation logits and (B,K+1,H/4,W/4):
K heatmap logits and one tag channel.
"""
import sys

from common.data import exit_on_bad_input
from common.export import export_main, export_parser
from rtpe.infer import MODEL_NAME, Predictor, builtin_inputs


def main(args):
    return export_main(args, Predictor, MODEL_NAME, "python rtpe/train.py", builtin_inputs, dynamic_size=True,
                       fold=False, channels_last=False)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main, export_parser(__doc__).parse_args()))
