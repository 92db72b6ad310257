"""Keypoint layouts: names, left/right flip pairs, skeleton edges and OKS sigmas, and COCO's 17 points.

Sigmas are looked up by keypoint *name*, never by position, so a subset of COCO gets the right sigma for
each point. The layouts of other data sets live with the folder that reads them (CAT16 and AP10K17 in
cpm_animal/model.py, MPII16/LIP16 in simple_baseline/model.py, CROWDPOSE14 in higher_hrnet/dataset.py).
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
    flip_pairs: tuple = field(default=None)     # None: derived from the names (left_* <-> right_*)

    def __post_init__(self):
        if self.flip_pairs is None:
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


def make_layout(name, names, skeleton, sigma_table: dict, note="") -> KeypointLayout:
    """A layout whose sigmas are looked up by name in `sigma_table`."""
    return KeypointLayout(name, tuple(names), tuple(skeleton), tuple(sigma_table[n] for n in names), note)


COCO17 = make_layout(
    "coco17", list(COCO_SIGMAS),
    [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
     (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)],
    COCO_SIGMAS)


def get_layout(name: str, layouts) -> KeypointLayout:
    """The layout of `layouts` called `name` (a folder passes the layouts its scripts accept)."""
    by_name = {layout.name: layout for layout in layouts}
    if name not in by_name:
        raise ValueError(f"unknown keypoint layout '{name}'; choose from {sorted(by_name)}")
    return by_name[name]


def layout_from_dict(d: dict) -> KeypointLayout:
    return KeypointLayout(d["name"], tuple(d["names"]), tuple(map(tuple, d["skeleton"])), tuple(d["sigmas"]),
                          d["sigmas_note"], tuple(map(tuple, d["flip_pairs"])))


def layout_from_coco_category(category: dict, known=(COCO17,)) -> KeypointLayout:
    """A layout from a COCO `categories` entry (its 1-based skeleton becomes 0-based).

    Sigmas come by name from the first of the `known` layouts that has every one of the names (names like
    'neck' mean different body parts in different sets); when none has them all, every point gets 0.05.
    """
    names = tuple(category["keypoints"])
    skeleton = tuple((a - 1, b - 1) for a, b in category.get("skeleton", []))
    match = next((layout for layout in known if set(names) <= set(layout.names)), None)
    if match is None:
        sigmas, note = [0.05] * len(names), "uniform sigmas 0.05: keypoint names not found in any known layout"
    else:
        sigmas, note = [dict(zip(match.names, match.sigmas))[n] for n in names], match.sigmas_note
    return KeypointLayout(category.get("name", "custom"), names, skeleton, tuple(sigmas), note)
