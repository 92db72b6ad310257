"""Bottom-up training samples for HigherHRNet from COCO-format keypoint files (COCO, CrowdPose, built-in scenes).

Follows the official COCOKeypoints + transforms: ignore mask from crowd regions and zero-keypoint people,
random affine (rotation, scale of the short side, translation), horizontal flip with the layout's flip
index, heatmaps (sigma 2, truncated centers) at 1/4 and 1/2 of the input, warped padding ignored.
    python higher_hrnet/dataset.py --show 8        # grid of augmented samples with targets drawn
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from common.data import IMAGENET_MEAN, IMAGENET_STD, drop_outside, load_coco_keypoints, normalize_image, read_image
from common.drawing import draw_heatmap_overlay, show_samples
from common.geometry import affine_points, get_affine_transform, warp_image
from common.heatmaps import HeatmapCodec
from common.keypoints import COCO17, COCO_SIGMAS, make_layout
from common.loader import collate_skip_bad
from common.runs import output_dirs
from higher_hrnet.scenes import ensure_scenes

TARGET_SIGMA = 2.0  # the official heatmap sigma, in output pixels at both resolutions
# CrowdPose's evaluation sigmas (its cocoeval fork): COCO body points plus head and neck.
CROWDPOSE14 = make_layout(
    "crowdpose14",
    ["left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
     "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head", "neck"],
    [(12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (13, 6), (13, 7), (6, 8), (8, 10),
     (7, 9), (9, 11)],
    {**COCO_SIGMAS, "head": 0.079, "neck": 0.079})
LAYOUTS = (COCO17, CROWDPOSE14)   # what --layout may name


def target_codecs(input_size, sigma=TARGET_SIGMA, center="truncate"):
    """The targets' owners at 1/4 and 1/2 of the square input: truncated centers, as the official generator."""
    return [HeatmapCodec((input_size, input_size), (input_size // s, input_size // s), sigma, center) for s in (4, 2)]


def ignore_mask(coco, image_id, annotations, height, width):
    """1 where the loss counts, 0 on crowd regions and on people annotated with zero keypoints."""
    ignored = np.zeros((height, width), np.float32)
    for ann in annotations:
        if not (ann.get("iscrowd", 0) or ann.get("num_keypoints", 0) == 0):
            continue
        segmentation = ann.get("segmentation")
        if not segmentation:
            continue
        if isinstance(segmentation, list):
            rles = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation.get("counts"), list):
            rles = [mask_utils.frPyObjects(segmentation, height, width)]
        else:
            rles = [segmentation]
        for rle in rles:
            ignored += mask_utils.decode(rle).astype(np.float32)
    return (ignored < 0.5).astype(np.float32)


def tag_rows(joints, map_size, tag_per_joint=True):
    """(person, flat index) int64 rows for the AE loss: labelled joints whose truncated position lies on
    the (W, H) map, index = joint * H * W + y * W + x (y * W + x for one shared tag map); by person,
    then joint."""
    width, height = map_size
    joints = np.asarray(joints)
    if joints.size == 0:
        return np.zeros((0, 2), np.int64)
    x, y = np.trunc(joints[..., 0]), np.trunc(joints[..., 1])
    ok = (joints[..., 2] > 0) & (x >= 0) & (y >= 0) & (x < width) & (y < height)
    person, joint = np.nonzero(ok)
    flat = y[ok].astype(np.int64) * width + x[ok].astype(np.int64)
    if tag_per_joint:
        flat = flat + joint * height * width
    return np.stack([person, flat], axis=1).astype(np.int64)


class BottomUpDataset(torch.utils.data.Dataset):
    """COCO keypoint images as square augmented crops with multi-resolution targets.

    Each sample: image (3, S, S) normalized; heatmaps_i (K, R_i, R_i) and mask_i (R_i, R_i) for
    R = S/4, S/2; tag_rows (M, 2) int64 (person, flat index on the 1/4 map); image_id.
    """

    def __init__(self, image_dir, ann_file, input_size=512, layout=COCO17, sigma=TARGET_SIGMA, augment=True,
                 max_rotation=30.0, min_scale=0.75, max_scale=1.5, max_translate=40, flip=0.5,
                 tag_per_joint=True):
        self.image_dir = Path(image_dir)
        self.coco = load_coco_keypoints(ann_file, layout.num_keypoints)
        self.ids = sorted(self.coco.getImgIds())
        self.input_size = input_size
        self.codecs = target_codecs(input_size, sigma)
        self.output_sizes = tuple(codec.heatmap_size[0] for codec in self.codecs)
        self.layout, self.sigma, self.augment = layout, sigma, augment
        self.max_rotation, self.min_scale, self.max_scale = max_rotation, min_scale, max_scale
        self.max_translate, self.flip, self.tag_per_joint = max_translate, flip, tag_per_joint

    def __len__(self):
        return len(self.ids)

    def load(self, index):
        """Image, labelled joints (P, K, 3), ignore mask for the index-th image (no augmentation)."""
        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        image = read_image(self.image_dir / info["file_name"])
        height, width = image.shape[:2]
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        mask = ignore_mask(self.coco, image_id, annotations, height, width)
        people = [a for a in annotations if not a.get("iscrowd", 0) and a.get("num_keypoints", 0) > 0]
        joints = np.array([a["keypoints"] for a in people], np.float32).reshape(-1, self.layout.num_keypoints, 3)
        return image, drop_outside(joints, width, height), mask

    def random_transform(self, height, width):
        """(center, box side, rotation, flip): the official RandomAffineTransform with scale_type 'short'."""
        center = np.array([width / 2.0, height / 2.0])
        box = min(height, width)
        if not self.augment:
            return center, box, 0.0, False
        box *= np.random.uniform(self.min_scale, self.max_scale)
        rotation = np.random.uniform(-1, 1) * self.max_rotation
        if self.max_translate > 0:
            # official: +-max_translate pixels per 200 pixels of box
            limit = int(self.max_translate * box / 200.0)
            center += np.random.randint(-limit, limit + 1, size=2) if limit > 0 else 0
        return center, box, rotation, np.random.random() < self.flip

    def __getitem__(self, index):
        image, joints, mask = self.load(index)
        height, width = image.shape[:2]
        center, box, rotation, flip = self.random_transform(height, width)
        size = self.input_size
        matrix = get_affine_transform(center, (box, box), rotation, (size, size))
        image = warp_image(image, matrix, (size, size))
        if flip:
            image = np.ascontiguousarray(image[:, ::-1])
        sample = {"image": normalize_image(image), "image_id": self.ids[index]}
        for i, res in enumerate(self.output_sizes):
            m = get_affine_transform(center, (box, box), rotation, (res, res))
            # warped padding comes out 0: outside the image nothing is learnt (official behaviour)
            warped_mask = (warp_image((mask * 255).astype(np.uint8), m, (res, res)) / 255.0 > 0.5).astype(np.float32)
            points = affine_points(joints, m) if len(joints) else joints.copy()
            if flip:
                warped_mask = np.ascontiguousarray(warped_mask[:, ::-1])
                if len(points):
                    points = points[:, self.layout.flip_index]
                    points[..., 0] = res - points[..., 0] - 1
            heatmaps, _ = self.codecs[i].encode(points)
            sample[f"heatmaps_{i}"] = torch.from_numpy(heatmaps)
            sample[f"mask_{i}"] = torch.from_numpy(warped_mask)
            if i == 0:
                sample["tag_rows"] = torch.from_numpy(tag_rows(points, (res, res), self.tag_per_joint))
                sample["joints"] = points
        del sample["joints"]
        return sample


def collate_bottom_up(samples):
    """Stack tensors; turn per-sample tag rows into batch rows (sample, person id unique in batch, index)."""
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0] if key.startswith(("image", "heatmaps", "mask"))
             and key != "image_id"}
    batch["image_id"] = torch.tensor([s["image_id"] for s in samples])
    rows, offset = [], 0
    for i, s in enumerate(samples):
        r = s["tag_rows"]
        if len(r):
            rows.append(torch.stack([torch.full_like(r[:, 0], i), r[:, 0] + offset, r[:, 1]], dim=1))
            offset += int(r[:, 0].max()) + 1
    batch["tag_index"] = torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.long)
    return batch


collate_skip_bad_bottom_up = functools.partial(collate_skip_bad, collate=collate_bottom_up)


def draw_sample(sample, layout=COCO17):
    """RGB picture of a sample: the input with its 1/2 heatmaps overlaid and the ignored area darkened."""
    image = sample["image"].numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    image = (image.clip(0, 1) * 255).astype(np.uint8)
    picture = draw_heatmap_overlay(image, sample["heatmaps_1"].numpy(), alpha=0.5)
    mask = cv2.resize(sample["mask_1"].numpy(), picture.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    return (picture * (0.35 + 0.65 * mask[..., None])).astype(np.uint8)


def main(args):
    if args.data is None:
        root = ensure_scenes(args.out)
        image_dir, ann = root / "images" / "train", root / "annotations" / "person_keypoints_train.json"
    else:
        image_dir, ann = Path(args.data), Path(args.ann)
    dataset = BottomUpDataset(image_dir, ann, args.input_size)
    rng = np.random.default_rng(args.seed)
    pictures = []
    for index in rng.choice(len(dataset), size=min(args.show, len(dataset)), replace=False):
        np.random.seed(int(rng.integers(1 << 31)))
        pictures.append(draw_sample(dataset[int(index)]))
    path = show_samples(pictures, output_dirs("higher_hrnet", "show", args.out)["outputs"] / "samples.jpg")
    print(f"wrote {len(pictures)} samples to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", type=int, default=8, help="number of augmented samples to draw (default: %(default)s)")
    parser.add_argument("--data", default=None, help="image folder (default: built-in multi-person scenes)")
    parser.add_argument("--ann", default=None, help="COCO keypoint JSON for --data")
    parser.add_argument("--input-size", type=int, default=256, help="square input side (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output root (default: $POSE_OUTPUT_ROOT, else .)")
    parser.add_argument("--seed", type=int, default=0, help="which samples and augmentations (default: %(default)s)")
    main(parser.parse_args())
