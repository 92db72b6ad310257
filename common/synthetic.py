"""Built-in data: the deterministic figure renderer, backgrounds and occluders, COCO annotation writing, and
the cache every built-in data set lives in (`ensure_dataset`).

Nothing can be downloaded, so models train out of the box on images rendered from a seed: higher_hrnet's
multi-person scenes (higher_hrnet/scenes.py), simple_baseline's single-person crops (simple_baseline/crops.py),
pose_spi's toy people and cpm_animal's quadrupeds are all drawn with these functions. Keypoints are pixel
indices (x, y) = (col, row), each on a pixel drawn for its own joint; boxes and polygons use COCO's
pixel-corner coordinates (pixel (col, row) covers [col, col + 1) x [row, row + 1)).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from common.keypoints import COCO17

DATA_VERSION = 2  # bump when the renderer changes so cached data sets regenerate
SHIFT = 4  # OpenCV sub-pixel drawing: coordinates carry 4 fractional bits
# A human figure has the 17 COCO points followed by these four (MPII/LIP needs them).
HUMAN_POINT_NAMES = COCO17.names + ("pelvis", "thorax", "upper_neck", "head_top")
NOSE, L_EYE, R_EYE, L_EAR, R_EAR, L_SH, R_SH, L_EL, R_EL, L_WR, R_WR = range(11)
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANK, R_ANK, PELVIS, THORAX, NECK, HEAD_TOP = range(11, 21)
_SKIN = np.array([[255, 219, 172], [241, 194, 125], [224, 172, 105], [198, 134, 66], [141, 85, 36],
                  [96, 60, 35]], np.float64)


def _disk(image, center, radius, color):
    scale = 1 << SHIFT
    cv2.circle(image, (round(float(center[0]) * scale), round(float(center[1]) * scale)),
               round(max(float(radius), 1.0) * scale), color, -1, cv2.LINE_8, SHIFT)


def _capsule(image, p, q, thickness, color):
    """A thick segment with round caps (radius at least 1 px, so both end pixels are always drawn)."""
    scale = 1 << SHIFT
    a = (round(float(p[0]) * scale), round(float(p[1]) * scale))
    b = (round(float(q[0]) * scale), round(float(q[1]) * scale))
    cv2.line(image, a, b, color, max(round(thickness), 1), cv2.LINE_8, SHIFT)
    radius = round(max(thickness / 2, 1.0) * scale)
    cv2.circle(image, a, radius, color, -1, cv2.LINE_8, SHIFT)
    cv2.circle(image, b, radius, color, -1, cv2.LINE_8, SHIFT)


def draw_figure(image, points, edges, thickness, colors, joint_radius=None, joint_colors=None):
    """Draw a skeleton in place: each edge (i, j) a capsule of `thickness` (scalar or one per edge).

    `colors`: one colour or one per edge (a colour is an RGB triple for 3-channel images, a scalar for
    single-channel ones, e.g. a label map). Capsule ends are filled circles, so every edge endpoint is
    drawn; `joint_radius` (scalar or one per point) adds circles on all points, coloured by
    `joint_colors` (one per point) or by their first edge. Edges touching a non-finite point are skipped.
    """
    pts = np.asarray(points, np.float64)[:, :2]
    edges = [tuple(e) for e in edges]
    thick = np.broadcast_to(np.asarray(thickness, np.float64), (len(edges),)).tolist()
    per_edge = np.asarray(colors).ndim == (2 if image.ndim == 3 else 1)
    color_of = (lambda k: colors[k]) if per_edge else (lambda k: colors)
    finite = np.isfinite(pts).all(1).tolist()
    xy = pts.tolist()
    for k, (i, j) in enumerate(edges):
        if finite[i] and finite[j]:
            _capsule(image, xy[i], xy[j], thick[k], _cv_color(color_of(k)))
    if joint_radius is not None:
        radius = np.broadcast_to(np.asarray(joint_radius, np.float64), (len(pts),))
        for p in np.flatnonzero(finite):
            if joint_colors is not None:
                color = joint_colors[p]
            else:
                color = color_of(next((k for k, e in enumerate(edges) if p in e), 0))
            _disk(image, pts[p], radius[p], _cv_color(color))
    return image


def _cv_color(color):
    if isinstance(color, (int, float)):
        return int(color)
    c = np.asarray(color).ravel().tolist()
    return tuple(int(v) for v in c) if len(c) > 1 else int(c[0])


def _rot(angle):
    return np.array([math.cos(angle), math.sin(angle)])


@dataclass
class HumanFigure:
    """One articulated person: 21 points (HUMAN_POINT_NAMES), facing and drawing style."""
    points: np.ndarray  # (21, 2) float64 pixels
    yaw: float  # 0 faces the viewer; the person's left is then on the image right
    height: float
    head_center: np.ndarray
    head_radius: float
    limb_thickness: float
    chest_thickness: float
    colors: dict  # RGB per part: skin, hair, shirt, sleeve, pants

    def moved(self, scale, shift):
        """The same figure scaled about the origin, then shifted (pixels)."""
        return replace(self, points=self.points * scale + shift, head_center=self.head_center * scale + shift,
                       height=self.height * scale, head_radius=self.head_radius * scale,
                       limb_thickness=self.limb_thickness * scale, chest_thickness=self.chest_thickness * scale)

    def rounded(self):
        """Joints on whole pixels (stored annotations are integers, as in COCO and LIP)."""
        return replace(self, points=np.round(self.points), head_center=np.round(self.head_center))


_ANGLE_SPREAD = {"human": 1.0, "upright": 0.35}


def random_human_figure(rng, height, center, angle_range="human"):
    """A random articulated person about `height` px tall whose keypoint box is centred on `center`.

    Joint angles cover the human range ("human"), or stay near standing ("upright", or a float that
    scales every angle range); body proportions vary by about 10%; the figure faces the viewer, turns
    sideways or faces away, so left/right follow the person, not the image.
    """
    spread = _ANGLE_SPREAD[angle_range] if isinstance(angle_range, str) else float(angle_range)
    H = float(height)
    head_r, neck, torso, sh_w, hip_w, uarm, farm, thigh, shin = (
        np.array([0.062, 0.04, 0.28, 0.105, 0.07, 0.165, 0.15, 0.235, 0.24]) * H * rng.uniform(0.9, 1.1, 9))
    # facing: mostly frontal, as in COCO; profiles and back views common enough to matter
    u = rng.random()
    yaw = (rng.normal(0, 0.35) if u < 0.7 else rng.choice([-1.0, 1.0]) * rng.normal(math.pi / 2, 0.3)
           if u < 0.9 else math.pi + rng.normal(0, 0.45))
    width = math.copysign(max(abs(math.cos(yaw)), 0.15), math.cos(yaw))  # foreshortened body width
    profile = 1 - abs(width)
    tilt = rng.normal(0, 0.2 * spread)
    if rng.random() < 0.08 * spread:  # bending over, lying, cartwheeling
        tilt = rng.uniform(-1.8, 1.8)
    up, side = _rot(tilt - math.pi / 2), _rot(tilt)
    down_angle = tilt + math.pi / 2
    forward = math.copysign(1.0, math.sin(yaw)) if abs(math.sin(yaw)) > 0.35 else rng.choice([-1.0, 1.0])
    shorten = lambda: rng.uniform(1 - 0.3 * spread, 1.0)  # out-of-plane limbs look shorter

    P = np.zeros((21, 2))
    P[THORAX] = torso * up
    for s, sh, hip, el, wr, kn, an in ((1, L_SH, L_HIP, L_EL, L_WR, L_KNEE, L_ANK),
                                       (-1, R_SH, R_HIP, R_EL, R_WR, R_KNEE, R_ANK)):
        out = s * math.copysign(1.0, width)  # +1: this side's outward direction is the image right
        P[hip] = s * hip_w * width * side
        P[sh] = P[THORAX] + s * sh_w * width * side
        arm = down_angle - out * rng.uniform(-0.6 - 1.2 * profile, 2.7) * spread
        P[el] = P[sh] + uarm * shorten() * _rot(arm)
        P[wr] = P[el] + farm * shorten() * _rot(arm + rng.choice([-1, 1]) * rng.uniform(-0.3, 2.4) * spread)
        high = 1.7 if rng.random() < 0.1 * spread else 0.7 + 0.5 * profile
        leg = down_angle - out * rng.uniform(-0.3 - 0.6 * profile, high) * spread
        P[kn] = P[hip] + thigh * shorten() * _rot(leg)
        P[an] = P[kn] + shin * shorten() * _rot(leg + forward * rng.random() ** 2 * 2.2 * spread)
    head_tilt = tilt + rng.normal(0, 0.2 * spread)
    head_up, head_side = _rot(head_tilt - math.pi / 2), _rot(head_tilt)
    P[NECK] = P[THORAX] + neck * head_up
    head_c = P[NECK] + 0.85 * head_r * head_up
    P[HEAD_TOP] = head_c + 0.8 * head_r * head_up
    # face points on a head "sphere": azimuth a relative to the viewer, x offset r*sin(a)
    P[NOSE] = head_c + head_r * (0.8 * math.sin(yaw) * head_side - 0.15 * head_up)
    P[L_EYE] = head_c + head_r * (0.72 * math.sin(yaw + 0.5) * head_side + 0.2 * head_up)
    P[R_EYE] = head_c + head_r * (0.72 * math.sin(yaw - 0.5) * head_side + 0.2 * head_up)
    P[L_EAR] = head_c + 0.9 * head_r * math.cos(yaw) * head_side
    P[R_EAR] = head_c - 0.9 * head_r * math.cos(yaw) * head_side

    box_center = (P.min(0) + P.max(0)) / 2
    shift = np.asarray(center, np.float64) - box_center
    shirt = rng.integers(15, 240, 3)
    colors = {"skin": _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.85, 1.05),
              "hair": rng.integers(10, 120, 3), "shirt": shirt, "pants": rng.integers(10, 230, 3)}
    colors["sleeve"] = shirt if rng.random() < 0.5 else colors["skin"]
    colors = {k: np.array([min(max(int(c), 0), 255) for c in v], np.uint8) for k, v in colors.items()}
    return HumanFigure(P + shift, float(yaw), H, head_c + shift, float(head_r),
                       float(max(H * rng.uniform(0.04, 0.07), 2.0)), float(H * rng.uniform(0.1, 0.13)), colors)


def _human_parts(fig):
    """Draw operations back to front: (kind, geometry, colour, the joints this part draws)."""
    P, r, t = fig.points, fig.head_radius, fig.limb_thickness
    c = fig.colors
    shade = lambda color, left: (color * (0.8 if left else 1.0)).astype(np.uint8)  # fixed left/right cue
    left_near = math.sin(fig.yaw) < 0
    limb = {}
    for left, sh, el, wr, hip, kn, an in ((True, L_SH, L_EL, L_WR, L_HIP, L_KNEE, L_ANK),
                                          (False, R_SH, R_EL, R_WR, R_HIP, R_KNEE, R_ANK)):
        # pelvis and thorax sit inside the body: a thigh or upper-arm root in front of them shows them
        limb[left] = (
            [("edge", (hip, kn), 1.25 * t, shade(c["pants"], left), {hip, kn, PELVIS}),
             ("edge", (kn, an), 1.05 * t, shade(c["pants"], left), {kn, an})],
            [("edge", (sh, el), t, shade(c["shirt"], left), {sh, el, THORAX}),
             ("edge", (el, wr), 0.85 * t, shade(c["sleeve"], left), {el, wr})])
    far_legs, far_arms = limb[not left_near]
    near_legs, near_arms = limb[left_near]
    ears = [("disk", P[e], 0.3 * r, c["skin"], {e}) for e in (L_EAR, R_EAR)]
    ear_behind = [math.cos(fig.yaw + a) < -0.5 for a in (math.pi / 2, -math.pi / 2)]
    behind = [e for e, b in zip(ears, ear_behind) if b]
    front = [e for e, b in zip(ears, ear_behind) if not b]
    up = fig.points[HEAD_TOP] - fig.head_center
    up /= max(np.linalg.norm(up), 1e-6)
    back = -math.sin(fig.yaw) * np.array([-up[1], up[0]])  # away from the face
    hair = ("disk", fig.head_center + r * (0.25 * up + 0.3 * back), r, c["hair"], {NECK, HEAD_TOP})
    head = ("disk", fig.head_center, r, c["skin"], {NECK, HEAD_TOP})
    # the nose sticks out, so profiles show it; an eye needs to face us a little
    face = [n for n, a, limit in ((NOSE, fig.yaw, -0.2), (L_EYE, fig.yaw + 0.5, 0.1),
                                  (R_EYE, fig.yaw - 0.5, 0.1)) if math.cos(a) > limit]
    face_part = [("dots", [P[n] for n in face], max(0.14 * r, 1.0), (40, 25, 20), {NOSE, L_EYE, R_EYE})]
    torso = ("torso", None, fig.chest_thickness, c["shirt"], {L_SH, R_SH, L_HIP, R_HIP, PELVIS, THORAX})
    neck = ("edge", (THORAX, NECK), max(r, 2.0), c["skin"], {THORAX, NECK})
    # facing us the hair is behind the face; facing away it covers the back of the head
    head_parts = behind + ([hair, head] if math.cos(fig.yaw) >= 0 else [head, hair]) + front
    head_parts += face_part if face else []
    return far_legs + far_arms + [torso] + near_legs + [neck] + head_parts + near_arms


def rasterize_human(fig, origin, shape):
    """Label map (h, w) uint8 of part ids (0 = background) of `fig` drawn in the window at `origin`,
    the RGB colour of each id (row 0 unused) and the joints each id draws."""
    labels = np.zeros(shape, np.uint8)
    P = fig.points - np.asarray(origin, np.float64)
    xy = P.tolist()
    colors, draws = [np.zeros(3, np.uint8)], [set()]
    for part_id, (kind, geometry, size, color, joints) in enumerate(_human_parts(fig), start=1):
        if kind == "edge":
            _capsule(labels, xy[geometry[0]], xy[geometry[1]], size, part_id)
        elif kind == "disk":
            _disk(labels, geometry - origin, size, part_id)
        elif kind == "dots":
            for point in geometry:
                _disk(labels, point - origin, size, part_id)
        else:  # torso: filled quadrilateral, rounded outline, and a spine as thick as the chest
            quad = np.round(P[[L_SH, R_SH, R_HIP, L_HIP]] * (1 << SHIFT)).astype(np.int32)
            cv2.fillPoly(labels, [quad], part_id, cv2.LINE_8, SHIFT)
            for i, j in ((L_SH, R_SH), (R_SH, R_HIP), (R_HIP, L_HIP), (L_HIP, L_SH)):
                _capsule(labels, xy[i], xy[j], fig.limb_thickness, part_id)
            _capsule(labels, xy[THORAX], xy[PELVIS], size, part_id)
        colors.append(np.asarray(color, np.uint8))
        draws.append(joints)
    return labels, np.stack(colors), draws


def draw_human(image, fig):
    """Draw a HumanFigure in place on an RGB image; returns its part label map (see rasterize_human)."""
    labels, colors, _ = rasterize_human(fig, (0, 0), image.shape[:2])
    mask = labels > 0
    image[mask] = colors[labels[mask]]
    return labels


def random_background(rng, size_wh):
    """Textured, cluttered RGB uint8 background with limb-like strokes and head-like blobs."""
    W, H = size_wh
    grid = rng.integers(2, 7)
    # a scene colour with smooth variations (walls, floor, light), then a fine texture
    field = rng.uniform(30, 220, 3) + rng.normal(0, 30, (grid, grid, 3)) + rng.normal(0, 25, (grid, grid, 1))
    image = cv2.resize(field.astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
    fine = rng.standard_normal(((H + 3) // 4, (W + 3) // 4), dtype=np.float32) * np.float32(rng.uniform(4, 20))
    image += cv2.resize(fine, (W, H), interpolation=cv2.INTER_LINEAR)[:, :, None]
    image = np.clip(image, 0, 255).astype(np.uint8)
    side = min(W, H)
    area = W * H / 256.0 ** 2
    for _ in range(rng.poisson(4 * area)):  # furniture-like boxes and ellipses
        image[_shape_mask(rng, (H, W), rng.uniform(0, 1, 2) * (W, H), rng.uniform(0.06, 0.5) * side)] = \
            rng.integers(0, 256, 3)
    for _ in range(rng.poisson(8 * area)):  # limb-like distractors: bent strokes in figure colours
        n = rng.integers(2, 4)
        length = rng.uniform(0.04, 0.15) * side
        angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.uniform(-1.5, 1.5, n - 1))
        pts = np.cumsum(np.vstack([rng.uniform(0, 1, 2) * (W, H), length * np.stack(
            [np.cos(angles), np.sin(angles)], 1)]), 0)
        color = _SKIN[rng.integers(len(_SKIN))] if rng.random() < 0.4 else rng.integers(0, 256, 3)
        draw_figure(image, pts, [(k, k + 1) for k in range(n - 1)], rng.uniform(0.015, 0.05) * side, color)
        if rng.random() < 0.2:
            _disk(image, pts[-1], rng.uniform(0.015, 0.05) * side, _cv_color(_SKIN[rng.integers(len(_SKIN))]))
    return image


def camera_noise(rng, image):
    noise = rng.standard_normal(image.shape[:2] + (1,), dtype=np.float32) * np.float32(rng.uniform(1, 5))
    noisy = np.clip(image + noise, 0, 255).astype(np.uint8)
    return cv2.GaussianBlur(noisy, (3, 3), 0) if rng.random() < 0.3 else noisy


def _shape_mask(rng, shape, center, size):
    """Boolean mask of a random ellipse or rotated box about `size` px across near `center`."""
    mask = np.zeros(shape, np.uint8)
    axes = (max(int(size * rng.uniform(0.3, 0.7)), 2), max(int(size * rng.uniform(0.3, 0.7)), 2))
    c = (int(center[0] + rng.normal(0, 0.3) * axes[0]), int(center[1] + rng.normal(0, 0.3) * axes[1]))
    if rng.random() < 0.5:
        cv2.ellipse(mask, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        box = cv2.boxPoints((c, (2 * axes[0], 2 * axes[1]), float(rng.uniform(0, 90))))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    return mask > 0


def draw_occluder(rng, image, owner, center, size):
    """A textured object over `center`; its pixels get owner 255 (they hide whatever is below)."""
    m = _shape_mask(rng, owner.shape, center, size)
    image[m] = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 12, (int(m.sum()), 1)), 0, 255).astype(np.uint8)
    owner[m] = 255


class Canvas:
    """An image being composed back to front, with the owner id of every pixel."""

    def __init__(self, image):
        self.image, self.owner, self.people = image, np.zeros(image.shape[:2], np.uint8), []

    def add(self, fig, owner_id=None):
        """Draw a figure on top; returns its index in self.people, or None when it is off the image."""
        H, W = self.owner.shape
        pad = max(fig.head_radius, fig.chest_thickness, fig.limb_thickness) + 2
        x0, y0 = np.floor(fig.points.min(0) - pad).astype(int).clip(0, (W, H))
        x1, y1 = np.ceil(fig.points.max(0) + pad + 1).astype(int).clip(0, (W, H))
        if x1 <= x0 or y1 <= y0:
            return None
        labels, colors, draws = rasterize_human(fig, (x0, y0), (y1 - y0, x1 - x0))
        mask = labels > 0
        self.image[y0:y1, x0:x1][mask] = colors[labels[mask]]
        owner_id = owner_id or len(self.people) + 1
        self.owner[y0:y1, x0:x1][mask] = owner_id
        self.people.append(dict(fig=fig, labels=labels, draws=draws, origin=(x0, y0), owner_id=owner_id))
        return len(self.people) - 1

    def visibility(self, index):
        """COCO v per figure point: 0 outside the image, 1 covered (by anything), 2 its own joint drawn."""
        person = self.people[index]
        H, W = self.owner.shape
        x0, y0 = person["origin"]
        v = np.zeros(len(person["fig"].points), np.int64)
        for k, (x, y) in enumerate(np.round(person["fig"].points).astype(int)):
            if 0 <= x < W and 0 <= y < H:
                own = self.owner[y, x] == person["owner_id"]
                v[k] = 2 if own and k in person["draws"][person["labels"][y - y0, x - x0]] else 1
        return v


def _polygons(mask, offset):
    """COCO polygons (lists of x, y in pixel-corner coordinates) of a binary mask's outer contours.

    Traced on the mask upsampled 2x, so a polygon runs a quarter pixel inside the silhouette's edge
    (not half a pixel, as contours through pixel centres do) and one-pixel parts stay polygons.
    """
    big = np.repeat(np.repeat(mask.astype(np.uint8), 2, 0), 2, 1)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [[round(float(c), 2) for c in ((contour.reshape(-1, 2) + 0.5) / 2 + offset).ravel()]
            for contour in contours if len(contour) >= 3]


def _rle(mask):
    """Uncompressed COCO RLE (column-major run lengths starting with background), as COCO crowds use."""
    flat = np.asfortranarray(mask.astype(np.uint8)).ravel(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes]))
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def coco_annotation(mask, keypoints, num_keypoints, iscrowd, offset=(0, 0)):
    """COCO fields of one person from its visible mask (a window of the image at `offset`);
    the box also holds its labelled keypoints. Crowd masks must cover the whole image."""
    ys, xs = np.nonzero(mask)
    offset = np.asarray(offset, float)
    lo = np.array([xs.min(), ys.min()], float) + offset
    hi = np.array([xs.max() + 1, ys.max() + 1], float) + offset
    labelled = keypoints[keypoints[:, 2] > 0, :2]
    if len(labelled):
        lo, hi = np.minimum(lo, labelled.min(0)), np.maximum(hi, labelled.max(0) + 1)
    return {"category_id": 1, "keypoints": [int(v) for v in keypoints.ravel()],
            "num_keypoints": int(num_keypoints), "bbox": [*map(float, lo), *map(float, hi - lo)],
            "area": float(mask.sum()), "segmentation": _rle(mask) if iscrowd else _polygons(mask, offset),
            "iscrowd": int(iscrowd)}


def image_rng(seed, split, index):
    # each image has its own stream: image i is the same whatever num_images; splits never share one
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def write_coco(path, description, images, annotations):
    person = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO17.names),
              "skeleton": [[a + 1, b + 1] for a, b in COCO17.skeleton]}  # COCO's skeleton is 1-based
    _write_json(path, {"info": {"description": description, "version": DATA_VERSION}, "licenses": [],
                       "images": images, "annotations": annotations, "categories": [person]})


def write_image(image_dir, image_id, image, size):
    name = f"{image_id:06d}.jpg"
    cv2.imwrite(str(image_dir / name), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return {"id": image_id, "file_name": name, "width": size, "height": size}


def render_in_order(render_one, count, workers, desc, progress):
    """[render_one(i) for i in range(count)], spread over `workers` processes (default: one per core) when
    there are enough images to pay for starting them. Every image has its own random stream
    (image_rng), so the files are the same whatever the number of workers."""
    if not workers:   # the cores this process may run on (a container can allow fewer than the host has)
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > 1 and count >= 64 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return list(tqdm(pool.imap(render_one, range(count), chunksize=16), total=count, desc=desc,
                             disable=not progress))
    return [render_one(i) for i in tqdm(range(count), desc=desc, disable=not progress)]


def ensure_dataset(kind, build, defaults, root=None, **params):
    """Path of the built-in data set `kind` under <root>/data/<kind>, generating train and val splits (same
    seed, disjoint streams) with build(folder, split, count, progress=True, **settings) unless params.json
    there matches. defaults: num_images (train), num_val and the builder's keywords (image_size, seed ...);
    params override them. root: the output root (default: $POSE_OUTPUT_ROOT, else the current directory).
    Under DDP, call it on rank 0 before the other ranks.
    """
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"{kind} data: unknown parameters {sorted(unknown)}")
    settings = {"kind": kind, "version": DATA_VERSION, **defaults, **params}
    # the rule of common.runs.output_root, restated so that data generation does not import torch
    base = Path(root or os.environ.get("POSE_OUTPUT_ROOT") or os.getcwd()) / "data"
    target = base / kind
    stamp = target / "params.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return target
    build_params = {k: v for k, v in settings.items() if k not in ("kind", "version", "num_images", "num_val")}
    tmp = base / f".{kind}.tmp-{os.getpid()}"  # a half-written set is never mistaken for a finished one
    try:
        for split, count in (("train", settings["num_images"]), ("val", settings["num_val"])):
            build(tmp, split, count, progress=True, **build_params)
        _write_json(tmp / "params.json", settings)
        if stamp.exists() and json.loads(stamp.read_text()) == settings:  # another process finished first
            return target
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"generated built-in {kind} data ({settings['num_images']} train / {settings['num_val']} val images, "
          f"{settings['image_size']} px, seed {settings['seed']}) in {target}")
    return target
