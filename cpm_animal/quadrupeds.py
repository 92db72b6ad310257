"""Built-in data for cpm_animal: rendered quadrupeds with the 16 cat keypoints, in the seed's JSON layout.

A pose sampler builds a 3-D stick animal (spine, neck, head, four three-segment legs) with varied
proportions (cat, dog, dachshund, horse-like) and poses (stand, walk, sit, lie, stretch), turns it by a
random yaw, projects it and draws it far-to-near with common.synthetic.draw_figure on a
common.synthetic.random_background. A keypoint is visible (1) when the pixel under it belongs to a
part that draws it, else occluded (0). Train and val come from disjoint seeds.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from common.keypoints import CAT16
from common.synthetic import draw_figure, random_background

DATA_VERSION = 1  # bump when the renderer changes: cached sets are regenerated
VAL_SEED_OFFSET = 1000003
(HEAD, UPPER_SPINE, L_SHOULDER, L_ELBOW, L_FRONT_PAW, R_SHOULDER, R_ELBOW, R_FRONT_PAW, CENTER_SPINE,
 BOTTOM_SPINE, L_KNEE, L_HEEL, L_REAR_PAW, R_KNEE, R_HEEL, R_REAR_PAW) = range(16)
# body types: (body length, leg length, neck length, head radius, body depth, body width) in units
BODY_TYPES = {"cat": (1.0, 0.55, 0.28, 0.15, 0.32, 0.26), "dog": (1.0, 0.75, 0.35, 0.15, 0.36, 0.3),
              "dachshund": (1.2, 0.3, 0.3, 0.14, 0.3, 0.24), "horse": (1.0, 1.0, 0.6, 0.14, 0.45, 0.3)}
POSES = ("stand", "walk", "sit", "lie", "stretch")
POSE_PROBS = (0.3, 0.3, 0.15, 0.15, 0.1)
FUR = np.array([[230, 140, 60], [120, 120, 125], [35, 30, 30], [240, 235, 225], [150, 100, 60],
                [200, 175, 130], [90, 60, 40]], np.float64)


def _leg_dir(angle):
    """Unit vector of a leg segment at `angle` radians from straight down, positive = forward (+x)."""
    return np.array([math.sin(angle), math.cos(angle), 0.0])


def sample_quadruped(rng):
    """A random animal in 3-D body coordinates: x forward, y down, z towards the animal's left.

    Returns (points (16, 3), style dict). Units are body lengths, bottom_spine at the origin.
    """
    body_type = rng.choice(list(BODY_TYPES), p=[0.45, 0.25, 0.15, 0.15])
    length, leg, neck, head_r, depth, width = np.array(BODY_TYPES[body_type]) * rng.uniform(0.85, 1.15, 6)
    pose = rng.choice(POSES, p=POSE_PROBS)
    u = lambda lo, hi: rng.uniform(lo, hi)
    deg = math.radians
    upper, lower, foot = leg * 0.45, leg * 0.45, leg * 0.22  # front: shoulder-elbow-paw uses upper+lower
    arch = u(-0.05, 0.1) * length
    pitch, neck_angle = 0.0, u(deg(10), deg(60))
    # front leg angles (upper, lower) and rear (thigh, shin, foot), radians from straight down
    if pose == "stand":
        front = [(u(-0.2, 0.2), u(-0.2, 0.1)) for _ in range(2)]
        rear = [(u(0.3, 0.7), u(-0.7, -0.3), u(-0.1, 0.2)) for _ in range(2)]
    elif pose == "walk":
        swing = [u(-0.6, 0.6), u(-0.6, 0.6)]
        front = [(s, s + u(-0.9, 0.1)) for s in swing]
        rear = [(-s + u(0.2, 0.8), -s + u(-0.9, -0.3), u(-0.3, 0.4)) for s in swing]
    elif pose == "sit":
        pitch = u(deg(25), deg(55))  # front end up
        front = [(u(-0.2, 0.2) - pitch, u(-0.2, 0.1) - pitch) for _ in range(2)]
        rear = [(u(1.3, 1.7) - pitch, u(-1.9, -1.4) - pitch, u(1.2, 1.6) - pitch) for _ in range(2)]
    elif pose == "lie":
        front = [(u(1.2, 1.6), u(1.3, 1.7)) for _ in range(2)]
        rear = [(u(1.3, 1.7), u(-1.7, -1.3), u(1.3, 1.7)) for _ in range(2)]
        neck_angle = u(deg(-10), deg(50))
    else:  # stretch / jump: legs reaching out front and back
        pitch = u(deg(-20), deg(20))
        front = [(u(0.6, 1.3), u(0.6, 1.4)) for _ in range(2)]
        rear = [(u(-1.2, -0.4), u(-1.4, -0.6), u(-1.5, -0.6)) for _ in range(2)]

    P = np.zeros((16, 3))
    P[BOTTOM_SPINE] = (0, 0, 0)
    P[UPPER_SPINE] = (length, 0, 0)
    P[CENTER_SPINE] = (length / 2, -arch, 0)
    for side, (shoulder, elbow, paw), (knee, heel, rpaw), (a1, a2), (b1, b2, b3) in (
            (1, (L_SHOULDER, L_ELBOW, L_FRONT_PAW), (L_KNEE, L_HEEL, L_REAR_PAW), front[0], rear[0]),
            (-1, (R_SHOULDER, R_ELBOW, R_FRONT_PAW), (R_KNEE, R_HEEL, R_REAR_PAW), front[1], rear[1])):
        z = side * width / 2
        P[shoulder] = (length - 0.05, depth * 0.55, z)
        P[elbow] = P[shoulder] + upper * _leg_dir(a1)
        P[paw] = P[elbow] + (lower + foot) * _leg_dir(a2)
        hip = np.array([0.05, depth * 0.4, z])
        P[knee] = hip + upper * _leg_dir(b1)
        P[heel] = P[knee] + lower * _leg_dir(b2)
        P[rpaw] = P[heel] + foot * 1.3 * _leg_dir(b3)
    P[HEAD] = P[UPPER_SPINE] + neck * np.array([math.cos(neck_angle), -math.sin(neck_angle), 0])
    # whole-body pitch about the rear (sitting lifts the front)
    c, s = math.cos(-pitch), math.sin(-pitch)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    P = P @ rotation.T
    tail = [P[BOTTOM_SPINE]]
    tail_angle, tail_len = u(math.pi * 0.6, math.pi * 1.4), u(0.4, 0.8) * length
    for _ in range(3):
        tail_angle += u(-0.6, 0.6)
        tail.append(tail[-1] + tail_len / 3 * np.array([-abs(math.cos(tail_angle)), -math.sin(tail_angle), 0]))
    fur = FUR[rng.integers(len(FUR))] * rng.uniform(0.8, 1.1)
    style = {"head_r": head_r, "depth": depth, "leg_thickness": leg * u(0.12, 0.2), "tail": np.array(tail),
             "tail_thickness": u(0.04, 0.09), "fur": np.clip(fur, 0, 255), "pose": pose, "type": body_type,
             "belly": np.clip(fur * u(0.7, 1.3), 0, 255)}
    return P, style


def _project(points, yaw, roll, scale, center):
    """Orthographic view after a proper rotation by `yaw` about the vertical (no mirroring, so left stays
    left) and `roll` in the image plane. Body axes (forward, down, left) form a right-handed frame like
    the camera's (right, down, into the scene): at yaw 0 the head points right and the left flank away.
    Returns image xy and nearness (larger = nearer the camera)."""
    c, s = math.cos(yaw), math.sin(yaw)
    x = points[..., 0] * c + points[..., 2] * s
    nearness = points[..., 0] * s - points[..., 2] * c
    xy = np.stack([x, points[..., 1]], -1)
    cr, sr = math.cos(roll), math.sin(roll)
    xy = xy @ np.array([[cr, -sr], [sr, cr]]).T
    return xy * scale + center, nearness


def render_quadruped(rng, size):
    """One image: RGB uint8 (size, size, 3), keypoints (16, 2) pixels, visibility (16,) 1/0 (seed's v)."""
    points, style = sample_quadruped(rng)
    yaw, roll, scale, center = random_view(rng, points, style, size)
    xy, depth = _project(points, yaw, roll, scale, center)
    tail_xy, _ = _project(style["tail"], yaw, roll, scale, center)
    image = random_background(rng, (size, size))
    owner = np.zeros((size, size), np.uint8)    # the id of the part each pixel shows (255: an occluder)
    parts = body_parts(xy, depth, tail_xy, style, roll, scale)
    draws = draw_parts(image, owner, parts, yaw, roll)
    draw_occluders(rng, image, owner, xy, size)
    visible = np.zeros(16, np.int64)
    for k, (x, y) in enumerate(np.round(xy).astype(int)):
        part = owner[min(max(y, 0), size - 1), min(max(x, 0), size - 1)]
        visible[k] = int(0 < part < 255 and k in draws[part - 1])
    noisy = image.astype(np.float32) + rng.normal(0, rng.uniform(1, 5), image.shape)
    image = np.clip(noisy, 0, 255).astype(np.uint8)
    return image, xy.astype(np.float32), visible


def random_view(rng, points, style, size):
    """(yaw, roll, scale, center): mostly side views, like the cat photos; some three-quarter, a few
    head-on/tail-on; a random size and anywhere that keeps the whole animal inside the image."""
    r = rng.random()
    yaw = rng.normal(0, 0.35) if r < 0.7 else rng.uniform(-1.2, 1.2) if r < 0.95 else rng.choice([-1, 1]) * rng.uniform(1.2, 1.5)
    if rng.random() < 0.5:  # facing left instead of right: the other flank towards the camera
        yaw += math.pi
    roll = rng.normal(0, 0.15)
    unit_xy, _ = _project(points, yaw, roll, 1.0, np.zeros(2))
    pad = style["head_r"] * 1.2 + style["leg_thickness"]
    extent = (unit_xy.max(0) - unit_xy.min(0)).max() + 2 * pad
    scale = size * rng.uniform(0.35, 0.85) / extent
    lo, hi = unit_xy.min(0) * scale, unit_xy.max(0) * scale
    margin = pad * scale + 1
    center = np.zeros(2)
    for axis in range(2):
        low, high = margin - lo[axis], size - margin - hi[axis]
        center[axis] = rng.uniform(low, high) if high > low else (low + high) / 2
    return yaw, roll, scale, center


def body_parts(xy, depth, tail_xy, style, roll, scale):
    """[(depth, kind, geometry, thickness, color, joints it draws)]: legs, tail, body, neck, head."""
    fur, belly = style["fur"], style["belly"]
    leg_t = style["leg_thickness"] * scale
    body_t = style["depth"] * scale
    # body drawn as a capsule hanging below the spine line, so spine points sit inside its top half
    down = np.array([-math.sin(roll), math.cos(roll)])
    spine = xy[[BOTTOM_SPINE, CENTER_SPINE, UPPER_SPINE]]
    belly_line = spine + down * body_t * 0.3
    parts = []
    for joints in ((L_SHOULDER, L_ELBOW, L_FRONT_PAW, L_KNEE, L_HEEL, L_REAR_PAW),
                   (R_SHOULDER, R_ELBOW, R_FRONT_PAW, R_KNEE, R_HEEL, R_REAR_PAW)):
        d = float(depth[list(joints)].mean())
        near = d > float(depth[[UPPER_SPINE, BOTTOM_SPINE]].mean())
        color = fur * (1.0 if near else 0.72)  # the far side in shade: a fixed left/right cue
        shoulder, elbow, paw, knee, heel, rpaw = joints
        parts.append((d, "limb", [xy[shoulder], xy[elbow], xy[paw]], leg_t, color, {shoulder, elbow, paw}))
        parts.append((d, "limb", [belly_line[0], xy[knee], xy[heel], xy[rpaw]], leg_t * 1.15, color, {knee, heel, rpaw}))
    body_depth = float(depth[[UPPER_SPINE, CENTER_SPINE, BOTTOM_SPINE]].mean())
    parts.append((body_depth - 1e-3, "limb", list(tail_xy), style["tail_thickness"] * scale, fur * 0.9, set()))
    parts.append((body_depth, "limb", list(belly_line), body_t, fur,
                  {UPPER_SPINE, CENTER_SPINE, BOTTOM_SPINE}))
    parts.append((float(depth[HEAD]) + 1e-3, "limb", [belly_line[2], xy[HEAD]], body_t * 0.6, fur, set()))
    parts.append((float(depth[HEAD]) + 2e-3, "head", xy[HEAD], style["head_r"] * scale, belly, {HEAD}))
    return parts


def draw_parts(image, owner, parts, yaw, roll):
    """Draw far-to-near on the image, and each part's id on `owner`; returns the joints each id draws."""
    down = np.array([-math.sin(roll), math.cos(roll)])
    draws = []
    for part_id, (_, kind, geometry, thickness, color, joints) in enumerate(sorted(parts, key=lambda p: p[0]),
                                                                            start=1):
        color = np.clip(color, 0, 255)
        if kind == "limb":
            pts = np.asarray(geometry)
            edges = [(k, k + 1) for k in range(len(pts) - 1)]
            draw_figure(image, pts, edges, thickness, color)
            draw_figure(owner, pts, edges, thickness, part_id)
        else:
            center, radius = np.asarray(geometry), float(thickness)
            draw_figure(image, center[None], [(0, 0)], 2 * radius, color)
            draw_figure(owner, center[None], [(0, 0)], 2 * radius, part_id)
            # ears and eyes tell which way the head faces
            forward = np.array([math.cos(yaw), 0.0]) @ np.array([[math.cos(roll), math.sin(roll)],
                                                                   [-math.sin(roll), math.cos(roll)]])
            up = -down
            for ear_side in (-1, 1):
                base = center + up * radius * 0.6 + forward * radius * 0.3 * ear_side
                tip = base + up * radius * 0.9
                draw_figure(image, np.array([base, tip]), [(0, 1)], radius * 0.45, color * 0.85)
                draw_figure(owner, np.array([base, tip]), [(0, 1)], radius * 0.45, part_id)
            eye = center + forward * radius * 0.45 - up * radius * 0.1
            draw_figure(image, eye[None], [(0, 0)], max(radius * 0.25, 1.5), (20, 20, 20))
        draws.append(joints)
    return draws


def draw_occluders(rng, image, owner, xy, size):
    """Occluders over some joints: boxes or blobs (cushions, grass, furniture), owner 255."""
    for _ in range(rng.integers(1, 3) if rng.random() < 0.35 else 0):
        target = xy[rng.integers(16)] + rng.normal(0, 0.05 * size, 2)
        radius = rng.uniform(0.06, 0.14) * size
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        mask = np.zeros_like(owner)
        if rng.random() < 0.5:
            cv2.ellipse(mask, tuple(int(v) for v in target), (int(radius), int(radius * rng.uniform(0.4, 1))),
                        float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            half = np.array([radius, radius * rng.uniform(0.4, 1)])
            cv2.rectangle(mask, tuple(int(v) for v in target - half), tuple(int(v) for v in target + half), 1, -1)
        image[mask > 0] = color
        owner[mask > 0] = 255


def build_split(folder: Path, count: int, size: int, seed: int, desc: str, quiet=False) -> Path:
    """Renders `count` images into folder/images and writes folder/train_keypoints_annotations.json."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, keypoints = {}, {}
    for index in tqdm(range(count), desc=desc, disable=quiet):
        rng = np.random.default_rng([seed, index])
        image, xy, visible = render_quadruped(rng, size)
        name = f"{index:06d}.jpg"
        cv2.imwrite(str(image_dir / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        images[str(index)] = {"file_name": name, "width": size, "height": size}
        keypoints[str(index)] = {name_: [float(x) / size, float(y) / size, int(v)]
                                 for name_, (x, y), v in zip(CAT16.names, xy, visible)}
    ann = folder / "train_keypoints_annotations.json"
    ann.write_text(json.dumps({"info": {"description": f"cpm_animal built-in quadrupeds, seed {seed}"},
                               "images": images, "keypoints": keypoints}))
    return ann


def ensure_quadrupeds(folder, train_images, val_images, size, seed, quiet=False):
    """(train annotation file, val annotation file), rendering them once unless params.json matches."""
    folder = Path(folder)
    settings = {"version": DATA_VERSION, "train_images": train_images, "val_images": val_images,
                "size": size, "seed": seed}
    stamp = folder / "params.json"
    ann = "train_keypoints_annotations.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return folder / "train" / ann, folder / "val" / ann
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    build_split(tmp / "train", train_images, size, seed, "quadrupeds train", quiet)
    build_split(tmp / "val", val_images, size, seed + VAL_SEED_OFFSET, "quadrupeds val", quiet)
    (tmp / "params.json").write_text(json.dumps(settings))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    if not quiet:
        print(f"rendered built-in quadrupeds ({train_images} train / {val_images} val, {size} px, seed {seed}) "
              f"into {folder}")
    return folder / "train" / ann, folder / "val" / ann
