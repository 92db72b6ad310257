"""Run a Simple Baselines checkpoint on an image, a folder of images or a video (headless, OpenCV).

    python simple_baseline/infer.py                          # newest checkpoint on a few built-in val images
    python simple_baseline/infer.py --input person.jpg       # or a folder, or clip.mp4
    python simple_baseline/infer.py --input clip.mp4 --box 100 40 200 400 --score-threshold 0.3
Single-person, top-down: the crop is --box (x y w h, original pixels) or else the whole frame. Writes
annotated images (or an mp4 with the same frame count) and keypoints.json ([x, y, score] per joint).
"""
import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from common.data import BadImageError, read_image
from common.engine import checkpoint_or_exit, output_dirs
from common.geometry import box_to_center_scale, get_affine_transform, warp_image
from common.keypoints import COCO17, LIP16
from simple_baseline.dataset import IMAGENET_MEAN, IMAGENET_STD
from simple_baseline.eval import (MODEL_NAME, draw_prediction, heatmaps_to_image_coords, load_model,
                                  predict_heatmaps)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


class PosePredictor:
    """Crop -> network (with flip test) -> keypoints in the frame's pixels."""

    def __init__(self, model, input_size, layout, flip_test=True, box=None, device="cpu"):
        self.model, self.input_size, self.layout = model, tuple(input_size), layout
        self.flip_test, self.box, self.device = flip_test, box, device

    def __call__(self, image):
        """image: RGB uint8 (H, W, 3). Returns (K, 3) [x, y, score] in image pixels."""
        height, width = image.shape[:2]
        box = self.box or (0, 0, width, height)
        # The whole frame is taken as the person box, so no extra padding around it.
        center, size = box_to_center_scale(box, self.input_size[0] / self.input_size[1],
                                           padding=1.25 if self.box else 1.0)
        crop = warp_image(image, get_affine_transform(center, size, 0.0, self.input_size), self.input_size)
        pixels = (crop.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        batch = torch.from_numpy(pixels.transpose(2, 0, 1)).unsqueeze(0).to(self.device)
        heatmaps = predict_heatmaps(self.model, batch, self.layout.flip_index, self.flip_test)
        coords, scores = heatmaps_to_image_coords(heatmaps, center[None], size[None])
        return np.concatenate([coords[0], scores[0][:, None]], 1)


def run_on_images(predictor, paths, out_dir, args):
    results, failures = [], 0
    for path in paths:
        try:
            image = read_image(path)
        except BadImageError as exc:
            print(f"error: {exc}", file=sys.stderr)  # one line; the other inputs continue
            failures += 1
            continue
        keypoints = predictor(image)
        drawn = draw_prediction(image, keypoints[:, :2], keypoints[:, 2], None, not args.no_skeleton,
                                args.score_threshold, predictor.layout)
        cv2.imwrite(str(out_dir / f"{Path(path).stem}_pose.jpg"), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        results.append({"file": str(path), "keypoints": keypoints.round(3).tolist()})
    return results, failures


def run_on_video(predictor, path, out_dir, args):
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        print(f"error: {path}: cannot open video", file=sys.stderr)
        return [], 1
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    out_path = out_dir / f"{Path(path).stem}_pose.mp4"
    writer, results, frame_index = None, [], 0
    while True:
        ok, frame_bgr = capture.read()
        if not ok:
            break
        if writer is None:
            height, width = frame_bgr.shape[:2]
            writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        frame = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        keypoints = predictor(frame)
        drawn = draw_prediction(frame, keypoints[:, :2], keypoints[:, 2], None, not args.no_skeleton,
                                args.score_threshold, predictor.layout)
        writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))  # every frame written: same frame count
        results.append({"file": str(path), "frame": frame_index, "keypoints": keypoints.round(3).tolist()})
        frame_index += 1
    capture.release()
    if writer is not None:
        writer.release()
    print(f"{path}: {frame_index} frames -> {out_path}")
    return results, 0


def default_inputs(config, out):
    """A few built-in validation images (the default when --input is not given)."""
    from simple_baseline.dataset import load_split
    fmt = config.get("format", "lip")
    split = load_split(fmt if fmt != "mpii" else "lip", None, None, "val", output_dirs(MODEL_NAME, "x", out)["root"],
                       quiet=True, builtin_sizes=config.get("builtin_sizes"))
    return [Path(r["image"]) for r in split["records"][:4]]


def main(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python simple_baseline/train.py", args.out)
    model, config = load_model(checkpoint, device)
    layout = COCO17 if config.get("format") == "coco" else LIP16
    predictor = PosePredictor(model, config.get("input_size", (256, 256)), layout, not args.no_flip_test,
                              tuple(args.box) if args.box else None, device)
    dirs = output_dirs(MODEL_NAME, args.run_name or f"infer-{checkpoint.parent.name}", args.out)
    out_dir = Path(dirs["outputs"])
    out_dir.mkdir(parents=True, exist_ok=True)

    source = Path(args.input) if args.input else None
    if source is None:
        inputs = default_inputs(config, args.out)
    elif source.is_dir():
        inputs = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    elif source.exists():
        inputs = [source]
    else:
        sys.exit(f"error: {source}: no such file or folder")
    results, failures = [], 0
    images = [p for p in inputs if p.suffix.lower() not in VIDEO_SUFFIXES]
    new_results, new_failures = run_on_images(predictor, images, out_dir, args)
    results += new_results
    failures += new_failures
    for video in (p for p in inputs if p.suffix.lower() in VIDEO_SUFFIXES):
        new_results, new_failures = run_on_video(predictor, video, out_dir, args)
        results += new_results
        failures += new_failures
    json_path = out_dir / "keypoints.json"
    json_path.write_text(json.dumps({"joints": list(layout.names), "checkpoint": str(checkpoint),
                                     "predictions": results}, indent=1))
    if failures:
        print(f"{failures} input(s) could not be read (see the errors above)", file=sys.stderr)
    print(f"annotated outputs and keypoints.json ({len(results)} predictions) written to {out_dir}")
    return 1 if failures and not results else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None, help="image, folder or video (default: 4 built-in val images)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint (default: newest of this model)")
    parser.add_argument("--box", type=float, nargs=4, metavar=("X", "Y", "W", "H"), default=None,
                        help="person box in original pixels (default: the whole frame)")
    parser.add_argument("--score-threshold", type=float, default=0.2, help="hide joints scoring below this")
    parser.add_argument("--no-skeleton", action="store_true", help="draw joints only")
    parser.add_argument("--no-flip-test", action="store_true", help="one forward pass per frame instead of two")
    parser.add_argument("--out", default=None, help="output root (default: $POSE_OUTPUT_ROOT, else .)")
    parser.add_argument("--run-name", default=None, help="folder name under outputs/simple_baseline/")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
