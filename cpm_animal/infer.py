"""Run a CPM checkpoint on images, folders or videos: the skeleton drawn, and predictions.json (top README).

    python cpm_animal/infer.py                                  # newest checkpoint on 8 built-in val images
    python cpm_animal/infer.py --input cat.jpg --checkpoint checkpoints/cpm_animal/<run>/best.pt
    python cpm_animal/infer.py --input photos/ --box 10 20 300 200   # crop box x y w h (default: the whole image)
    python cpm_animal/infer.py --input clip.mp4
CPM is single-animal and top-down: each image (or frame) is one crop around --box. Occluded keypoints
(negative heatmap peak in signed mode) are drawn in purple, visible ones in green; predictions.json has
them as the person's extra "visible" flags. Holds the image -> keypoints path that eval.py and train.py use.
"""
from __future__ import annotations

import argparse
import sys

import cv2
import numpy as np
import torch

from common.data import exit_on_bad_input
from common.drawing import GREEN, PURPLE, RED, draw_keypoints
from common.export import use_backend
from common.geometry import box_to_center_scale, get_affine_transform, invert_affine, warp_image
from common.heatmaps import decode_heatmaps
from common.keypoints import layout_from_dict
from common.live import open_live_source, run_live
from common.prediction import Predictor as BasePredictor
from common.prediction import make_person, run_inference
from common.runs import (add_common_args, at_least, checkpoint_or_exit, data_dir, load_checkpoint,
                         model_from_checkpoint, output_dirs, pick_device)
from cpm_animal.dataset import MEAN, STD, resolve_sources
from cpm_animal.model import MODEL_NAME, CPMConfig, build_model, heatmap_to_input, upgrade_checkpoint


def decode_predictions(heatmaps: torch.Tensor, model_config: CPMConfig, inverse: torch.Tensor):
    """Final-stage maps (B, K(+bg), h, w) -> original-pixel xy (B, K, 2), scores (B, K), visible (B, K).

    Signed maps: the peak of |map| gives the position and its sign the visibility.
    """
    maps = heatmaps[:, :model_config.num_keypoints].float()
    coords, _ = decode_heatmaps(maps.abs())
    height, width = maps.shape[-2:]
    xi = coords[..., 0].round().long().clamp(0, width - 1)
    yi = coords[..., 1].round().long().clamp(0, height - 1)
    values = maps.flatten(2).gather(2, (yi * width + xi).unsqueeze(2)).squeeze(2)
    xy = heatmap_to_input(coords, model_config)
    xy = torch.einsum("bij,bkj->bki", inverse[:, :, :2].float(), xy) + inverse[:, None, :, 2].float()
    return xy, values.abs(), values > 0


class Predictor(BasePredictor):
    """Crop around the box -> CPM -> one animal: keypoints, |peak| as scores, the peak's sign as "visible"."""
    model_name = MODEL_NAME

    def __init__(self, model, settings, box=None, padding=1.0, device="cpu"):
        self.model = model.to(device).eval()
        self.layout = layout_from_dict(settings["layout"])
        self.box, self.padding = box, padding

    @classmethod
    def from_checkpoint(cls, path, device="cpu", box=None, padding=1.0):
        model, checkpoint = model_from_checkpoint(path, build_model, MODEL_NAME, upgrade_checkpoint, device)
        return cls(model, checkpoint["settings"], box, padding, device)

    @torch.no_grad()
    def keypoints(self, image):
        """keypoints (K, 3) original pixels (x, y, score) and visible (K,) bool for one RGB image."""
        height, width = image.shape[:2]
        box = self.box if self.box is not None else (0, 0, width, height)
        in_w, in_h = self.model.config.input_size
        center, size = box_to_center_scale(box, in_w / in_h, self.padding)
        matrix = get_affine_transform(center, size, 0.0, (in_w, in_h))
        crop = warp_image(image, matrix, (in_w, in_h), border_value=tuple(int(v) for v in MEAN))
        tensor = torch.from_numpy(((crop.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1).copy())[None]
        device = next(self.model.parameters()).device
        stages = self.model(tensor.to(device))
        inverse = torch.from_numpy(invert_affine(matrix))[None].to(device)
        xy, score, visible = decode_predictions(stages[-1], self.model.config, inverse)
        keypoints = torch.cat([xy[0], score[0, :, None]], 1).cpu().numpy()
        return keypoints, visible[0].cpu().numpy()

    def predict(self, image_rgb):
        keypoints, visible = self.keypoints(image_rgb)
        return [make_person(keypoints[:, :2], keypoints[:, 2], keypoints[:, 2].mean(), visible=visible)]


def draw_visibility(skeleton):
    """The skeleton in red, visible joints green, occluded ones purple."""
    def draw(image, people):
        [animal] = people
        drawn = draw_keypoints(image, animal.keypoints, skeleton, color=RED, scores=False)
        radius = max(2, max(image.shape[:2]) // 90)
        for (x, y), seen in zip(animal.keypoints, animal.extra["visible"]):
            cv2.circle(drawn, (int(round(x)), int(round(y))), radius, GREEN if seen else PURPLE, -1, cv2.LINE_AA)
        return {"pose": drawn}
    return draw


def builtin_inputs(args, checkpoint, saved=None):
    """The first 8 images of the built-in val split the checkpoint was trained with (infer.py's and export.py's
    default)."""
    saved = saved or load_checkpoint(checkpoint)
    _, val_records, _ = resolve_sources(saved["settings"]["preset"], data_dir(args.out) / MODEL_NAME)
    return [r["image"] for r in val_records[:8]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, role="infer")
    parser.add_argument("--box", type=float, nargs=4, metavar=("X", "Y", "W", "H"), default=None,
                        help="crop box in image pixels (default: the whole image)")
    parser.add_argument("--padding", type=at_least(0.0, above=True), default=1.0,
                        help="grow the box by this factor (default: %(default)s)")
    args = parser.parse_args(argv)
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python cpm_animal/train.py", args.out)
    device = pick_device(args.device)
    model, saved = model_from_checkpoint(checkpoint, build_model, MODEL_NAME, upgrade_checkpoint, device)
    predictor = use_backend(Predictor(model, saved["settings"], args.box, args.padding, device), args.backend,
                            checkpoint, args.onnx)
    out_dir = output_dirs(MODEL_NAME, args.run_name or f"infer-{checkpoint.parent.name}", args.out)["outputs"]
    draw = draw_visibility(predictor.layout.skeleton)
    if args.camera is not None or args.live:
        return run_live(predictor, open_live_source(args.camera, args.live), out_dir, draw, args.show)
    sources = args.input or builtin_inputs(args, checkpoint, saved)
    return run_inference(predictor, sources, out_dir, checkpoint, draw, args.limit)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main))
