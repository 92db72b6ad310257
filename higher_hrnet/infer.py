"""Run HigherHRNet on images, folders or videos: skeleton overlay, tag plot, heatmap plot, predictions.json.

    python higher_hrnet/infer.py                                  # newest checkpoint, built-in val images
    python higher_hrnet/infer.py --input photo.jpg --checkpoint pose_higher_hrnet_w32_512.pth --threshold 0.2
    python higher_hrnet/infer.py --input clip.mp4 --inference seed   # video in, annotated video out
    python higher_hrnet/infer.py --scales 2 1 0.5 --no-flip --detection-threshold 0.2 --tag-threshold 0.8   # as eval.py
Writes to outputs/higher_hrnet/<run>/: <name>_pose.jpg, <name>_tags.jpg, <name>_heatmaps.jpg per image
(a <name>_pose.mp4 for a video) and predictions.json (top README; each person's "extra" holds its tags).
--threshold hides joints (e.g. refined ones) below it. Works with our checkpoints, official and the seed's.
"""
from __future__ import annotations

import argparse
import sys

import cv2
import numpy as np

from common.data import exit_on_bad_input
from common.drawing import draw_heatmap_overlay, draw_people, person_color
from common.export import use_backend
from common.geometry import get_affine_transform, warp_image
from common.keypoints import get_layout, layout_from_dict
from common.live import open_live_source, run_live
from common.prediction import Predictor as BasePredictor
from common.prediction import make_person, run_inference
from common.runs import add_common_args, at_least, checkpoint_or_exit, output_dirs, pick_device
from higher_hrnet.checkpoints import load_for_inference
from higher_hrnet.dataset import LAYOUTS
from higher_hrnet.inference import (INFERENCE_SETTINGS, inference_settings, maps_to_people, predict_maps,
                                    prepare_for_inference)
from higher_hrnet.model import MODEL_NAME, input_size
from higher_hrnet.scenes import ensure_scenes

NO_CHECKPOINT_HINT = " (ours, official or the seed's)"


class Predictor(BasePredictor):
    """The official test pipeline (inference.py): people with per-keypoint scores and tags ("extra")."""
    model_name = MODEL_NAME

    def __init__(self, model, settings, inference="official", device="cpu", layout=None, plain_network=False,
                 **overrides):
        """settings: the checkpoint's (input size, layout); plain_network: run the network as loaded instead
        of prepare_for_inference's copy; overrides: InferenceConfig fields (None = keep)."""
        model = model.to(device).eval()
        self.model, self.device = model if plain_network else prepare_for_inference(model), device
        self.layout = layout or layout_from_dict(settings["layout"])
        input_size = overrides.pop("input_size", None) or settings["input_size"]
        self.config = inference_settings(inference, input_size=input_size, **overrides)
        self.last_maps = None     # (heatmaps, center, box) of the last image, for drawing

    @classmethod
    def from_checkpoint(cls, path, device="cpu", inference="official", plain_network=False, **overrides):
        model, settings = load_for_inference(path, device)
        return cls(model, settings, inference, device, plain_network=plain_network, **overrides)

    def predict(self, image_rgb):
        num_joints = self.layout.num_keypoints
        heatmaps, tags, center, box = predict_maps(self.model, image_rgb, self.config, self.layout.flip_index,
                                                   num_joints, self.device)
        self.last_maps = heatmaps, center, box
        people, scores = maps_to_people(heatmaps, tags, center, box, self.config, num_joints)
        return [make_person(p[:, :2], p[:, 2], s, tags=p[:, 3:]) for p, s in zip(people, scores)]


def add_inference_args(parser):
    """The test settings eval.py and infer.py share; inference_overrides(args) turns them into Predictor keywords."""
    a = parser.add_argument
    a("--inference", default="official", choices=sorted(INFERENCE_SETTINGS),
      help="test settings: official (flip, detection 0.1, tag 1.0) or seed (default: %(default)s)")
    a("--input-size", type=input_size, default=None, help="short side at scale 1 (default: the checkpoint's training "
                                                          "size, else 512)")
    a("--scales", type=at_least(0.0, above=True), nargs="+", default=None, help="multi-scale test factors, e.g. 2 1 0.5")
    a("--no-flip", action="store_true", help="turn flip test off")
    a("--detection-threshold", type=float, default=None, help="override the settings'")
    a("--tag-threshold", type=float, default=None, help="override the settings'")
    a("--layout", default=None, help="keypoint layout: coco17 or crowdpose14 (default: the checkpoint's, else coco17)")
    add_plain_network_arg(parser)


def inference_overrides(args):
    """InferenceConfig fields from add_inference_args' flags (None: the settings' own)."""
    return {"input_size": args.input_size, "scales": tuple(args.scales) if args.scales else None,
            "detection_threshold": args.detection_threshold, "tag_threshold": args.tag_threshold,
            "flip": False if args.no_flip else None}


def add_plain_network_arg(parser):
    parser.add_argument("--plain-network", action="store_true",
                        help="run the network as loaded (separate BatchNorm, NCHW): outputs bit-identical to the "
                             "official code; default folds BatchNorm and uses channels_last (faster, within 1e-4)")


def draw_tag_plot(people, names, threshold, size=(640, 360)):
    """Each person's joint tags (first tag dimension) against the joint: well-grouped people are flat,
    separated lines. RGB uint8."""
    width, height = size
    plot = np.full((height, width, 3), 255, np.uint8)
    margin = 40
    shown = [p.extra["tags"][p.scores > threshold, 0] for p in people]
    values = np.concatenate(shown) if any(len(t) for t in shown) else np.zeros(1)
    lo, hi = float(values.min()) - 0.5, float(values.max()) + 0.5
    to_y = lambda v: int(height - margin - (v - lo) / (hi - lo) * (height - 2 * margin))
    to_x = lambda j: int(margin + j * (width - 2 * margin) / max(len(names) - 1, 1))
    cv2.line(plot, (margin, height - margin), (width - margin, height - margin), (0, 0, 0), 1)
    for j, name in enumerate(names):
        cv2.putText(plot, name[:6], (to_x(j) - 12, height - margin + 14 + 10 * (j % 2)), cv2.FONT_HERSHEY_PLAIN,
                    0.7, (0, 0, 0), 1)
    for tick in np.linspace(lo, hi, 5):
        cv2.putText(plot, f"{tick:.1f}", (2, to_y(tick) + 4), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1)
    for index, person in enumerate(people):
        for j in np.flatnonzero(person.scores > threshold):
            cv2.circle(plot, (to_x(j), to_y(person.extra["tags"][j, 0])), 4, person_color(index), -1, cv2.LINE_AA)
    cv2.putText(plot, "tag value per joint (one color per person)", (margin, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1, cv2.LINE_AA)
    return plot


def heatmaps_on_image(image, heatmaps, center, box):
    """The maximum over joints of the heatmaps, warped back onto the image and overlaid."""
    peak = heatmaps.max(0)[0].numpy()
    inverse = get_affine_transform(center, box, 0, (peak.shape[1], peak.shape[0]), inverse=True)
    back = warp_image(np.clip(peak, 0, 1), inverse, (image.shape[1], image.shape[0]))
    return draw_heatmap_overlay(image, back[None], alpha=0.55)


def drawings(predictor, threshold):
    """The skeletons (people with a non-negative score), the heatmaps and the tag plot of each image."""
    def draw(image, people):
        layout = predictor.layout
        pose = draw_people(image, [p.as_array() for p in people if p.score >= 0], layout.skeleton, threshold)
        return {"pose": pose, "heatmaps": heatmaps_on_image(image, *predictor.last_maps),
                "tags": draw_tag_plot(people, layout.names, threshold)}
    return draw


def builtin_inputs(args, checkpoint=None):
    """The built-in validation scenes (infer.py's and export.py's default)."""
    return [ensure_scenes(args.out) / "images" / "val"]


def main(args):
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python higher_hrnet/train.py", args.out,
                                    hint=NO_CHECKPOINT_HINT)
    device = pick_device(args.device)
    model, settings = load_for_inference(checkpoint, device)
    layout = get_layout(args.layout, LAYOUTS) if args.layout else None
    predictor = Predictor(model, settings, args.inference, device, layout, args.plain_network,
                          **inference_overrides(args))
    use_backend(predictor, args.backend, checkpoint, args.onnx)
    out_dir = output_dirs(MODEL_NAME, args.run_name or f"infer-{checkpoint.parent.name}", args.out)["outputs"]
    draw = drawings(predictor, args.threshold)
    if args.camera is not None or args.live:
        return run_live(predictor, open_live_source(args.camera, args.live), out_dir, draw, args.show)
    return run_inference(predictor, args.input or builtin_inputs(args), out_dir, checkpoint, draw, args.limit)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, role="infer", limit=8, threshold=0.1)
    add_inference_args(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main, parse_args()))
