"""Run a Simple Baselines checkpoint on images, folders or videos: drawn skeletons and predictions.json.

    python simple_baseline/infer.py                          # newest checkpoint on a few built-in val images
    python simple_baseline/infer.py --input person.jpg       # or a folder, or clip.mp4
    python simple_baseline/infer.py --input clip.mp4 --box 100 40 200 400 --threshold 0.3
Single-person, top-down: the crop is --box (x y w h, original pixels) or else the whole frame. Writes
annotated images (an mp4 with the same frame count for a video) and predictions.json (top README).
Holds the image -> keypoints path (flip test, decoding, the inverse affine) that eval.py uses.
"""
import argparse
import sys

import numpy as np
import torch

from common.data import exit_on_bad_input, normalize_image
from common.drawing import BLUE, RED, draw_keypoints
from common.export import use_backend
from common.geometry import affine_points, box_to_center_scale, get_affine_transform, warp_image
from common.heatmaps import HeatmapCodec, decode_heatmaps
from common.keypoints import layout_from_dict
from common.live import open_live_source, run_live
from common.prediction import Predictor as BasePredictor
from common.prediction import make_person, run_inference
from common.runs import (add_common_args, checkpoint_or_exit, load_checkpoint, model_from_checkpoint, output_dirs,
                         pick_device)
from simple_baseline.dataset import load_split
from simple_baseline.model import LIP16, MODEL_NAME, build_model, upgrade_checkpoint


def flip_heatmaps_back(heatmaps: torch.Tensor, flip_index, shift=False):
    """Undo a horizontal input flip on network output: mirror W and swap left/right channels.

    shift=True moves the result one pixel right, the Simple Baselines correction for the
    half-pixel misalignment that flipping an even-width map introduces.
    """
    flipped = heatmaps.flip(3)[:, list(flip_index)]
    if shift:
        flipped = torch.cat([flipped[..., :1], flipped[..., :-1]], dim=3)
    return flipped


@torch.no_grad()
def predict_heatmaps(model, images, flip_index, flip_test=True, flip_shift=True):
    """Heatmaps for a batch of crops; with flip test, averaged with those of the mirrored crops.

    Our heatmap grid is the input grid divided by the stride (x_hm = x_in / 4), so mirroring the
    input and flipping the output back lands 3/4 of a heatmap pixel to the left: the paper's
    one-pixel shift (flip_shift) brings it back to within a quarter pixel.
    """
    heatmaps = model(images)
    if flip_test:
        flipped = model(torch.flip(images, dims=[3]))
        heatmaps = 0.5 * (heatmaps + flip_heatmaps_back(flipped, flip_index, shift=flip_shift))
    return heatmaps


def heatmaps_to_image_coords(heatmaps, centers, sizes):
    """Decode (argmax + quarter pixel) and map to original image pixels through the crop's inverse
    affine. Returns coords (B, K, 2) and scores (B, K) as numpy."""
    coords, maxvals = decode_heatmaps(heatmaps.float())
    coords, maxvals = coords.cpu().numpy(), maxvals.cpu().numpy()
    heatmap_size = (heatmaps.shape[3], heatmaps.shape[2])
    out = np.empty_like(coords)
    for i in range(len(coords)):
        inverse = get_affine_transform(centers[i], sizes[i], 0.0, heatmap_size, inverse=True)
        out[i] = affine_points(coords[i], inverse)
    return out, maxvals


def person_score(scores, threshold=0.2):
    """As in the paper: the mean of the joint scores above a threshold (times the box score, here 1)."""
    confident = scores[scores > threshold]
    return float(confident.mean()) if confident.size else 0.0


class Predictor(BasePredictor):
    """Crop -> network (with flip test) -> one person's keypoints in the image's pixels."""
    model_name = MODEL_NAME

    def __init__(self, model, settings, flip_test=True, box=None, device="cpu"):
        self.model, self.device = model.to(device).eval(), device
        self.codec = HeatmapCodec.from_dict(settings["codec"])
        self.layout = layout_from_dict(settings["layout"])
        self.flip_test, self.box = flip_test, box

    @classmethod
    def from_checkpoint(cls, path, device="cpu", flip_test=True, box=None):
        model, checkpoint = model_from_checkpoint(path, build_model, MODEL_NAME, upgrade_checkpoint, device)
        return cls(model, checkpoint["settings"], flip_test, box, device)

    def keypoints(self, image):
        """image: RGB uint8 (H, W, 3). Returns (K, 3) [x, y, score] in image pixels."""
        height, width = image.shape[:2]
        box = self.box or (0, 0, width, height)
        input_size = self.codec.input_size
        # The whole frame is taken as the person box, so no extra padding around it.
        center, size = box_to_center_scale(box, input_size[0] / input_size[1], padding=1.25 if self.box else 1.0)
        crop = warp_image(image, get_affine_transform(center, size, 0.0, input_size), input_size)
        batch = normalize_image(crop).unsqueeze(0).to(self.device)
        heatmaps = predict_heatmaps(self.model, batch, self.layout.flip_index, self.flip_test)
        coords, scores = heatmaps_to_image_coords(heatmaps, center[None], size[None])
        return np.concatenate([coords[0], scores[0][:, None]], 1)

    def predict(self, image_rgb):
        keypoints = self.keypoints(image_rgb)
        return [make_person(keypoints[:, :2], keypoints[:, 2], person_score(keypoints[:, 2]))]


def draw_prediction(image, pred, scores, gt=None, skeleton=True, threshold=0.2, layout=LIP16):
    """Prediction in red (joints under the score threshold hidden), ground truth in blue."""
    edges = layout.skeleton if skeleton else ()
    if gt is not None:
        image = draw_keypoints(image, gt, edges, color=BLUE, threshold=0.0, scores=False)
    keypoints = np.concatenate([pred, scores[:, None]], 1)
    return draw_keypoints(image, keypoints, edges, color=RED, threshold=threshold, scores=False)


def builtin_inputs(args, checkpoint, saved=None):
    """A few built-in validation images, of the split the checkpoint trained on (infer.py's and export.py's
    default)."""
    saved = saved or load_checkpoint(checkpoint)
    split = load_split("coco" if saved["settings"]["format"] == "coco" else "lip", None, None, "val", args.out,
                       quiet=True, builtin_sizes=saved["config"].get("builtin_sizes"))
    return [r["image"] for r in split["records"][:4]]


def main(args):
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python simple_baseline/train.py", args.out)
    device = pick_device(args.device)
    model, saved = model_from_checkpoint(checkpoint, build_model, MODEL_NAME, upgrade_checkpoint, device)
    predictor = Predictor(model, saved["settings"], not args.no_flip_test, tuple(args.box) if args.box else None,
                          device)
    use_backend(predictor, args.backend, checkpoint, args.onnx)
    out_dir = output_dirs(MODEL_NAME, args.run_name or f"infer-{checkpoint.parent.name}", args.out)["outputs"]

    def draw(image, people):
        [person] = people
        return {"pose": draw_prediction(image, person.keypoints, person.scores, None, not args.no_skeleton,
                                        args.threshold, predictor.layout)}

    if args.camera is not None or args.live:
        return run_live(predictor, open_live_source(args.camera, args.live), out_dir, draw, args.show)
    sources = args.input or builtin_inputs(args, checkpoint, saved)
    return run_inference(predictor, sources, out_dir, checkpoint, draw, args.limit)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, role="infer", threshold=0.2)
    parser.add_argument("--box", type=float, nargs=4, metavar=("X", "Y", "W", "H"), default=None,
                        help="person box in original pixels (default: the whole frame)")
    parser.add_argument("--no-skeleton", action="store_true", help="draw joints only")
    parser.add_argument("--no-flip-test", action="store_true", help="one forward pass per frame instead of two")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main, parse_args()))
