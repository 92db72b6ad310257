"""Tests of the built-in data: the figure renderer, the COCO scenes and crops, the LIP CSV, caching."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from common import synthetic as syn
from common.keypoints import COCO17, MPII16
from higher_hrnet.scenes import COCO_RELATIVE_SIZE_BANDS, build_multi_person_scenes, relative_person_sizes
from simple_baseline.crops import build_single_person_crops, ensure_crops

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

COCO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_sample" / "test_coco.json"
LIP_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "lip_annotations" / "val_annotations.csv"


def test_draw_figure_puts_every_point_on_its_own_joint():
    rng = np.random.default_rng(3)
    # a 16-point tree (quadruped-like) at sub-pixel positions, one point per 20x20 cell so joints do not touch
    cells = np.array([(i % 4, i // 4) for i in range(16)], np.float64)
    points = 20 + cells * 40 + rng.uniform(-8, 8, (16, 2))
    edges = [(0, 1), (1, 2), (2, 3), (1, 5), (5, 4), (5, 6), (6, 7), (5, 9), (9, 8), (9, 10), (10, 11),
             (9, 13), (13, 12), (13, 14), (14, 15)]
    image = np.zeros((180, 180, 3), np.uint8)
    syn.draw_figure(image, points, edges, thickness=rng.uniform(2, 6, len(edges)), colors=(200, 100, 50))
    px = np.round(points).astype(int)
    assert (image[px[:, 1], px[:, 0]] == (200, 100, 50)).all()

    joint_colors = rng.integers(1, 255, (16, 3))
    syn.draw_figure(image, points, edges, 3, rng.integers(0, 255, (len(edges), 3)), joint_radius=1.5,
                    joint_colors=joint_colors)
    assert (image[px[:, 1], px[:, 0]] == joint_colors).all()

    labels = np.zeros((180, 180), np.uint8)  # single-channel images (label maps) take scalar colours
    syn.draw_figure(labels, points, edges, 2, np.arange(1, len(edges) + 1))
    for k, (i, j) in enumerate(edges):
        mid = np.round((points[i] + points[j]) / 2).astype(int)
        assert labels[mid[1], mid[0]] > 0
    assert labels[px[:, 1], px[:, 0]].all()

    missing = points.copy()
    missing[5] = np.nan  # an unlabelled point: its edges are skipped, the rest still drawn
    blank = syn.draw_figure(np.zeros((180, 180), np.uint8), missing, edges, 2, 1)
    assert blank[px[0, 1], px[0, 0]] == 1 and blank[px[5, 1], px[5, 0]] == 0


def test_human_keypoints_lie_on_their_drawn_parts():
    for seed in range(40):
        rng = np.random.default_rng(seed)
        fig = syn.random_human_figure(rng, rng.uniform(20, 230), rng.uniform(250, 260, 2))
        image = np.zeros((512, 512, 3), np.uint8)
        labels, colors, draws = syn.rasterize_human(fig, (0, 0), (512, 512))
        syn.draw_human(image, fig)
        px = np.round(fig.points).astype(int)
        part = labels[px[:, 1], px[:, 0]]
        assert (part > 0).all(), f"seed {seed}: a keypoint off the figure"
        assert (image[px[:, 1], px[:, 0]] == colors[part]).all()
        own = np.array([k in draws[p] for k, p in enumerate(part)])
        # the limbs, hips and shoulders of a person alone are mostly drawn on top
        assert own.mean() > 0.6, f"seed {seed}: only {own.mean():.2f} of the joints visible"
        canvas = syn.Canvas(np.zeros((512, 512, 3), np.uint8))
        canvas.add(fig)
        assert ((canvas.visibility(0) == 2) == own).all()


def test_left_and_right_follow_the_person():
    for seed in range(60):
        fig = syn.random_human_figure(np.random.default_rng(seed), 150, (128, 128), angle_range="upright")
        P = fig.points
        up = P[syn.THORAX] - P[syn.PELVIS]
        image_right_of_person = np.array([-up[1], up[0]])
        facing_us = math.cos(fig.yaw)
        if abs(facing_us) > 0.3:  # seen from the front the person's left is on the image right
            for left, right in ((syn.L_SH, syn.R_SH), (syn.L_HIP, syn.R_HIP), (syn.L_EAR, syn.R_EAR)):
                assert np.dot(P[left] - P[right], image_right_of_person) * facing_us > 0


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_splits_differ(tmp_path):
    for build in (build_multi_person_scenes, build_single_person_crops):
        build(tmp_path / "a", "train", 5, seed=7)
        build(tmp_path / "b", "train", 5, seed=7)
        build(tmp_path / "a", "val", 5, seed=7)
        first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
        assert all(first[name] == data for name, data in second.items())
        train = [first[Path("images/train") / f"{i:06d}.jpg"] for i in range(1, 6)]
        val = [first[Path("images/val") / f"{i:06d}.jpg"] for i in range(1, 6)]
        assert not set(train) & set(val)


@pytest.mark.parametrize("build, annotation_files", [(build_single_person_crops, 2),   # COCO JSON, LIP CSV
                                                     (build_multi_person_scenes, 1)])
def test_rendering_in_worker_processes_writes_the_same_files(tmp_path, build, annotation_files):
    build(tmp_path / "serial", "val", 70, image_size=64, workers=1)
    build(tmp_path / "forked", "val", 70, image_size=64, workers=2)   # 70 >= 64: a pool of two processes
    serial, forked = _files(tmp_path / "serial"), _files(tmp_path / "forked")
    assert len(serial) == 70 + annotation_files and serial == forked


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return COCO(str(build_multi_person_scenes(root, "train", 100, image_size=256, seed=0)))


def _check_coco(coco, size):
    category = coco.dataset["categories"][0]
    assert category["id"] == 1 and category["name"] == "person"
    assert category["keypoints"] == list(COCO17.names)
    assert all(1 <= a <= 17 and 1 <= b <= 17 for a, b in category["skeleton"])
    for ann in coco.dataset["annotations"]:
        kps = np.array(ann["keypoints"], float).reshape(17, 3)
        labelled = kps[kps[:, 2] > 0]
        assert ann["num_keypoints"] == len(labelled)
        assert ann["area"] > 0 and ann["segmentation"]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0
        assert (labelled[:, 0] >= x).all() and (labelled[:, 0] <= x + w).all()
        assert (labelled[:, 1] >= y).all() and (labelled[:, 1] <= y + h).all()
        assert ((labelled[:, :2] >= 0) & (labelled[:, :2] < size)).all()
        if ann["iscrowd"]:
            assert ann["num_keypoints"] == 0 and isinstance(ann["segmentation"]["counts"], list)
        else:
            assert all(len(polygon) >= 6 and len(polygon) % 2 == 0 for polygon in ann["segmentation"])
        assert coco.annToMask(ann).sum() > 0


def test_multi_person_coco_json_is_valid(scenes):
    _check_coco(scenes, 256)
    crowd = [a for a in scenes.dataset["annotations"] if a["iscrowd"]]
    assert crowd
    rle = mask_utils.frPyObjects(crowd[0]["segmentation"], 256, 256)
    assert mask_utils.area(rle) == crowd[0]["area"]


def test_polygons_and_rle_reproduce_the_mask():
    mask = np.zeros((60, 80), bool)
    mask[10:30, 5:25] = True
    mask[40:41, 50:70] = True  # a one-pixel-thin part
    mask[20:50, 60:62] = True
    polygons = syn._polygons(mask, (0, 0))
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 60, 80))).astype(bool)
    assert (back & mask).sum() / (back | mask).sum() > 0.95
    rle = mask_utils.frPyObjects(syn._rle(mask), 60, 80)
    assert (mask_utils.decode(rle).astype(bool) == mask).all()


def _overlaps(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_multi_person_difficulty_holds(scenes):
    anns = [a for a in scenes.dataset["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0]
    v = np.array([a["keypoints"] for a in anns]).reshape(-1, 17, 3)[..., 2]
    assert 0.08 <= (v == 1).sum() / (v > 0).sum() <= 0.25
    assert (v == 0).any()  # joints cut off by the border
    heights = np.array([a["bbox"][3] for a in anns]) / 256
    assert heights.min() < 0.15 and heights.max() > 0.7
    crowded = empty = zero_keypoint_people = 0
    for image_id in scenes.getImgIds():
        image_anns = scenes.imgToAnns[image_id]
        people = [a for a in image_anns if not a["iscrowd"] and a["num_keypoints"] > 0]
        overlapping = [a for a in people if any(_overlaps(a["bbox"], b["bbox"]) for b in people if b is not a)]
        crowded += len(overlapping) >= 3
        empty += not image_anns
        zero_keypoint_people += any(a["num_keypoints"] == 0 and not a["iscrowd"] for a in image_anns)
    assert crowded >= 0.25 * len(scenes.getImgIds())   # 29% at COCO-sized people (0.33 when they were 3x smaller)
    assert empty and zero_keypoint_people


def _inside_bands(sizes):
    return {q: lo <= np.percentile(sizes, q) <= hi for q, (lo, hi) in COCO_RELATIVE_SIZE_BANDS.items()}


def test_multi_person_people_are_as_large_as_coco_people(scenes):
    """OKS tolerance scales with sqrt(area): the scenes' people must be sized like COCO's, small ones included."""
    sizes = relative_person_sizes(scenes.dataset)
    assert len(sizes) > 150
    assert all(_inside_bands(sizes).values()), {q: round(float(np.percentile(sizes, q)), 3) for q in (10, 50, 90)}
    assert (sizes < 0.12).mean() > 0.03          # small people, as COCO's medium-sized ones
    if COCO_SAMPLE.exists():                       # the documented bands come from the real annotations
        assert all(_inside_bands(relative_person_sizes(json.loads(COCO_SAMPLE.read_text()))).values())


def test_single_person_crops_and_lip_csv(tmp_path):
    paths = build_single_person_crops(tmp_path, "val", 40, image_size=128, seed=1)
    coco = COCO(str(paths["coco"]))
    _check_coco(coco, 128)
    assert len(coco.dataset["annotations"]) == len(coco.dataset["images"]) == 40
    rows = list(csv.reader(paths["lip"].open()))
    assert len(rows) == 40 and all(len(row) == 49 for row in rows)
    name_to_id = {image["file_name"]: image["id"] for image in coco.dataset["images"]}
    occluded = labelled = 0
    for row in rows:
        joints = np.array(row[1:], float).reshape(16, 3)
        (ann,) = coco.imgToAnns[name_to_id[row[0]]]
        kps = np.array(ann["keypoints"]).reshape(17, 3)
        for j, name in enumerate(MPII16.names):
            if np.isnan(joints[j]).any():
                assert np.isnan(joints[j]).all()
                continue
            assert joints[j, 2] in (0, 1) and (0 <= joints[j, :2]).all() and (joints[j, :2] < 128).all()
            labelled += 1
            occluded += joints[j, 2] == 1
            coco_name = name.replace("r_", "right_").replace("l_", "left_")
            if coco_name in COCO17.names:  # same joint, same place; LIP v=1 is COCO v=1 (occluded)
                k = COCO17.names.index(coco_name)
                assert (kps[k, :2] == joints[j, :2]).all() and (kps[k, 2] == 1) == (joints[j, 2] == 1)
        hips = joints[[2, 3]]
        if not np.isnan(hips).any() and not np.isnan(joints[6]).any():  # pelvis is mid-hips
            assert np.abs(joints[6, :2] - hips[:, :2].mean(0)).max() <= 1.0
    assert 0.03 < occluded / labelled < 0.3


def test_lip_csv_matches_the_real_lip_format(tmp_path):
    if not LIP_SAMPLE.exists():
        pytest.skip("../shared/data is not present")
    real = next(csv.reader(LIP_SAMPLE.open()))
    ours = next(csv.reader(build_single_person_crops(tmp_path, "val", 1)["lip"].open()))
    assert len(ours) == len(real) == 49
    for value in ours[1:] + real[1:]:
        assert value == "nan" or float(value) == int(value)


def test_ensure_dataset_generates_once_and_regenerates_on_new_params(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    path = ensure_crops(num_images=3, num_val=2)
    assert path == tmp_path / "data" / "single_person"
    assert "generated" in capsys.readouterr().out
    assert len(list((path / "images" / "train").glob("*.jpg"))) == 3
    assert (path / "annotations" / "lip_val.csv").exists()
    assert json.loads((path / "params.json").read_text())["num_val"] == 2
    ensure_crops(num_images=3, num_val=2)
    assert "generated" not in capsys.readouterr().out
    ensure_crops(num_images=3, num_val=4)
    assert len(list((path / "images" / "val").glob("*.jpg"))) == 4
    with pytest.raises(TypeError):
        ensure_crops(num_horses=3)
