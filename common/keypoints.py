"""Keypoint layouts: names, left/right flip pairs, skeleton edges and OKS sigmas.

Every dataset a model folder reads is described by one `KeypointLayout`. Sigmas are always looked
up by keypoint *name*, never by position, so a subset of COCO gets the right sigma for each point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# pycocotools' COCO-17 sigmas (cocoeval.py), keyed by name.
COCO_SIGMAS = {
    "nose": 0.026, "left_eye": 0.025, "right_eye": 0.025, "left_ear": 0.035, "right_ear": 0.035,
    "left_shoulder": 0.079, "right_shoulder": 0.079, "left_elbow": 0.072, "right_elbow": 0.072,
    "left_wrist": 0.062, "right_wrist": 0.062, "left_hip": 0.107, "right_hip": 0.107,
    "left_knee": 0.087, "right_knee": 0.087, "left_ankle": 0.089, "right_ankle": 0.089,
}
# AP-10K's sigmas (its official dataset description), keyed by name.
AP10K_SIGMAS = {
    "left_eye": 0.025, "right_eye": 0.025, "nose": 0.026, "neck": 0.035, "root_of_tail": 0.035,
    "left_shoulder": 0.079, "left_elbow": 0.072, "left_front_paw": 0.062,
    "right_shoulder": 0.079, "right_elbow": 0.072, "right_front_paw": 0.062,
    "left_hip": 0.107, "left_knee": 0.087, "left_back_paw": 0.089,
    "right_hip": 0.107, "right_knee": 0.087, "right_back_paw": 0.089,
}
# MPII/LIP: the COCO-adapted sigmas commonly used to compute OKS on MPII (not an official benchmark).
MPII_SIGMAS = {
    "r_ankle": 0.089, "r_knee": 0.083, "r_hip": 0.107, "l_hip": 0.107, "l_knee": 0.083,
    "l_ankle": 0.089, "pelvis": 0.026, "thorax": 0.026, "upper_neck": 0.026, "head_top": 0.026,
    "r_wrist": 0.062, "r_elbow": 0.072, "r_shoulder": 0.179, "l_shoulder": 0.179,
    "l_elbow": 0.072, "l_wrist": 0.062,
}
# CrowdPose's evaluation sigmas (its cocoeval fork): COCO body points plus head and neck.
CROWDPOSE_SIGMAS = {**{k: v for k, v in COCO_SIGMAS.items() if k not in
                       ("nose", "left_eye", "right_eye", "left_ear", "right_ear")},
                    "head": 0.079, "neck": 0.079}
# The Animal Keypoints Dataset has no published sigmas: each cat point takes the sigma of its
# closest AP-10K analogue (heel, which AP-10K lacks, sits between knee and paw). AP computed with
# these is ours, not a benchmark number.
CAT_SIGMAS = {
    "head": AP10K_SIGMAS["nose"], "upper_spine": AP10K_SIGMAS["neck"],
    "left_shoulder": 0.079, "left_elbow": 0.072, "front_left_paw": 0.062,
    "right_shoulder": 0.079, "right_elbow": 0.072, "front_right_paw": 0.062,
    "center_spine": 0.035, "bottom_spine": AP10K_SIGMAS["root_of_tail"],
    "left_knee": 0.087, "left_heel": 0.088, "rear_left_paw": 0.089,
    "right_knee": 0.087, "right_heel": 0.088, "rear_right_paw": 0.089,
}


def mirror_name(name: str) -> str:
    """'left_knee' -> 'right_knee', 'front_left_paw' -> 'front_right_paw', 'l_hip' -> 'r_hip'."""
    swap = {"left": "right", "right": "left", "l": "r", "r": "l", "L": "R", "R": "L"}
    return "_".join(swap.get(token, token) for token in name.split("_"))


@dataclass(frozen=True)
class KeypointLayout:
    name: str
    names: tuple
    skeleton: tuple
    sigmas: tuple
    sigmas_note: str = ""
    flip_pairs: tuple = field(default=None)

    def __post_init__(self):
        if self.flip_pairs is None:  # derive left/right pairs from the names
            index = {n: i for i, n in enumerate(self.names)}
            pairs = sorted({tuple(sorted((i, index[mirror_name(n)]))) for i, n in enumerate(self.names)
                            if mirror_name(n) != n and mirror_name(n) in index})
            object.__setattr__(self, "flip_pairs", tuple(pairs))
        if len(self.sigmas) != len(self.names):
            raise ValueError(f"layout {self.name}: {len(self.sigmas)} sigmas for {len(self.names)} keypoints")

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    @property
    def flip_index(self) -> list:
        index = list(range(self.num_keypoints))
        for a, b in self.flip_pairs:
            index[a], index[b] = b, a
        return index

    def as_dict(self) -> dict:
        """Plain types for checkpoints; layout_from_dict rebuilds the same layout."""
        return {"name": self.name, "names": list(self.names), "skeleton": [list(e) for e in self.skeleton],
                "sigmas": list(self.sigmas), "sigmas_note": self.sigmas_note,
                "flip_pairs": [list(p) for p in self.flip_pairs]}

    def subset(self, names, name=None) -> "KeypointLayout":
        """The layout restricted to `names` (in that order); sigmas and edges follow the names."""
        position = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in position]
        if missing:
            raise ValueError(f"layout {self.name} has no keypoints {missing}")
        new_index = {position[n]: i for i, n in enumerate(names)}
        skeleton = tuple((new_index[a], new_index[b]) for a, b in self.skeleton
                         if a in new_index and b in new_index)
        return KeypointLayout(name or f"{self.name}_subset", tuple(names), skeleton,
                              tuple(self.sigmas[position[n]] for n in names), self.sigmas_note)


def _layout(name, names, skeleton, sigma_table, note=""):
    return KeypointLayout(name, tuple(names), tuple(skeleton),
                          tuple(sigma_table[n] for n in names), note)


COCO17 = _layout(
    "coco17", list(COCO_SIGMAS),
    [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
     (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)],
    COCO_SIGMAS)

# Pose-SPI's 13 points: COCO without eyes and ears. Its seed evaluated with the first 13 COCO sigmas
# (nose, eyes, ears, ...), which belong to other points; here each point keeps its own sigma.
POSE_SPI13 = COCO17.subset(
    ["nose", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
     "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"],
    name="pose_spi13")
# The toy set's own skeleton (head to both shoulders, shoulders to hips), 0-based.
POSE_SPI13 = KeypointLayout(
    "pose_spi13", POSE_SPI13.names,
    ((0, 1), (0, 2), (1, 2), (1, 3), (1, 7), (2, 4), (2, 8), (3, 5), (4, 6), (7, 9), (7, 8), (8, 10),
     (9, 11), (10, 12)),
    POSE_SPI13.sigmas)

MPII16 = _layout(
    "mpii16",
    ["r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax", "upper_neck",
     "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist"],
    [(0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9), (7, 12), (12, 11),
     (11, 10), (7, 13), (13, 14), (14, 15)],
    MPII_SIGMAS, "COCO-adapted MPII sigmas; OKS/AP on MPII or LIP is not an official benchmark")
LIP16 = MPII16  # LIP uses the MPII joint order

CAT16 = _layout(
    "cat16",
    ["head", "upper_spine", "left_shoulder", "left_elbow", "front_left_paw", "right_shoulder",
     "right_elbow", "front_right_paw", "center_spine", "bottom_spine", "left_knee", "left_heel",
     "rear_left_paw", "right_knee", "right_heel", "rear_right_paw"],
    [(0, 1), (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (10, 11),
     (11, 12), (9, 13), (13, 14), (14, 15)],
    CAT_SIGMAS, "cat sigmas derived from AP-10K analogues: AP with them is not a benchmark number")

AP10K17 = _layout(
    "ap10k17", list(AP10K_SIGMAS),
    [(0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (3, 5), (5, 6), (6, 7), (3, 8), (8, 9), (9, 10),
     (4, 11), (11, 12), (12, 13), (4, 14), (14, 15), (15, 16)],
    AP10K_SIGMAS)

CROWDPOSE14 = _layout(
    "crowdpose14",
    ["left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
     "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head", "neck"],
    [(12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (13, 6), (13, 7), (6, 8), (8, 10),
     (7, 9), (9, 11)],
    CROWDPOSE_SIGMAS)

LAYOUTS = {layout.name: layout for layout in (COCO17, POSE_SPI13, MPII16, CAT16, AP10K17, CROWDPOSE14)}
LAYOUTS["lip16"] = LIP16


def get_layout(name: str) -> KeypointLayout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown keypoint layout '{name}'; choose from {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def layout_from_dict(d: dict) -> KeypointLayout:
    return KeypointLayout(d["name"], tuple(d["names"]), tuple(map(tuple, d["skeleton"])), tuple(d["sigmas"]),
                          d["sigmas_note"], tuple(map(tuple, d["flip_pairs"])))


def layout_from_coco_category(category: dict, sigmas=None) -> KeypointLayout:
    """A layout from a COCO `categories` entry (its 1-based skeleton becomes 0-based).

    Sigmas: given, else looked up by name in the first known layout that has every one of the
    names (names like 'neck' mean different body parts in different sets); when none has them all,
    every point gets 0.05 and the layout says so in `sigmas_note`.
    """
    names = tuple(category["keypoints"])
    skeleton = tuple((a - 1, b - 1) for a, b in category.get("skeleton", []))
    note = ""
    if sigmas is None:
        for known in (COCO17, AP10K17, MPII16, CAT16, CROWDPOSE14):
            if set(names) <= set(known.names):
                table = dict(zip(known.names, known.sigmas))
                sigmas, note = [table[n] for n in names], known.sigmas_note
                break
        else:
            sigmas = [0.05] * len(names)
            note = "uniform sigmas 0.05: keypoint names not found in any known layout"
    return KeypointLayout(category.get("name", "custom"), names, skeleton, tuple(sigmas), note)
