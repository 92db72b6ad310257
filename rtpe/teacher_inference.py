"""Compute the teacher's predictions once and cache them for distillation.

    python rtpe/teacher_inference.py                          # built-in val+train scenes, best teacher found
    python rtpe/teacher_inference.py -I img1.jpg img2.jpg -o cache/ -m models/pose_higher_hrnet_w48_640.pth.tar
    python rtpe/teacher_inference.py --data DIR --ann person_keypoints_val2017.json --teacher oracle

Cache layout: <cache>/<split>/<image stem>.npz (uncompressed; heatmaps (17,h,w) float16 at stride 4 of the
teacher input, tags (17 or 1,h,w) float16, affine (2,3) float32 original pixels -> map pixels, image_size
(W,H)) and <cache>/<split>/index.json (teacher, weights file and its sha256, settings, image -> file).
Teachers: a higher_hrnet checkpoint (official W32/W48 file or ours) or `oracle` (ground truth rendered
as heatmaps and per-person tags, so the whole pipeline runs without a trained teacher).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from common.data import IMAGENET_MEAN, IMAGENET_STD, exit_on_bad_input, load_coco_keypoints, read_image, sha256_of
from common.heatmaps import make_heatmaps
from common.runs import data_dir, load_tensors, newest_checkpoint
from higher_hrnet.checkpoints import checkpoint_width, load_official_checkpoint, read_state_dict
from higher_hrnet.model import MODEL_NAME as TEACHER_MODEL_NAME
from higher_hrnet.model import build_model as build_teacher
from higher_hrnet.scenes import ensure_scenes

DEFAULT_WEIGHTS = "models/pose_higher_hrnet_w48_640.pth.tar"  # the seed's default teacher file
ORACLE_SIGMA = 2.0          # HigherHRNet's target spread, so the oracle looks like the teacher
ORACLE_TAG_RADIUS = 2       # map pixels around each joint painted with the person's tag
CACHE_VERSION = 1


def map_affine(scale):
    """Original pixels -> stride-4 map pixels for an image resized by `scale` (pixel centers on integers)."""
    return np.array([[scale / 4, 0, 0], [0, scale / 4, 0]], np.float32)


def people_keypoints(coco, image_id, num_joints=17):
    """(P, K, 3) keypoints of the image's non-crowd people with at least one labelled joint."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
    people = [np.asarray(a["keypoints"], np.float32).reshape(num_joints, 3) for a in anns
              if a.get("num_keypoints", 0) > 0]
    return np.stack(people) if people else np.zeros((0, num_joints, 3), np.float32)


def render_oracle(keypoints, image_size, scale=1.0, num_joints=17):
    """Ground truth as teacher output: Gaussian heatmaps (K,h,w) and one tag map (1,h,w) where the
    pixels around person p's joints hold the value p + 1 (tags separate people exactly)."""
    width, height = image_size
    affine = map_affine(scale)
    map_w, map_h = math.ceil(width * scale / 4), math.ceil(height * scale / 4)
    joints = keypoints.copy()
    # A joint exactly halfway between two map pixels (a quarter of integer image coordinates at stride 4)
    # gives both the same value, both survive the 5x5 NMS and the person is found twice; a 0.02-pixel
    # nudge (0.08 image pixels) makes the top-left one win by more than float16 rounding.
    joints[..., :2] = joints[..., :2] * affine[0, 0] - 0.02
    heatmaps, _ = make_heatmaps(joints, (map_w, map_h), ORACLE_SIGMA, center="subpixel")
    tags = nearest_person_tags(joints, (map_w, map_h))
    return heatmaps, tags, affine


def nearest_person_tags(joints, map_size, radius=ORACLE_TAG_RADIUS):
    """(1,h,w) tag map: each pixel within `radius` of some labelled joint holds (index + 1) of the person
    owning the nearest joint, so crowded people do not overwrite each other's tags."""
    width, height = map_size
    tags = np.zeros((1, height, width), np.float32)
    labelled = joints[..., 2] > 0
    if not labelled.any():
        return tags
    owners = np.nonzero(labelled)[0] + 1.0
    points = joints[labelled][:, :2]
    ys, xs = np.mgrid[0:height, 0:width]
    distance = (xs[None] - points[:, 0, None, None]) ** 2 + (ys[None] - points[:, 1, None, None]) ** 2
    nearest = distance.argmin(axis=0)
    tags[0] = np.where(distance.min(axis=0) <= radius ** 2, owners[nearest], 0)
    return tags


class HigherHRNetTeacher:
    """A higher_hrnet checkpoint run at one scale, no flip: heatmaps = mean of the 1/4 output and the 1/2
    output resized to 1/4 (the official averaging, kept at stride 4), tags = the 1/4 tag channels."""

    def __init__(self, weights, input_size=None, device="cpu"):
        self.weights = Path(weights)
        if not self.weights.is_file():
            raise SystemExit(f"{weights}: teacher weights not found (use --teacher oracle, or give -m PATH)")
        state = read_state_dict(self.weights)
        width = checkpoint_width(state)
        quarter_out = [v for k, v in state.items() if k.startswith("final_layers.0") and k.endswith("weight")]
        num_joints = 17
        tag_per_joint = quarter_out[0].shape[0] == 2 * num_joints if quarter_out else True
        self.model = build_teacher(width, num_joints, tag_per_joint)
        load_official_checkpoint(self.model, state)
        self.model.eval().to(device)
        self.device, self.num_joints = device, num_joints
        self.input_size = input_size or self._input_size_from(self.weights) or 640
        self.settings = {"width": width, "tag_per_joint": tag_per_joint, "input_size": self.input_size,
                         "flip": False, "scales": [1]}

    @staticmethod
    def _input_size_from(path):
        try:
            config = load_tensors(path).get("config", {})
        except Exception:
            return None
        return config.get("input_size") if isinstance(config, dict) else None

    @torch.no_grad()
    def __call__(self, image):
        height, width = image.shape[:2]
        scale = self.input_size / min(height, width)
        content_w, content_h = round(width * scale), round(height * scale)
        padded_w, padded_h = math.ceil(content_w / 64) * 64, math.ceil(content_h / 64) * 64
        # warp with the exact affine we store (pixel centers on integers); padding stays at the right/bottom
        resized = cv2.warpAffine(image, np.float32([[scale, 0, 0], [0, scale, 0]]), (padded_w, padded_h),
                                 flags=cv2.INTER_LINEAR, borderValue=0)
        x = torch.from_numpy(resized).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        x = ((x - mean) / std)[None].to(self.device)
        quarter, half = self.model(x)
        k = self.num_joints
        half_small = torch.nn.functional.interpolate(half, size=quarter.shape[-2:], mode="bilinear",
                                                     align_corners=False)
        heatmaps = ((quarter[:, :k] + half_small) / 2)[0].clamp(0, 1)
        tags = quarter[0, k:]
        return heatmaps.cpu().numpy(), tags.cpu().numpy(), map_affine(scale)


def write_entry(path, heatmaps, tags, affine, image_size):
    np.savez(path, heatmaps=heatmaps.astype(np.float16), tags=tags.astype(np.float16),
             affine=np.asarray(affine, np.float32), image_size=np.asarray(image_size, np.int32))


def read_entry(path):
    """One cached image: dict of heatmaps, tags (float32), affine (2,3), image_size (W,H)."""
    try:
        with np.load(path) as data:
            return {"heatmaps": data["heatmaps"].astype(np.float32), "tags": data["tags"].astype(np.float32),
                    "affine": data["affine"].astype(np.float64), "image_size": data["image_size"]}
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: unreadable teacher cache entry ({error})") from None


def read_index(split_dir):
    path = Path(split_dir) / "index.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def describe_teacher(teacher):
    if teacher == "oracle":
        return {"teacher": "oracle", "weights": None, "sha256": None,
                "settings": {"sigma": ORACLE_SIGMA, "tag_radius": ORACLE_TAG_RADIUS}}
    return {"teacher": "higher_hrnet", "weights": str(teacher.weights), "sha256": sha256_of(teacher.weights),
            "settings": teacher.settings}


def build_cache(split_dir, items, teacher, coco=None, oracle_scale=1.0):
    """items: list of (name, image path, image id or None). Writes one npz per item + index.json.
    Entries already listed in a matching index are kept (a rerun only fills in what is missing)."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    header = {"version": CACHE_VERSION, **describe_teacher(teacher)}
    if teacher == "oracle":
        header["settings"]["scale"] = oracle_scale
    old = read_index(split_dir)
    done = dict(old["images"]) if old and {k: old.get(k) for k in header} == header else {}
    images = {}
    for name, image_path, image_id in tqdm(items, desc=f"teacher cache {split_dir.name}"):
        entry = Path(name).stem + ".npz"
        if done.get(name) == entry and (split_dir / entry).is_file():
            images[name] = entry
            continue
        if teacher == "oracle":
            if coco is None or image_id is None:
                raise SystemExit("the oracle teacher needs annotations (--data/--ann)")
            info = coco.loadImgs(image_id)[0]
            size = (info["width"], info["height"])
            heatmaps, tags, affine = render_oracle(people_keypoints(coco, image_id), size, oracle_scale)
        else:
            image = read_image(image_path)
            size = (image.shape[1], image.shape[0])
            heatmaps, tags, affine = teacher(image)
        write_entry(split_dir / entry, heatmaps, tags, affine, size)
        images[name] = entry
    (split_dir / "index.json").write_text(json.dumps({**header, "images": images}, indent=1))
    return split_dir


def coco_items(coco, image_dir):
    return [(info["file_name"], Path(image_dir) / info["file_name"], info["id"])
            for info in coco.loadImgs(sorted(coco.getImgIds()))]


def make_teacher(spec, input_size=None, device="cpu", out=None):
    """spec: 'oracle', 'auto' (newest built-in higher_hrnet checkpoint, else oracle) or a weights path."""
    if spec == "auto":
        found = newest_checkpoint(TEACHER_MODEL_NAME, out)
        if found is None:
            print("teacher: oracle (no built-in higher_hrnet checkpoint found; train one with "
                  "`python higher_hrnet/train.py` to distil from a real teacher)")
            return "oracle"
        print(f"teacher: higher_hrnet checkpoint {found}")
        spec = str(found)
    if spec == "oracle":
        return "oracle"
    return HigherHRNetTeacher(spec, input_size=input_size, device=device)


def ensure_builtin_cache(teacher_spec="auto", out=None, device="cpu"):
    """Teacher cache for both splits of the built-in multi-person scenes; returns (cache root, teacher name)."""
    data = Path(ensure_scenes(out))
    teacher = make_teacher(teacher_spec, device=device, out=out)
    name = "oracle" if teacher == "oracle" else f"higher_hrnet-{sha256_of(teacher.weights)[:12]}"
    cache = data_dir(out) / "rtpe_teacher_cache" / name
    for split in ("train", "val"):
        coco = load_coco_keypoints(data / "annotations" / f"person_keypoints_{split}.json")
        build_cache(cache / split, coco_items(coco, data / "images" / split), teacher, coco)
    return cache, name


def main(args):
    device = "cpu" if args.force_cpu or not torch.cuda.is_available() else "cuda"
    if args.input_paths:
        teacher = make_teacher(args.teacher if args.teacher != "auto" else args.model_path,
                               args.input_size, device, args.out)
        if teacher == "oracle":
            raise SystemExit("the oracle teacher needs annotations: use --data/--ann instead of -I")
        out_dir = Path(args.out_dir or "teacher_cache") / (args.split or "images")
        items = [(Path(p).name, Path(p), None) for p in args.input_paths]
        build_cache(out_dir, items, teacher)
        print(f"teacher cache written to {out_dir}")
        return
    if args.data is None and args.ann is None:
        cache, name = ensure_builtin_cache(args.teacher, args.out, device)
        print(f"teacher cache ({name}) written to {cache}")
        return
    data = Path(args.data or ".")
    split = args.split or "val2017"
    ann = Path(args.ann) if args.ann else data / "annotations" / f"person_keypoints_{split}.json"
    coco = load_coco_keypoints(ann)
    teacher = make_teacher(args.teacher if args.teacher != "auto" else args.model_path,
                           args.input_size, device, args.out)
    out_dir = Path(args.out_dir or (data / "teacher_cache")) / split
    image_dir = data / "images" / split if (data / "images" / split).is_dir() else data / split
    build_cache(out_dir, coco_items(coco, image_dir), teacher, coco)
    print(f"teacher cache written to {out_dir}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-I", "--input_paths", nargs="+", default=None, help="images to run the teacher on")
    p.add_argument("-o", "--out_dir", default=None, help="cache root; a <split>/ folder is made inside")
    p.add_argument("-m", "--model_path", default=DEFAULT_WEIGHTS,
                   help="teacher weights: official HigherHRNet file or ours (default: %(default)s)")
    p.add_argument("-C", "--force_cpu", action="store_true", help="run on CPU even if CUDA is present")
    p.add_argument("--teacher", default="auto",
                   help="oracle, a weights path, or auto: for the built-in data the newest higher_hrnet "
                        "checkpoint else oracle; with -I/--data the -m file (default: %(default)s)")
    p.add_argument("--data", default=None, help="COCO-style folder with images/<split>/ and annotations/")
    p.add_argument("--ann", default=None, help="COCO keypoint annotation file of the split")
    p.add_argument("--split", default=None, help="split name (default: val2017 with --data)")
    p.add_argument("--input-size", type=int, default=None,
                   help="teacher input short side (default: the checkpoint's, else 640)")
    p.add_argument("--out", default=None, help="output root for the built-in data and cache")
    return p.parse_args(argv)


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
