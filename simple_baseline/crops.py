"""The built-in single-person data: crops like a person detector's, rendered from a seed with common.synthetic's
figures, written as COCO-17 JSON and as a LIP-style CSV (MPII joint order). `ensure_crops(root)` renders them
once into <root>/data/single_person.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from common.keypoints import MPII16
from common.synthetic import (HUMAN_POINT_NAMES, Canvas, camera_noise, coco_annotation, draw_occluder,
                              ensure_dataset, image_rng, random_background, random_human_figure, render_in_order,
                              write_coco, write_image)

# pose_spread 0.75: the mean-pose baseline then scores PCKh@0.5 21.6% on these crops, as it does on the real
# LIP annotations (22.0% on ../shared/data/lip_annotations); at the full human range (1.0) it scores 16.9%,
# i.e. the poses were more varied than LIP's.
CROP_DEFAULTS = dict(num_images=3000, num_val=300, image_size=128, seed=0, pose_spread=0.75)
# MPII/LIP joint j is human point LIP_FROM_HUMAN[j] ("r_ankle" -> "right_ankle", ...).
LIP_FROM_HUMAN = [HUMAN_POINT_NAMES.index("_".join({"r": "right", "l": "left"}.get(t, t) for t in n.split("_"))
                  if n[:2] in ("r_", "l_") else n) for n in MPII16.names]


def ensure_crops(root=None, **params):
    """<root>/data/single_person with images/{train,val}, annotations/person_keypoints_{split}.json and
    annotations/lip_{split}.csv, rendered on first use (params override CROP_DEFAULTS)."""
    return ensure_dataset("single_person", build_single_person_crops, CROP_DEFAULTS, root, **params)


def render_crop(rng, size, pose_spread=1.0):
    """One single-person crop (like a detector's): RGB image, the 21 figure points, their COCO
    visibility and the person's visible mask. About 1 in 7 crops cuts the person at the border.
    pose_spread scales every joint-angle range (random_human_figure's angle_range)."""
    S = size
    while True:  # redrawn (from the same stream) in the rare case occluders hide most of the person
        fig = random_human_figure(rng, S, (0, 0), angle_range=pose_spread)
        extent = (fig.points.max(0) - fig.points.min(0)).max() + fig.head_radius
        target = rng.uniform(1.0, 1.2) if rng.random() < 0.15 else rng.uniform(0.7, 0.92)
        fig = fig.moved(target * S / extent, S / 2 + rng.normal(0, 0.05 * S, 2)).rounded()
        canvas = Canvas(random_background(rng, (S, S)))
        canvas.add(fig)
        drawn_area = (canvas.owner == 1).sum()
        for _ in range(rng.integers(1, 3) if rng.random() < 0.35 else 0):
            draw_occluder(rng, canvas.image, canvas.owner, fig.points[rng.integers(21)], rng.uniform(0.1, 0.3) * S)
        if (canvas.owner == 1).sum() >= 0.3 * drawn_area > 0:
            return camera_noise(rng, canvas.image), fig.points, canvas.visibility(0), canvas.owner == 1


def _crop_item(image_dir, split, image_size, seed, pose_spread, i):
    """One crop written to disk: its COCO image entry, COCO annotation and LIP CSV row."""
    image, points, v, mask = render_crop(image_rng(seed, split, i), image_size, pose_spread)
    info = write_image(image_dir, i + 1, image, image_size)
    kps = np.concatenate([points[:17], v[:17, None]], 1).astype(np.int64)
    kps[kps[:, 2] == 0] = 0
    annotation = {"id": i + 1, "image_id": i + 1, **coco_annotation(mask, kps, (kps[:, 2] > 0).sum(), 0)}
    fields = [info["file_name"]]
    for k in LIP_FROM_HUMAN:
        fields += (["nan"] * 3 if v[k] == 0 else [str(int(points[k, 0])), str(int(points[k, 1])),
                                                  "1" if v[k] == 1 else "0"])
    return info, annotation, ",".join(fields)


def build_single_person_crops(root, split, num_images, image_size=128, seed=0, progress=False, pose_spread=1.0,
                              workers=None):
    """Render single-person crops into root/images/{split}/%06d.jpg with COCO-17 JSON and a LIP CSV.

    LIP CSV: no header, `name, x0,y0,v0 ... x15,y15,v15` in MPII joint order; as in the real LIP
    files v is 0 for a visible joint and 1 for an occluded one; joints outside the crop are `nan,nan,nan`.
    Returns {"images": dir, "coco": json path, "lip": csv path}.
    """
    root = Path(root)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    items = render_in_order(functools.partial(_crop_item, image_dir, split, image_size, seed, pose_spread),
                            num_images, workers, f"single_person {split}", progress)
    images, annotations, rows = (list(column) for column in zip(*items)) if items else ([], [], [])
    coco = root / "annotations" / f"person_keypoints_{split}.json"
    write_coco(coco, f"posezoo synthetic single-person crops, seed {seed}", images, annotations)
    lip = root / "annotations" / f"lip_{split}.csv"
    lip.write_text("\n".join(rows) + "\n")
    return {"images": image_dir, "coco": coco, "lip": lip}
