"""Run a Pose-SPI checkpoint on an image or a folder and draw the predicted keypoints.

    python pose_spi/infer.py                          # newest checkpoint, the first 16 built-in val images
    python pose_spi/infer.py IMAGE_OR_FOLDER [--checkpoint CKPT] [--limit N]
Each image is read as grayscale, resized to the model's input size, and drawn 4x enlarged with its skeleton.
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from common.data import exit_on_bad_input, iter_inputs
from pose_spi.dataset import synthetic_paths, to_gray, to_image_pixels
from pose_spi.eval import decode_output, load_for_inference


@torch.no_grad()
def predict_image(model, config, image_rgb, device="cpu"):
    """Keypoints (K, 3) as (x, y, visibility) in the image's own pixels."""
    s = config.input_size
    h, w = image_rgb.shape[:2]
    gray = cv2.resize(to_gray(image_rgb), (s, s), interpolation=cv2.INTER_AREA)
    tensor = torch.from_numpy(gray)[None, None].to(device)
    xy, vis = decode_output(model(tensor), s, config.num_keypoints, config.raw_targets)
    xy = to_image_pixels(xy[0].cpu().numpy(), (w, h), s)
    return np.concatenate([xy, vis[0].cpu().numpy()[:, None]], 1)


def draw(image_rgb, keypoints, skeleton, scale=4):
    from common.drawing import draw_keypoints

    big = cv2.resize(image_rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    points = keypoints.copy()
    points[:, :2] = (points[:, :2] + 0.5) * scale - 0.5
    return draw_keypoints(big, points, skeleton, threshold=-1)


def main(argv=None):
    from common.keypoints import POSE_SPI13, layout_from_coco_category

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="image file or folder (default: the built-in val images)")
    parser.add_argument("--checkpoint", help="weights (default: the newest Pose-SPI checkpoint)")
    parser.add_argument("--out", help="output root (default $POSE_OUTPUT_ROOT or .)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--limit", type=int, default=None, help="at most N images (default: all; 16 built-in)")
    parser.add_argument("--scale", type=int, default=4, help="enlarge drawings by this factor (default 4)")
    args = parser.parse_args(argv)
    _, device, model, config, dirs = load_for_inference(args)
    source, limit = args.source, args.limit
    if source is None:
        source = synthetic_paths(dirs["data"])["val"][0]
        limit = limit or 16
        if not source.is_dir():
            sys.exit(f"error: no built-in val images at {source}; run python pose_spi/train.py first or pass an image")
    skeleton = POSE_SPI13.skeleton if config.num_keypoints == 13 else layout_from_coco_category(
        {"keypoints": [f"kp{i}" for i in range(config.num_keypoints)]}).skeleton
    out_dir = Path(dirs["outputs"]) / "infer"
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn, unreadable = 0, []
    for name, image in iter_inputs(source, limit, unreadable):
        keypoints = predict_image(model, config, image, device)
        picture = draw(image, keypoints, skeleton, args.scale)
        cv2.imwrite(str(out_dir / f"{name}.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        drawn += 1
    if not drawn and not unreadable:
        sys.exit(f"error: {source}: no images found")
    print(f"drew {drawn} of {drawn + len(unreadable)} images ({len(unreadable)} unreadable) into {out_dir}")
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main))
