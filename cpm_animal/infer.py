"""Run a CPM checkpoint on an image, a folder of images or a video: draw the skeleton, write a JSON.

    python cpm_animal/infer.py                         # newest checkpoint on 8 built-in val images
    python cpm_animal/infer.py cat.jpg --checkpoint checkpoints/cpm_animal/<run>/best.pt
    python cpm_animal/infer.py photos/ --box 10,20,300,200   # crop box x,y,w,h (default: the whole image)
    python cpm_animal/infer.py clip.mp4
CPM is single-animal and top-down: each image (or frame) is one crop around `--box`. Occluded keypoints
(negative heatmap peak in signed mode) are drawn in purple, visible ones in green.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from common.data import VIDEO_SUFFIXES, VideoWriter, exit_on_bad_input, iter_inputs, video_properties
from common.drawing import draw_keypoints
from common.geometry import box_to_center_scale, get_affine_transform, invert_affine, warp_image
from cpm_animal.dataset import MEAN, STD
from cpm_animal.eval import MODEL_NAME, decode_predictions, model_from_checkpoint


@torch.no_grad()
def predict_image(model, image, box=None, padding=1.0):
    """keypoints (K, 3) original pixels (x, y, score) and visible (K,) bool for one RGB image."""
    height, width = image.shape[:2]
    box = box if box is not None else (0, 0, width, height)
    in_w, in_h = model.config.input_size
    center, size = box_to_center_scale(box, in_w / in_h, padding)
    matrix = get_affine_transform(center, size, 0.0, (in_w, in_h))
    crop = warp_image(image, matrix, (in_w, in_h), border_value=tuple(int(v) for v in MEAN))
    tensor = torch.from_numpy(((crop.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1).copy())[None]
    device = next(model.parameters()).device
    stages = model(tensor.to(device))
    inverse = torch.from_numpy(invert_affine(matrix))[None].to(device)
    xy, score, visible = decode_predictions(stages[-1], model.config, inverse)
    keypoints = torch.cat([xy[0], score[0, :, None]], 1).cpu().numpy()
    return keypoints, visible[0].cpu().numpy()


def draw_prediction(image, keypoints, visible, skeleton):
    drawn = draw_keypoints(image, keypoints[:, :2], skeleton, color=(230, 40, 40), scores=False)
    radius = max(2, max(image.shape[:2]) // 90)
    for (x, y, _), seen in zip(keypoints, visible):
        colour = (40, 200, 60) if seen else (160, 40, 200)
        cv2.circle(drawn, (int(round(x)), int(round(y))), radius, colour, -1, cv2.LINE_AA)
    return drawn


def default_inputs(saved, out_root):
    """The first 8 images of the built-in val split the checkpoint was trained with."""
    from common.engine import output_dirs
    from cpm_animal.dataset import resolve_sources

    _, val_records, _ = resolve_sources(saved["cpm_config"], output_dirs(MODEL_NAME, "x", out_root)["data"] / MODEL_NAME)
    return [r["image"] for r in val_records[:8]]


def main(argv=None):
    from common.engine import add_common_args, checkpoint_or_exit, output_dirs
    from common.keypoints import get_layout

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default=None, help="image, folder or video (default: built-in val images)")
    parser.add_argument("--box", default=None, help="crop box x,y,w,h in image pixels (default: the whole image)")
    parser.add_argument("--padding", type=float, default=1.0, help="grow the box by this factor (default: %(default)s)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python cpm_animal/train.py", args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, saved, _ = model_from_checkpoint(checkpoint, device)
    layout_name = saved["cpm_config"]["dataset"]["layout"]
    skeleton = get_layout(layout_name).skeleton if layout_name != "from_file" else ()
    names = get_layout(layout_name).names if layout_name != "from_file" else [str(k) for k in range(model.config.num_keypoints)]
    box = [float(v) for v in args.box.split(",")] if args.box else None
    if box is not None and len(box) != 4:
        raise SystemExit(f"--box {args.box!r}: expected x,y,w,h")
    sources = [args.source] if args.source else default_inputs(saved, args.out)
    if args.source and not Path(args.source).exists():
        raise SystemExit(f"{args.source}: no such file or folder")
    out_dir = output_dirs(MODEL_NAME, "infer_" + checkpoint.parent.name, args.out)["outputs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    results, failures = [], []

    def record(path, keypoints, visible, frame):
        entry = {"file": str(path), "keypoints": {n: [round(float(x), 2), round(float(y), 2), round(float(s), 4),
                                                      int(v)] for n, (x, y, s), v in zip(names, keypoints, visible)}}
        if frame is not None:
            entry["frame"] = frame
        results.append(entry)

    for source in sources:
        source = Path(source)
        is_video = source.suffix.lower() in VIDEO_SUFFIXES
        video = VideoWriter(out_dir / f"{source.stem}_pose.mp4", video_properties(source)[0]) if is_video else None
        for name, image, path, frame in iter_inputs(source, errors=failures, detail=True):
            keypoints, visible = predict_image(model, image, box, args.padding)
            record(path, keypoints, visible, frame)
            drawn = draw_prediction(image, keypoints, visible, skeleton)
            if video is not None:
                video.write(drawn)
            else:
                cv2.imwrite(str(out_dir / f"{name}_pose.jpg"), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        if video is not None:
            video.close()
    (out_dir / "keypoints.json").write_text(json.dumps({"checkpoint": str(checkpoint), "results": results}, indent=1))
    print(f"{len(results)} predictions ({len(failures)} inputs failed); drawings and keypoints.json "
          f"written to {out_dir}")
    sys.exit(1 if failures and not results else 0)


if __name__ == "__main__":
    exit_on_bad_input(main)
