"""The built-in multi-person data (higher_hrnet and rtpe train on it): COCO-17 scenes rendered from a seed with
common.synthetic's figures, people sized like COCO's keypoint-annotated people, crowds, unlabelled far-away
people, occluders and border cuts. `ensure_scenes(root)` renders them once into <root>/data/multi_person.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from common.synthetic import (Canvas, camera_noise, coco_annotation, draw_occluder, ensure_dataset, image_rng,
                              random_background, random_human_figure, render_in_order, write_coco, write_image)

SCENE_DEFAULTS = dict(num_images=1500, num_val=200, image_size=256, seed=0)
# sqrt(area) / short image side of keypoint-annotated people (num_keypoints > 0, not crowd): the OKS
# tolerance scales with sqrt(area), so this fixes how strict COCO AP is. COCO: the 12 such people of
# ../shared/data/coco_sample (4 val2017 images) have 10th / 50th / 90th percentiles 0.125 / 0.304 / 0.340.
# The built-in scenes must stay inside these bands (tested on the rendered val split).
COCO_RELATIVE_SIZE_BANDS = {10: (0.09, 0.17), 50: (0.26, 0.34), 90: (0.30, 0.42)}


def ensure_scenes(root=None, **params):
    """<root>/data/multi_person with images/{train,val} and annotations/person_keypoints_{train,val}.json,
    rendered on first use (params override SCENE_DEFAULTS: num_images, num_val, image_size, seed)."""
    return ensure_dataset("multi_person", build_multi_person_scenes, SCENE_DEFAULTS, root, **params)


def relative_person_sizes(coco_dict):
    """sqrt(area) / short image side of every keypoint-annotated, non-crowd person of a COCO dict."""
    sides = {image["id"]: min(image["width"], image["height"]) for image in coco_dict["images"]}
    return np.array([math.sqrt(a["area"]) / sides[a["image_id"]] for a in coco_dict["annotations"]
                     if a.get("num_keypoints", 0) > 0 and not a.get("iscrowd", 0)])


def place_people(rng, canvas, S):
    """Draw a scene's people: maybe a crowd (owner 254), a few unlabelled far-away people, then 0-6 labelled
    ones back to front. Returns (unlabelled, labelled) indices into canvas.people (None: off the image)."""
    if rng.random() < 0.08:  # a dense knot of small people, annotated once as an iscrowd region
        cx, cy, w = rng.uniform(0.2, 0.8) * S, rng.uniform(0.3, 0.8) * S, rng.uniform(0.2, 0.4) * S
        for _ in range(rng.integers(6, 15)):
            h = rng.uniform(0.06, 0.12) * S
            center = (cx + rng.uniform(-w, w) / 2, cy + rng.normal(0, 0.1 * h))
            canvas.add(random_human_figure(rng, h, center).rounded(), owner_id=254)
    # far-away people too small to label: COCO's zero-keypoint annotations
    unlabelled = [canvas.add(random_human_figure(rng, rng.uniform(0.04, 0.09) * S, rng.uniform(0, S, 2))
                             .rounded()) for _ in range(rng.integers(1, 4) if rng.random() < 0.2 else 0)]
    u = rng.random()
    count = 0 if u < 0.07 else 1 if u < 0.25 else 2 if u < 0.45 else int(rng.integers(3, 7))
    # Figure heights (of the image side): most people near the camera, a tail of smaller ones. Calibrated
    # so that sqrt(area) / image side of the labelled people matches COCO's keypoint-annotated people
    # (median 0.30, 10th percentile 0.13; see COCO_RELATIVE_SIZE_BANDS). Figures taller than the image are
    # cut by the border, as close-ups are in COCO.
    scale = 1.1 * (1 - 0.7 * rng.beta(1.5, 3))
    heights = np.clip(scale * rng.uniform(0.85, 1.15, count), 0.1, 1.4) * S
    if count >= 3:  # a group side by side, neighbors overlapping, the ends maybe cut by the border
        spacing = rng.uniform(0.3, 0.65, count) * heights
        xs = np.cumsum(spacing) - spacing.sum() / 2 + rng.uniform(0.25, 0.75) * S
        centers = np.stack([xs, rng.uniform(0.35, 0.65) * S + rng.normal(0, 0.08, count) * heights], 1)
    else:
        centers = np.stack([rng.uniform(0.05, 0.95, count) * S, rng.uniform(0.25, 0.75, count) * S], 1)
    labelled = [canvas.add(random_human_figure(rng, heights[k], centers[k]).rounded())
                for k in np.argsort(heights + rng.normal(0, 0.1 * S, count))]  # taller people are usually nearer
    return unlabelled, labelled


def render_scene(rng, size):
    """One multi-person scene: RGB image and its COCO annotations (without ids)."""
    canvas = Canvas(random_background(rng, (size, size)))
    unlabelled, labelled = place_people(rng, canvas, size)
    drawn = [index for index in labelled if index is not None]
    if drawn and rng.random() < 0.2:  # an object in front of someone's joint
        fig = canvas.people[drawn[rng.integers(len(drawn))]]["fig"]
        size = rng.uniform(0.1, 0.25) * fig.height
        draw_occluder(rng, canvas.image, canvas.owner, fig.points[rng.integers(17)], size)
    annotations = []
    for index in unlabelled + labelled:
        if index is None:
            continue
        person = canvas.people[index]
        (x0, y0), (h, w) = person["origin"], person["labels"].shape
        visible = canvas.owner[y0:y0 + h, x0:x0 + w] == person["owner_id"]
        if not visible.any():
            continue
        kps = np.zeros((17, 3), np.int64)
        if index in labelled:
            kps[:, :2], kps[:, 2] = person["fig"].points[:17], canvas.visibility(index)[:17]
            kps[kps[:, 2] == 0] = 0
        annotations.append(coco_annotation(visible, kps, (kps[:, 2] > 0).sum(), 0, (x0, y0)))
    if (canvas.owner == 254).any():
        annotations.append(coco_annotation(canvas.owner == 254, np.zeros((17, 3), np.int64), 0, 1))
    return camera_noise(rng, canvas.image), annotations


def _scene_item(image_dir, split, image_size, seed, i):
    image, anns = render_scene(image_rng(seed, split, i), image_size)
    return write_image(image_dir, i + 1, image, image_size), anns


def build_multi_person_scenes(root, split, num_images, image_size=256, seed=0, progress=False, workers=None):
    """Render `num_images` scenes into root/images/{split}/%06d.jpg (the image id) and write
    root/annotations/person_keypoints_{split}.json (COCO keypoints). Returns the JSON path."""
    root = Path(root)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    items = render_in_order(functools.partial(_scene_item, image_dir, split, image_size, seed), num_images,
                            workers, f"multi_person {split}", progress)
    images, annotations = [], []
    for image, anns in items:
        images.append(image)
        # ids from 1: pycocotools' COCOeval treats annotation id 0 as "unmatched"
        annotations += [{"id": len(annotations) + k, "image_id": image["id"], **ann} for k, ann in enumerate(anns, 1)]
    path = root / "annotations" / f"person_keypoints_{split}.json"
    write_coco(path, f"posezoo synthetic multi-person scenes, seed {seed}", images, annotations)
    return path
