"""Run the rtpe student on images, folders or videos: skeletons (and the attention map) drawn, predictions.json.

    python rtpe/infer.py                                   # newest rtpe checkpoint on built-in val images
    python rtpe/infer.py --checkpoint best.pt --input clip.mp4 --input-size 256
    python rtpe/infer.py --camera 0 [--show]                # live: frames dropped, not queued, when it falls behind
    python rtpe/infer.py --live clip.mp4                    # a video file standing in for a camera (or a stream URL)

The image -> keypoints path lives here (eval.py and benchmark.py use it): letterbox resize so the longer
side is --input-size, normalize, network, sigmoid, associative-embedding grouping with one tag dimension
(higher_hrnet.grouping), map pixels -> original pixels through the exact inverse affine.
"""
from __future__ import annotations

import argparse
import math
import sys

import cv2
import numpy as np
import torch

from common.data import IMAGENET_MEAN, IMAGENET_STD, exit_on_bad_input
from common.drawing import draw_people
from common.export import use_backend
from common.live import open_live_source, run_live
from common.geometry import affine_points
from common.keypoints import COCO17, layout_from_dict
from common.prediction import Predictor as BasePredictor
from common.prediction import make_person, run_inference
from common.runs import add_common_args, at_least, checkpoint_or_exit, model_from_checkpoint, output_dirs, pick_device
from higher_hrnet.grouping import GroupingParams, group_by_tags
from higher_hrnet.infer import builtin_inputs   # the built-in val scenes, the teacher's as well
from higher_hrnet.inference import fold_batchnorm
from rtpe.dataset import MEAN_RGB
from rtpe.loss import HEATMAP_POS_WEIGHT
from rtpe.model import MODEL_NAME, STRIDE, build_model, upgrade_checkpoint

# the seed's parser settings (HM_PARSER_PARAMS): detection 0.1, tag 1.0, 30 people, 5x5 NMS
SEED_GROUPING = dict(detection_threshold=0.1, tag_threshold=1.0, max_num_people=30, nms_kernel=5)


def decoding_settings(input_size):
    """What a Predictor needs besides the weights (train.py stores these in every checkpoint)."""
    return {"stride": STRIDE, "heatmap_pos_weight": HEATMAP_POS_WEIGHT, "input_size": input_size,
            "layout": COCO17.as_dict()}


def calibrated_heatmaps(logits, pos_weight):
    """Heatmaps in [0,1] from the student's logits. Training with BCE pos_weight w moves the optimum
    logit to logit(target) + log(w), which saturates sigmoid(logit) to 1.0 over whole blobs and erases
    the peaks; subtracting log(w) gives back the target's scale (peak ~1, Gaussian flanks)."""
    return torch.sigmoid(logits - math.log(pos_weight))


def prepare_input(image, input_size, multiple=16):
    """Letterbox: scale so the longer side is `input_size`, pad right/bottom to a multiple of 16.
    Returns the (1,3,H,W) normalized tensor and the 2x3 affine original -> input pixels."""
    height, width = image.shape[:2]
    scale = input_size / max(height, width)
    out_w = math.ceil(width * scale / multiple) * multiple
    out_h = math.ceil(height * scale / multiple) * multiple
    to_input = np.float32([[scale, 0, 0], [0, scale, 0]])
    if scale == 1 and (out_w, out_h) == (width, height):
        resized = image
    else:
        resized = cv2.warpAffine(image, to_input, (out_w, out_h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=MEAN_RGB)
    x = resized.astype(np.float32) * np.float32(1 / 255)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None], to_input


def maps_to_people(heatmaps, tags, map_to_image, params):
    """Group (K,h,w) heatmaps in [0,1] and (L,h,w) tags; return keypoints (N,K,3) in original pixels
    (x, y, score) and person scores (N,). map_to_image: 2x3 affine from map pixels to original pixels."""
    people, scores = group_by_tags(heatmaps, tags, params)
    people = np.asarray(people, np.float32)
    if len(people) == 0:
        return np.zeros((0, heatmaps.shape[0], 3), np.float32), np.zeros(0, np.float32)
    # the grouping reports pixel centers at +0.5; our maps put them on integers (map = input / stride)
    xy = people[..., :2] - 0.5
    keypoints = np.concatenate([affine_points(xy, map_to_image), people[..., 2:3]], axis=-1)
    return keypoints, np.asarray(scores, np.float32)


def map_to_original(to_input, stride):
    """Map pixels -> original pixels for an original -> input affine (map = input / stride)."""
    to_input_3 = np.vstack([np.asarray(to_input, np.float64), [0, 0, 1]])
    scale_up = np.diag([stride, stride, 1.0])
    return (np.linalg.inv(to_input_3) @ scale_up)[:2]


class Predictor(BasePredictor):
    """image (RGB uint8) -> people; `run` also gives the segmentation probability at the map's stride.
    Folds BatchNorm and uses channels_last: the path benchmark.py times."""
    model_name = MODEL_NAME

    def __init__(self, model, settings, input_size=None, grouping=None, fold=True, channels_last=True):
        self.model = fold_batchnorm(model) if fold else model.eval()
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input_size = input_size or settings["input_size"]
        self.stride, self.pos_weight = settings["stride"], settings["heatmap_pos_weight"]
        self.layout = layout_from_dict(settings["layout"])
        self.num_joints = model.num_joints
        self.params = GroupingParams(num_joints=self.num_joints, **{**SEED_GROUPING, **(grouping or {})})
        self.last_segmentation = None   # of the last image `predict` saw, for drawing

    @classmethod
    def from_checkpoint(cls, path, device="cpu", input_size=None, **options):
        """options: fold, channels_last (export.py's reference keeps the network as trained)."""
        model, checkpoint = model_from_checkpoint(path, build_model, MODEL_NAME, upgrade_checkpoint, device)
        return cls(model, checkpoint["settings"], input_size, **options)

    @torch.inference_mode()
    def run(self, image):
        """(keypoints (N,K,3) in original pixels, scores (N,), segmentation probability (h, w))."""
        x, to_input = prepare_input(image, self.input_size)
        x = x.to(next(self.model.parameters()).device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        segmentation, keypoint_map = self.model(x)
        k = self.num_joints
        heatmaps = calibrated_heatmaps(keypoint_map[0, :k], self.pos_weight).cpu()
        tags = keypoint_map[0, k:].cpu()
        keypoints, scores = maps_to_people(heatmaps, tags, map_to_original(to_input, self.stride), self.params)
        return keypoints, scores, torch.sigmoid(segmentation[0, 0]).cpu()

    def predict(self, image_rgb):
        keypoints, scores, self.last_segmentation = self.run(image_rgb)
        return [make_person(person[:, :2], person[:, 2], score) for person, score in zip(keypoints, scores)]


def people_to_results(keypoints, scores, image_id, category_id=1):
    return [{"image_id": int(image_id), "category_id": category_id,
             "keypoints": [float(v) for v in person.reshape(-1)], "score": float(score)}
            for person, score in zip(keypoints, scores)]


def drawing(predictor, threshold, attention):
    """Skeletons (and, with --attention, the segmentation attention beside them)."""
    def draw(image, people):
        drawn = draw_people(image, [p.as_array() for p in people], predictor.layout.skeleton, threshold)
        if attention:
            attention_map = cv2.resize(predictor.last_segmentation.numpy(), image.shape[1::-1])
            gray = np.repeat((attention_map[..., None] * 255).astype(np.uint8), 3, 2)
            drawn = np.concatenate([drawn, gray], 1)
        return {"pose": drawn}
    return draw


def main(args):
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python rtpe/train.py", args.out)
    predictor = use_backend(Predictor.from_checkpoint(checkpoint, pick_device(args.device), args.input_size),
                            args.backend, checkpoint, args.onnx)
    out_dir = output_dirs(MODEL_NAME, args.run_name or f"infer-{checkpoint.parent.name}", args.out)["outputs"]
    draw = drawing(predictor, args.threshold, args.attention)
    if args.camera is not None or args.live:
        return run_live(predictor, open_live_source(args.camera, args.live), out_dir, draw, args.show)
    return run_inference(predictor, args.input or builtin_inputs(args), out_dir, checkpoint, draw, args.limit)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, role="infer", threshold=0.2)
    p.add_argument("--input-size", type=at_least(1), default=None,
                   help="longer input side (default: the checkpoint's validation size)")
    p.add_argument("--attention", action="store_true", help="also draw the segmentation attention map")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main, parse_args()))
