"""Run a Pose-SPI checkpoint on images, folders or videos: the predicted skeleton drawn enlarged, and
predictions.json (the schema of the top README).

    python pose_spi/infer.py                                   # newest checkpoint, 16 built-in val images
    python pose_spi/infer.py --input IMAGE_OR_FOLDER [--checkpoint CKPT] [--limit N]
Each image is read as grayscale and resized to the model's input size: the whole image is the person's crop.
Holds the image -> keypoints path (`Predictor`, `decode_output`) that eval.py and train.py use.
"""
import argparse
import sys

import cv2
import numpy as np
import torch

from common.data import exit_on_bad_input
from common.drawing import draw_keypoints
from common.export import use_backend
from common.keypoints import layout_from_dict
from common.live import open_live_source, run_live
from common.prediction import Predictor as BasePredictor
from common.prediction import make_person, run_inference
from common.runs import (add_common_args, at_least, checkpoint_or_exit, data_dir, model_from_checkpoint, output_dirs,
                         pick_device)
from pose_spi.dataset import synthetic_paths, to_gray, to_image_pixels
from pose_spi.model import EFFICIENTNET_MODEL_NAME, MODEL_NAME, build_model, upgrade_checkpoint

MODEL_NAMES = (MODEL_NAME, EFFICIENTNET_MODEL_NAME)  # train.py and train_keypointrcnn.py runs


def decode_output(output, input_size, num_keypoints, raw_targets=False):
    """Network output (B, 3K) -> keypoints (B, K, 2) in input pixels and visibility scores (B, K) in [0, 1]."""
    out = output.float().view(-1, num_keypoints, 3)
    if raw_targets:  # the seed's: raw pixels, v regressed towards 0..2
        return out[..., :2], (out[..., 2] / 2).clamp(0, 1)
    return out[..., :2] * input_size, torch.sigmoid(out[..., 2])


class Predictor(BasePredictor):
    """Grayscale, resized to the input size -> one person: keypoints in image pixels, visibility as scores,
    their mean as the person score."""
    model_name = MODEL_NAME

    def __init__(self, model, settings, device="cpu"):
        self.model, self.device = model.to(device).eval(), device
        self.raw_targets = settings["raw_targets"]
        self.layout = layout_from_dict(settings["layout"])

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        model, checkpoint = model_from_checkpoint(path, build_model, MODEL_NAMES, upgrade_checkpoint, device)
        return cls(model, checkpoint["settings"], device)

    @torch.no_grad()
    def keypoints(self, image_rgb):
        """(K, 3): x, y in the image's own pixels and the visibility score."""
        s = self.model.input_size
        h, w = image_rgb.shape[:2]
        gray = cv2.resize(to_gray(image_rgb), (s, s), interpolation=cv2.INTER_AREA)
        tensor = torch.from_numpy(gray)[None, None].to(self.device)
        xy, vis = decode_output(self.model(tensor), s, self.model.num_keypoints, self.raw_targets)
        xy = to_image_pixels(xy[0].cpu().numpy(), (w, h), s)
        return np.concatenate([xy, vis[0].cpu().numpy()[:, None]], 1)

    def predict(self, image_rgb):
        keypoints = self.keypoints(image_rgb)
        return [make_person(keypoints[:, :2], keypoints[:, 2], keypoints[:, 2].mean())]


def enlarged_drawing(skeleton, scale, threshold):
    """The 64x64 inputs are small: draw on the image enlarged `scale` times (pixel centers kept)."""
    def draw(image, people):
        big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        for person in people:
            points = person.as_array()
            points[:, :2] = (points[:, :2] + 0.5) * scale - 0.5
            big = draw_keypoints(big, points, skeleton, threshold=threshold)
        return {"pose": big}
    return draw


def builtin_inputs(args, checkpoint=None):
    """The built-in validation images (what infer.py and export.py read without --input)."""
    folder = synthetic_paths(data_dir(args.out))["val"][0]
    if not folder.is_dir():
        sys.exit(f"error: no built-in val images at {folder}; run python pose_spi/train.py or pass --input")
    return [folder]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, role="infer", threshold=-1.0)
    parser.add_argument("--scale", type=at_least(1), default=4,
                        help="enlarge drawings by this factor (default: %(default)s)")
    args = parser.parse_args(argv)
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAMES, "python pose_spi/train.py", args.out)
    predictor = use_backend(Predictor.from_checkpoint(checkpoint, pick_device(args.device)), args.backend,
                            checkpoint, args.onnx)
    out_dir = output_dirs(checkpoint.parent.parent.name, args.run_name or f"infer-{checkpoint.parent.name}",
                          args.out)["outputs"]
    draw = enlarged_drawing(predictor.layout.skeleton, args.scale, args.threshold)
    if args.camera is not None or args.live:
        return run_live(predictor, open_live_source(args.camera, args.live), out_dir, draw, args.show)
    if args.input:
        return run_inference(predictor, args.input, out_dir, checkpoint, draw, args.limit)
    return run_inference(predictor, builtin_inputs(args), out_dir, checkpoint, draw, args.limit or 16)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main))
