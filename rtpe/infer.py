"""Run the rtpe student on an image, a folder or a video: skeletons (and the attention map) drawn, JSON out.

    python rtpe/infer.py                                   # newest rtpe checkpoint on built-in val images
    python rtpe/infer.py --checkpoint best.pt --input clip.mp4 --input-size 256

The image -> keypoints path lives here (eval.py and benchmark.py use it): letterbox resize so the longer
side is --input-size, normalise, network, sigmoid, associative-embedding grouping with one tag dimension
(higher_hrnet.grouping), map pixels -> original pixels through the exact inverse affine.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from common.data import BadImageError, exit_on_bad_input, iter_inputs
from common.geometry import affine_points
from higher_hrnet.grouping import GroupingParams, group_by_tags
from rtpe.model import IMAGENET_MEAN, IMAGENET_STD, RealtimePoseStudent, fold_batchnorm

STRIDE = 4
HEATMAP_POS_WEIGHT = 100.0  # the keypoint loss's BCE pos_weight (train.py)
MEAN_RGB = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)
# the seed's parser settings (HM_PARSER_PARAMS): detection 0.1, tag 1.0, 30 people, 5x5 NMS
SEED_GROUPING = dict(detection_threshold=0.1, tag_threshold=1.0, max_num_people=30, nms_kernel=5)


def calibrated_heatmaps(logits, pos_weight=HEATMAP_POS_WEIGHT):
    """Heatmaps in [0,1] from the student's logits. Training with BCE pos_weight w moves the optimum
    logit to logit(target) + log(w), which saturates sigmoid(logit) to 1.0 over whole blobs and erases
    the peaks; subtracting log(w) gives back the target's scale (peak ~1, Gaussian flanks)."""
    return torch.sigmoid(logits - math.log(pos_weight))


def prepare_input(image, input_size, multiple=16):
    """Letterbox: scale so the longer side is `input_size`, pad right/bottom to a multiple of 16.
    Returns the (1,3,H,W) normalised tensor and the 2x3 affine original -> input pixels."""
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
    x = (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None], to_input


def maps_to_people(heatmaps, tags, map_to_image, params):
    """Group (K,h,w) heatmaps in [0,1] and (L,h,w) tags; return keypoints (N,K,3) in original pixels
    (x, y, score) and person scores (N,). map_to_image: 2x3 affine from map pixels to original pixels."""
    people, scores = group_by_tags(heatmaps, tags, params)
    people = np.asarray(people, np.float32)
    if len(people) == 0:
        return np.zeros((0, heatmaps.shape[0], 3), np.float32), np.zeros(0, np.float32)
    # the grouping reports pixel centres at +0.5; our maps put them on integers (map = input / 4)
    xy = people[..., :2] - 0.5
    keypoints = np.concatenate([affine_points(xy, map_to_image), people[..., 2:3]], axis=-1)
    return keypoints, np.asarray(scores, np.float32)


def map_to_original(to_input):
    """Map pixels -> original pixels for an original -> input affine (map = input / 4)."""
    to_input_3 = np.vstack([np.asarray(to_input, np.float64), [0, 0, 1]])
    scale_up = np.diag([STRIDE, STRIDE, 1.0])
    return (np.linalg.inv(to_input_3) @ scale_up)[:2]


class Predictor:
    """image (RGB uint8) -> (keypoints (N,K,3) in original pixels, scores (N,), segmentation probability
    at stride 4). Folds BatchNorm and uses channels_last: the path benchmark.py times."""

    def __init__(self, model, input_size=256, grouping=None, fold=True, channels_last=True):
        self.model = fold_batchnorm(model) if fold else model.eval()
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input_size = input_size
        self.num_joints = model.num_joints
        self.params = GroupingParams(num_joints=self.num_joints, **{**SEED_GROUPING, **(grouping or {})})

    @torch.inference_mode()
    def __call__(self, image):
        x, to_input = prepare_input(image, self.input_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        segmentation, keypoint_map = self.model(x)
        k = self.num_joints
        heatmaps = calibrated_heatmaps(keypoint_map[0, :k])
        tags = keypoint_map[0, k:]
        keypoints, scores = maps_to_people(heatmaps, tags, map_to_original(to_input), self.params)
        return keypoints, scores, torch.sigmoid(segmentation[0, 0])


def people_to_results(keypoints, scores, image_id, category_id=1):
    return [{"image_id": int(image_id), "category_id": category_id,
             "keypoints": [float(v) for v in person.reshape(-1)], "score": float(score)}
            for person, score in zip(keypoints, scores)]


def load_student(path):
    """A student from an rtpe checkpoint (its config says preset/colour)."""
    from common.engine import load_checkpoint

    state = load_checkpoint(path)
    config = state.get("config", {})
    model = RealtimePoseStudent(config.get("preset", "light"), config.get("colour", "lab"),
                                config.get("num_joints", 17))
    # the stem stage's 1x1 adapter only exists for training
    model.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith("stem_adapter.")})
    return model.eval()


def default_checkpoint(args):
    from common.engine import checkpoint_or_exit

    return checkpoint_or_exit(args.checkpoint, "rtpe", "python rtpe/train.py", args.out)


def main(args):
    from common.drawing import draw_people
    from common.engine import output_dirs
    from common.keypoints import COCO17
    from common.synthetic import ensure_dataset

    checkpoint = default_checkpoint(args)
    predictor = Predictor(load_student(checkpoint), args.input_size)
    source = args.input or str(Path(ensure_dataset("multi_person", root=args.out)) / "images" / "val")
    out_dir = output_dirs("rtpe", args.run_name or "infer", args.out)["outputs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    records, writer, count = [], None, 0
    is_video = Path(source).suffix.lower() in {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
    if is_video:
        from common.data import VideoWriter, video_properties
        writer = VideoWriter(out_dir / (Path(source).stem + "_rtpe.mp4"), video_properties(source)[0])
    for name, image in iter_inputs(source):
        if args.limit and count >= args.limit:
            break
        try:
            keypoints, scores, segmentation = predictor(image)
        except BadImageError as error:
            print(error)
            continue
        drawn = draw_people(image, keypoints, COCO17.skeleton, threshold=args.draw_threshold)
        if args.attention:
            attention = cv2.resize(segmentation.numpy(), image.shape[1::-1])
            drawn = np.concatenate([drawn, np.repeat((attention[..., None] * 255).astype(np.uint8), 3, 2)], 1)
        if writer is not None:
            writer.write(drawn)
        else:
            cv2.imwrite(str(out_dir / (Path(name).stem + "_rtpe.jpg")), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        records.append({"name": str(name), "people": [{"keypoints": p.round(2).tolist(), "score": float(s)}
                                                      for p, s in zip(keypoints, scores)]})
        count += 1
    if writer is not None:
        writer.close()
    (out_dir / "keypoints.json").write_text(json.dumps(records))
    print(f"{count} inputs with {checkpoint}; drawings and keypoints.json written to {out_dir}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None, help="image, folder or video (default: built-in val images)")
    p.add_argument("--checkpoint", default=None, help="rtpe checkpoint (default: the newest)")
    p.add_argument("--input-size", type=int, default=256, help="longer input side (default: %(default)s)")
    p.add_argument("--draw-threshold", type=float, default=0.2,
                   help="joints scoring below this are not drawn (default: %(default)s)")
    p.add_argument("--attention", action="store_true", help="also draw the segmentation attention map")
    p.add_argument("--limit", type=int, default=0, help="stop after N inputs; 0 = all (default: %(default)s)")
    p.add_argument("--run-name", default=None, help="output folder name under outputs/rtpe/ (default: infer)")
    p.add_argument("--out", default=None, help="output root (default: $POSE_OUTPUT_ROOT, else .)")
    return p.parse_args(argv)


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
