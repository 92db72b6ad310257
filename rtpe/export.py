"""Export the rtpe student to ONNX (dynamic height/width, BatchNorm folded) and check onnxruntime parity.

    python rtpe/export.py                                  # newest rtpe checkpoint -> outputs/rtpe/export/
    python rtpe/export.py --checkpoint best.pt --onnx student.onnx

onnx, onnxscript and onnxruntime are an optional extra (`pip install -e .[onnx]`). Input `image`
(1,3,H,W) ImageNet-normalized RGB; outputs `segmentation` (1,1,H/4,W/4) logits and `keypoints`
(1,K+1,H/4,W/4): K heatmap logits and one tag channel. The color conversion is part of the graph.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from common.data import exit_on_bad_input
from common.runs import checkpoint_or_exit, model_from_checkpoint, output_dirs
from higher_hrnet.inference import fold_batchnorm
from rtpe.model import MODEL_NAME, build_model, upgrade_checkpoint


def export_onnx(model, path, example_size=256, opset=18):
    """Fold BN into a copy of `model` and write it to `path` with dynamic batch, height and width."""
    try:
        import onnx  # noqa: F401  (optional dependency; the exporter needs it)
    except ImportError:
        raise SystemExit("ONNX export needs the optional extra: pip install onnx onnxscript onnxruntime") from None
    folded = fold_batchnorm(copy.deepcopy(model).cpu().eval())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(1, 3, example_size, example_size)
    height, width = torch.export.Dim("height", min=32, max=4096), torch.export.Dim("width", min=32, max=4096)
    torch.onnx.export(folded, (example,), str(path), input_names=["image"],
                      output_names=["segmentation", "keypoints"], opset_version=opset, dynamo=True,
                      dynamic_shapes={"x": {2: height, 3: width}}, verbose=False)
    return path


def onnx_parity(model, path, sizes=((256, 256), (320, 224)), seed=0):
    """Largest absolute difference between torch (unfolded, eval) and onnxruntime outputs over `sizes`."""
    import onnxruntime   # optional dependency

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    model = model.eval()
    worst = 0.0
    for height, width in sizes:
        x = torch.randn(1, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = [t.numpy() for t in model(x)]
        got = session.run(None, {"image": x.numpy()})
        for e, g in zip(expected, got):
            if e.shape != g.shape:
                raise AssertionError(f"{path}: output shape {g.shape} != torch {e.shape} at {height}x{width}")
            worst = max(worst, float(np.abs(e - g).max()))
    return worst


def main(args):
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python rtpe/train.py", args.out)
    model, _ = model_from_checkpoint(checkpoint, build_model, MODEL_NAME, upgrade_checkpoint)
    out = Path(args.onnx) if args.onnx else (output_dirs(MODEL_NAME, "export", args.out)["outputs"]
                                             / f"rtpe_{model.size}_{model.color}.onnx")
    export_onnx(model, out, args.example_size)
    try:
        worst = onnx_parity(model, out)
        print(f"onnxruntime parity: max |torch - onnx| = {worst:.2e} at 256x256 and 320x224")
    except ImportError:
        print("onnxruntime is not installed: parity not checked (pip install onnxruntime)")
    print(f"exported {checkpoint} to {out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="rtpe checkpoint (default: the newest)")
    p.add_argument("--onnx", default=None, help="output file (default: outputs/rtpe/export/rtpe_<size>_<color>.onnx)")
    p.add_argument("--example-size", type=int, default=256, help="example input side for tracing (default: 256)")
    p.add_argument("--out", default=None, help="output root (default: $POSE_OUTPUT_ROOT, else .)")
    return p.parse_args(argv)


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
