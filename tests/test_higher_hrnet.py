"""higher_hrnet training and inference side: AE / heatmap loss vectors, targets, grouping parity, the whole
test pipeline on fake network outputs, GT-as-predictions AP, a tiny training run, torchrun on CPU, eval files.
(Model, checkpoint and classification tests live in test_higher_hrnet_model.py.)"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import munkres
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from common.data import BadImageError, normalize_image, read_image
from common.evaluation import coco_keypoint_ap
from common.geometry import affine_points, flip_keypoints, get_affine_transform, warp_image
from common.heatmaps import joint_centers, make_heatmaps
from common.keypoints import COCO17
from higher_hrnet import eval as hh_eval
from higher_hrnet.benchmark import random_people, randomize_batchnorm, render_fake_maps
from higher_hrnet.dataset import BottomUpDataset, collate_bottom_up, tag_rows
from higher_hrnet.grouping import (GroupingParams, _peaks_above, group_by_tags, group_by_tags_reference, heatmap_nms,
                                   local_maxima_nms, munkres_assignment, topk_peaks)
from higher_hrnet.inference import (InferenceConfig, multi_scale_size, official_affine_transform,
                                    people_to_coco_results, predict_maps, predict_people, prepare_for_inference,
                                    resize_align)
from higher_hrnet.loss import ae_loss, heatmap_loss, multi_resolution_loss
from higher_hrnet.model import build_model
from higher_hrnet.scenes import build_multi_person_scenes

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / ".." / "shared" / "reference"
SHARED_DATA = REPO / ".." / "shared" / "data"


# ---------------------------------------------------------------------------------------------- loss

def official_ae_vector():
    tags = (torch.arange(32) * 0.1).float().view(1, 2, 4, 4)
    rows = torch.tensor([[0, 0, 3], [0, 0, 22], [0, 1, 10], [0, 1, 30]])
    return tags, rows


def test_ae_loss_official_vector():
    tags, rows = official_ae_vector()
    push, pull = ae_loss(tags, rows, "exp")
    assert push.item() == pytest.approx(0.2848914, abs=1e-6)
    assert pull.item() == pytest.approx(0.95125, abs=1e-6)
    push_max, _ = ae_loss(tags, rows, "max")
    assert push_max.item() == pytest.approx(0.125, abs=1e-6)


def test_ae_loss_accepts_half_precision_tags_as_under_autocast():
    # under --amp the network hands bf16/fp16 tags to the loss; it must sum in fp32, not fail in index_add_
    tags, rows = official_ae_vector()
    for dtype in (torch.bfloat16, torch.float16):
        push, pull = ae_loss(tags.to(dtype), rows, "exp")
        assert push.dtype == pull.dtype == torch.float32
        assert push.item() == pytest.approx(0.2848914, abs=2e-3) and pull.item() == pytest.approx(0.95125, abs=2e-3)


def test_ae_loss_batches_are_independent_and_lone_people_do_not_push():
    tags, rows = official_ae_vector()
    batch = torch.cat([torch.zeros_like(tags), tags])
    lone = torch.tensor([[0, 7, 5], [0, 7, 6]])   # sample 0: one person, tags equal -> no push, no pull
    push, pull = ae_loss(batch, torch.cat([lone, rows + torch.tensor([1, 10, 0])]))
    assert push.tolist() == pytest.approx([0.0, 0.2848914], abs=1e-6)
    assert pull.tolist() == pytest.approx([0.0, 0.95125], abs=1e-6)
    push, pull = ae_loss(batch, torch.zeros((0, 3), dtype=torch.long))
    assert push.sum().item() == 0 and pull.sum().item() == 0


def test_heatmap_loss_vector_and_mask():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.ones(1, 2, 2, 2)
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert heatmap_loss(pred, target, mask).item() == pytest.approx(0.75)
    pred[0, :, 0, 1] = 100.0   # a huge error where the mask is 0 does not count
    assert heatmap_loss(pred, target, mask).item() == pytest.approx(0.75)


def test_total_loss_factors():
    tags, rows = official_ae_vector()
    out0 = torch.cat([torch.zeros(1, 2, 4, 4), tags], 1)
    out1 = torch.zeros(1, 2, 8, 8)
    batch = {"heatmaps_0": torch.ones(1, 2, 4, 4), "mask_0": torch.ones(1, 4, 4),
             "heatmaps_1": torch.ones(1, 2, 8, 8), "mask_1": torch.ones(1, 8, 8), "tag_index": rows}
    losses = multi_resolution_loss([out0, out1], batch, num_joints=2)
    assert losses["total"].item() == pytest.approx(2.0 + 1e-3 * (0.2848914 + 0.95125), abs=1e-7)


# ---------------------------------------------------------------------------------------------- targets

def write_coco(root, images, annotations, size=(160, 120)):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for image_id in images:
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), np.full((size[1], size[0], 3), 90, np.uint8))
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": size[0], "height": size[1]} for i in images],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "keypoints": list(COCO17.names), "skeleton": []}]}
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return root / "images", path


def person(points, ann_id, image_id=1):
    kps = np.zeros((17, 3))
    for j, (x, y) in points.items():
        kps[j] = (x, y, 2)
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "keypoints": kps.reshape(-1).tolist(),
            "num_keypoints": len(points), "bbox": [0, 0, 10, 10], "area": 100,
            "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]}


def test_targets_peak_truncation_out_of_bounds_and_crowd_mask(tmp_path):
    crowd = {"id": 9, "image_id": 1, "category_id": 1, "iscrowd": 1, "keypoints": [0] * 51, "num_keypoints": 0,
             "bbox": [100, 20, 40, 40], "area": 1600,
             "segmentation": {"counts": [], "size": [120, 160]}}
    mask = np.zeros((120, 160), np.uint8, order="F")
    mask[20:60, 100:140] = 1
    rle = mask_utils.encode(mask)
    crowd["segmentation"] = {"counts": rle["counts"].decode(), "size": rle["size"]}
    unlabelled = {**person({}, 8), "segmentation": [[10, 80, 40, 80, 40, 110, 10, 110]]}
    # input 480 on a 160x120 image without augmentation: box = short side 120 -> scale 4 at the input,
    # 1 at the 1/4 map, 2 at the 1/2 map; center (80, 60) -> (60, 60) on the 1/4 map: shift -20 in x
    images, ann = write_coco(tmp_path, [1], [person({0: (50.7, 30.2), 5: (-30.0, 40.0)}, 1), crowd, unlabelled])
    dataset = BottomUpDataset(images, ann, input_size=480, augment=False)
    sample = dataset[0]
    heat = sample["heatmaps_0"].numpy()
    assert heat.shape == (17, 120, 120)
    y, x = np.unravel_index(np.argmax(heat[0]), heat[0].shape)
    assert (x, y) == (int(50.7 - 20), int(30.2)) and heat[0, y, x] == pytest.approx(1.0)
    assert heat[5].max() == 0                                        # outside the map: no target
    assert heat[1:5].max() == 0 and heat[6:].max() == 0
    rows = sample["tag_rows"].numpy()
    assert rows.tolist() == [[0, 0 * 120 * 120 + 30 * 120 + 30]]      # only the joint on the map
    m0 = sample["mask_0"].numpy()
    assert m0[40, 100] == 0 and m0[40, 60] == 1                      # crowd region (x 100-140 -> 80-120)
    assert m0[95, 10] == 0                                           # zero-keypoint person (x 10-40 -> -10..20)
    half = sample["heatmaps_1"].numpy()
    y, x = np.unravel_index(np.argmax(half[0]), half[0].shape)
    assert (x, y) == (int(2 * (50.7 - 20)), int(2 * 30.2))


def test_padding_is_ignored_after_a_random_affine(tmp_path):
    images, ann = write_coco(tmp_path, [1], [person({0: (80, 60)}, 1)])
    dataset = BottomUpDataset(images, ann, input_size=128, augment=True, min_scale=1.5, max_scale=1.5,
                              max_rotation=30, max_translate=0, flip=0.0)
    np.random.seed(3)
    sample = dataset[0]
    image = sample["image"].numpy()
    for i in (0, 1):
        mask = sample[f"mask_{i}"].numpy()
        res = mask.shape[0]
        # zoomed out by 1.5: the corners and the left/right bands are padding
        assert mask[0, 0] == 0 and mask[res // 2, 0] == 0 and mask[res // 2, res - 1] == 0
        assert mask[res // 2, res // 2] == 1
    assert np.allclose(image[:, 0, 0], image[:, 0, 1])   # padding is constant in the image too


def test_flip_swaps_joints_and_collate_offsets_people(tmp_path):
    images, ann = write_coco(tmp_path, [1, 2], [person({5: (40.0, 60.0), 6: (100.0, 60.0)}, 1),
                                                 person({0: (70, 50)}, 2, image_id=2), person({0: (90, 50)}, 3, image_id=2)])
    dataset = BottomUpDataset(images, ann, input_size=120, augment=True, min_scale=1, max_scale=1,
                              max_rotation=0, max_translate=0, flip=1.0)
    sample = dataset[0]
    heat = sample["heatmaps_0"].numpy()   # 30x30 map, box 120 -> scale 1/4, x offset (120-160)/2/4 = -5
    x5 = np.unravel_index(np.argmax(heat[5]), heat[5].shape)[1]
    x6 = np.unravel_index(np.argmax(heat[6]), heat[6].shape)[1]
    # left shoulder (5) now lies where the mirrored right shoulder was
    assert x5 == int(30 - (100 / 4 - 5) - 1) and x6 == int(30 - (40 / 4 - 5) - 1)
    batch = collate_bottom_up([dataset[0], dataset[1]])
    people = batch["tag_index"][:, :2].tolist()
    assert sorted({tuple(p) for p in people}) == [(0, 0), (1, 1), (1, 2)]


def test_tag_rows_per_joint_and_shared():
    joints = np.array([[[3.9, 2.2, 2], [10.0, 1.0, 2], [1.0, 1.0, 0]]], np.float32)
    assert tag_rows(joints, (8, 4)).tolist() == [[0, 0 * 32 + 2 * 8 + 3]]
    assert tag_rows(joints, (8, 4), tag_per_joint=False).tolist() == [[0, 2 * 8 + 3]]


def heatmaps_before_issue17(joints, heatmap_size, sigma, center, occluded_negative):
    """common.heatmaps.make_heatmaps as it drew before issue 17 (full-map outer products per person;
    the centers are unchanged): a training recipe is tuned on its values, so the fast version must
    give the same bits."""
    x, y, v, drawn = joint_centers(joints, heatmap_size, center)
    width, height = int(heatmap_size[0]), int(heatmap_size[1])
    heatmaps = np.zeros((drawn.shape[1], height, width), np.float32)
    negative = np.zeros_like(heatmaps)
    px, py = np.where(drawn, x, 0.0)[..., None], np.where(drawn, y, 0.0)[..., None]
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    gx = np.exp(-((xs - px) ** 2) / (2 * sigma ** 2)) * (np.abs(xs - px) <= 3 * sigma + 0.5)
    gy = np.exp(-((ys - py) ** 2) / (2 * sigma ** 2)) * (np.abs(ys - py) <= 3 * sigma + 0.5)
    gx, gy = (gx * drawn[..., None]).astype(np.float32), gy.astype(np.float32)
    for person in range(drawn.shape[0]):
        gauss = gy[person][:, :, None] * gx[person][:, None, :]
        if occluded_negative:
            occluded = (v[person] == 1)[:, None, None]
            np.maximum(negative, np.where(occluded, gauss, 0), out=negative)
            gauss = np.where(occluded, 0, gauss)
        np.maximum(heatmaps, gauss, out=heatmaps)
    if occluded_negative:
        heatmaps[:] = np.where(negative > heatmaps, -negative, heatmaps)
    return heatmaps, drawn.any(0).astype(np.float32)


def tag_rows_before_issue17(joints, map_size, tag_per_joint=True):
    width, height = map_size
    rows = []
    for person, kps in enumerate(joints):
        x, y = np.trunc(kps[:, 0]), np.trunc(kps[:, 1])
        ok = (kps[:, 2] > 0) & (x >= 0) & (y >= 0) & (x < width) & (y < height)
        flat = y[ok].astype(np.int64) * width + x[ok].astype(np.int64)
        if tag_per_joint:
            flat = flat + np.flatnonzero(ok) * height * width
        rows += [(person, int(f)) for f in flat]
    return np.array(rows, np.int64).reshape(-1, 2)


def test_targets_keep_their_values_bit_for_bit():
    rng = np.random.default_rng(0)
    for i in range(60):
        people, joints = int(rng.integers(0, 12)), int(rng.integers(1, 18))
        width, height = (int(v) for v in rng.integers(5, 140, 2))
        points = np.zeros((people, joints, 3), np.float32)
        points[..., 0] = rng.uniform(-10, width + 10, (people, joints))
        points[..., 1] = rng.uniform(-10, height + 10, (people, joints))
        points[..., 2] = rng.integers(0, 3, (people, joints))
        if i % 4 == 0:
            points[..., :2] = np.round(points[..., :2])   # centers on pixels: support edges exactly at +-radius
        if i % 7 == 0 and people:
            points[0, 0, 0] = np.nan
        sigma = float(rng.choice([1.0, 2.0, 2.5, 3.7]))
        for center in ("subpixel", "truncate"):
            for occluded in (False, True):
                new = make_heatmaps(points, (width, height), sigma, center, occluded)
                old = heatmaps_before_issue17(points, (width, height), sigma, center, occluded)
                assert all(a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in zip(new, old))
        for per_joint in (True, False):
            assert np.array_equal(tag_rows(points, (width, height), per_joint),
                                  tag_rows_before_issue17(points, (width, height), per_joint))


# ---------------------------------------------------------------------------------------------- grouping

def official_vectors():
    path = REFERENCE / "official_grouping_vectors.npz"
    if not path.is_file():
        pytest.skip("../shared/reference/official_grouping_vectors.npz is not here")
    return np.load(path)


# (suffix of the stored outputs, adjust, refine): the three calls official_vectors.md describes
OFFICIAL_CALLS = (("", True, True), ("_adjust_norefine", True, False), ("_noadjust_norefine", False, False))


def assert_official_outputs(case, heatmaps, tags, params=None):
    """Both parsers return exactly what the official parser (munkres 1.1.4) returned for this case."""
    for suffix, adjust, refine in OFFICIAL_CALLS:
        params = GroupingParams(adjust=adjust, refine=refine)
        for group in (group_by_tags, group_by_tags_reference):
            people, scores = group(heatmaps, tags, params)
            expected, expected_scores = case(f"people{suffix}"), case(f"scores{suffix}")
            assert people.dtype == np.float32 and scores.dtype == np.float32
            assert people.shape == expected.shape, (group.__name__, suffix)
            assert np.array_equal(people, expected) and np.array_equal(scores, expected_scores), (group.__name__, suffix)


@pytest.mark.parametrize("case", range(8))
def test_grouping_equals_the_official_parser_on_its_vectors(case):
    vectors = official_vectors()
    assert_official_outputs(lambda key: vectors[f"case{case}_{key}"], vectors[f"case{case}_heatmaps"],
                            vectors[f"case{case}_tags"])


def test_grouping_equals_the_official_parser_on_the_in_repo_vector():
    # case 6 of the official vectors, kept in the repository: equal tags merge as in the official dict
    vector = np.load(REPO / "tests" / "data" / "official_grouping_case6.npz")
    assert_official_outputs(lambda key: vector[key], vector["heatmaps"], vector["tags"])
    created, _ = group_by_tags(vector["heatmaps"], vector["tags"], GroupingParams(merge_equal_tags=False))
    literal, _ = group_by_tags_reference(vector["heatmaps"], vector["tags"], GroupingParams(merge_equal_tags=False))
    assert np.array_equal(created, literal) and len(created) == 5 > len(vector["people"]) == 3


def random_tied_costs(rng, count):
    """Cost matrices as the official matcher builds them (round(distance) * 100 - score, 1e10 columns
    when candidates outnumber people) and plain small-integer ones: tied optima everywhere."""
    for i in range(count):
        rows, cols = (int(v) for v in rng.integers(1, 31, 2))
        if i % 3 == 0:
            cost = rng.integers(0, 4, (rows, cols)).astype(np.float64)
        else:
            distance = rng.choice([0.2, 0.7, 1.3, 2.2, 3.0], (rows, cols))
            scores = rng.integers(10, 100, (rows, 1 + (i % 3 == 2) * (cols - 1))) / 128
            cost = np.round(distance) * 100 - scores
        if rows > cols:
            cost = np.concatenate((cost, np.zeros((rows, rows - cols)) + 1e10), axis=1)
        yield cost


def test_munkres_assignment_equals_munkres_1_1_4_on_tied_matrices():
    assert munkres.__version__ == "1.1.4"   # the release the official parser ran with (requirements.txt)
    for cost in random_tied_costs(np.random.default_rng(0), 400):
        expected = np.array(munkres.Munkres().compute(cost.copy())).reshape(-1, 2)
        rows, cols = munkres_assignment(cost)
        assert np.array_equal(rows, expected[:, 0]) and np.array_equal(cols, expected[:, 1]), cost.shape


def test_heatmap_nms_keeps_local_maxima_and_topk_finds_them():
    peaks = torch.zeros(1, 1, 20, 20)
    peaks[0, 0, 5, 5], peaks[0, 0, 5, 6], peaks[0, 0, 15, 12] = 0.9, 0.5, 0.7
    nms = heatmap_nms(peaks, 5)
    assert nms[0, 0, 5, 6] == 0 and nms[0, 0, 5, 5] == 0.9
    scores, xs, ys = topk_peaks(nms, 2)
    assert scores[0, 0].tolist() == pytest.approx([0.9, 0.7]) and xs[0, 0].tolist() == [5, 12]
    assert ys[0, 0].tolist() == [5, 15]


def test_fast_nms_equals_max_pool_nms():
    rng = np.random.default_rng(0)
    for sparse in (False, True):   # dense maps: one dilation; sparse: the windows of the few pixels above
        det = rng.random((3, 37, 41)).astype(np.float32)
        if sparse:
            det *= rng.random(det.shape) < 0.002
        det[0, 5:9, 5:9] = 0.7   # plateaus: every equal maximum survives in both
        det[1, :3, :3] = 2.0     # a maximum on the border
        expected = heatmap_nms(torch.from_numpy(det)[None], 5)[0].numpy()
        assert np.array_equal(local_maxima_nms(det, 5), expected)
        assert (np.sum(det > 0.1) * 25 <= det.size // 4) == sparse
        assert np.array_equal(_peaks_above(det, 0.1, 5), np.flatnonzero(expected > 0.1))


@pytest.mark.parametrize("seed", range(6))
def test_fast_grouping_equals_reference_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    tag_dim = 1 + seed % 2
    heat = rng.random((17, 32, 44)).astype(np.float32) ** 3
    tags = (rng.normal(0, 1.5, (17, 32, 44, tag_dim))).astype(np.float32)
    if seed >= 4:
        tags = np.round(tags)   # many exact ties in tag distance and equal tag values (merged people)
        heat = np.round(heat * 8) / 8   # equal scores: the candidates' order is torch.topk's
    params = GroupingParams(max_num_people=30 if seed < 3 else 12, detection_threshold=0.1 if seed else 0.3,
                            merge_equal_tags=seed != 5)
    fast, fast_scores = group_by_tags(heat, tags, params)
    ref, ref_scores = group_by_tags_reference(heat, tags, params)
    assert len(ref) > 1 and np.array_equal(fast, ref)
    assert np.array_equal(fast_scores, ref_scores)


@pytest.mark.parametrize("num_people,shared_tag", [(3, False), (12, False), (40, False), (6, True)])
def test_fast_grouping_equals_reference_on_rendered_people(num_people, shared_tag):
    size = (96, 80)
    people = random_people(num_people, size, seed=num_people, missing=0.2)
    heat, tags = render_fake_maps(people, size, sigma=2.0, seed=num_people, tags=np.arange(num_people)[:, None] * 1.5)
    if shared_tag:
        tags = tags[:1]      # one tag map for all joints (rtpe's layout)
    fast, _ = group_by_tags(heat, tags)
    ref, _ = group_by_tags_reference(heat, tags)
    assert np.array_equal(fast, ref)


def test_grouping_separates_rendered_people():
    size = (120, 90)
    people = random_people(4, size, seed=1, missing=0.0)
    heat, tags = render_fake_maps(people, size, sigma=2.0, seed=1, tag_noise=0.02)
    found, scores = group_by_tags(heat, tags)
    assert len(found) == 4 and scores.min() > 0.9
    for p in people:
        match = found[np.argmin([np.abs(f[:, :2] - 0.5 - p[:, :2]).max() for f in found])]
        assert np.abs(match[:, :2] - 0.5 - p[:, :2]).max() <= 0.75    # +0.5 pixel-center convention, +-0.25 step


# ---------------------------------------------------------------------------------------------- pipeline

class FakeHigherHRNet(torch.nn.Module):
    """Renders known people (input pixels) as HigherHRNet outputs: flip-equivariant like a perfect network."""

    def __init__(self, people_input, expected_input, sigma=1.5):
        super().__init__()
        self.people, self.expected, self.sigma = people_input, expected_input, sigma
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        height, width = x.shape[2:]
        people = self.people
        if not torch.equal(x, self.expected):
            assert torch.equal(x, self.expected.flip(3)), "unexpected input"
            people = flip_keypoints(people, width, COCO17.flip_index)
        outputs = []
        for stride, with_tags in ((4, True), (2, False)):
            # output pixel i covers input pixels around stride * i + (stride - 1) / 2 (align_corners=False)
            on_map = people.copy()
            on_map[..., :2] = (people[..., :2] - (stride - 1) / 2) / stride
            heat, tags = render_fake_maps(on_map, (width // stride, height // stride), sigma=self.sigma,
                                          tags=np.arange(len(people))[:, None] * 3.0, tag_noise=0.0, heat_noise=0.0)
            out = torch.from_numpy(heat)
            if with_tags:
                out = torch.cat([out, torch.from_numpy(tags[..., 0])])
            outputs.append(out[None])
        return outputs


def test_resize_equals_the_official_resize_vectors():
    path = REFERENCE / "official_resize_vectors.json"
    if not path.is_file() or not (SHARED_DATA / "coco_sample").is_dir():
        pytest.skip("../shared/reference/official_resize_vectors.json or ../shared/data/coco_sample is not here")
    vectors = json.loads(path.read_text())
    sha256 = lambda array: hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    for entry in vectors["images"]:
        image = read_image(SHARED_DATA / "coco_sample" / entry["file"])
        assert sha256(image) == entry["input_sha256"]          # same decoding as cv2.imread + BGR2RGB
        size, center, box = multi_scale_size(*image.shape[:2], vectors["input_size"], 1.0, 1.0)
        assert list(size) == entry["resized_wh"] and center.tolist() == entry["center"]
        assert (box / 200).tolist() == [float(v) for v in entry["scale_repr"]]
        matrix = official_affine_transform(center, box, 0, size)
        assert matrix.dtype == np.float64 and [[v.hex() for v in row] for row in matrix.tolist()] == entry["affine_hex"]
        resized, _, _ = resize_align(image, vectors["input_size"])
        assert sha256(resized) == entry["resized_sha256"], entry["file"]


def test_official_affine_matrix_in_repo():
    # official_resize_vectors.json, 000000197388.jpg (392 x 640): the diagonal differs in the last bit
    size, center, box = multi_scale_size(392, 640, 512, 1.0, 1.0)
    assert size == (896, 512) and center.tolist() == [320, 196] and (box / 200).tolist() == [3.43, 1.96]
    expected = [["0x1.4e5e0a72f053ap+0", "-0x0.0p+0", "0x1.e0a72f0539784p+4"],
                ["-0x1.999999999999ap-54", "0x1.4e5e0a72f0539p+0", "0x0.0p+0"]]
    assert [[v.hex() for v in row] for row in official_affine_transform(center, box, 0, size).tolist()] == expected


class RandomOutputs(torch.nn.Module):
    """Fixed random HigherHRNet-shaped outputs per input size, different for the mirrored input."""

    def __init__(self, num_joints=17):
        super().__init__()
        self.num_joints, self.first = num_joints, {}
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        height, width = x.shape[2:]
        flipped = self.first.setdefault((height, width), x) is not x and not torch.equal(x, self.first[(height, width)])
        generator = torch.Generator().manual_seed(height * 7 + width * 3 + flipped)
        k = self.num_joints
        return [torch.randn(1, 2 * k, height // 4, width // 4, generator=generator),
                torch.randn(1, k, height // 2, width // 2, generator=generator)]


def official_maps(model, image, config, flip_index, k=17):
    """The official tools/valid.py + get_multi_stage_outputs + aggregate_results arithmetic, literally."""
    def resize(s):
        size, center, box = multi_scale_size(*image.shape[:2], config.input_size, s, min(config.scales))
        return normalize_image(warp_image(image, official_affine_transform(center, box, 0, size), size))[None]

    up = lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    base, _, _ = multi_scale_size(*image.shape[:2], config.input_size, 1.0, min(config.scales))
    final, tag_list = None, []
    for s in sorted(config.scales, reverse=True):
        x = resize(s)
        heatmaps, tags = [], []
        for flipped in (False, True) if config.flip else (False,):
            outputs = model(torch.flip(x, [3]) if flipped else x)
            average = 0
            for i, output in enumerate(outputs):
                if i != len(outputs) - 1:
                    output = up(output, outputs[-1].shape[2:])
                if flipped:
                    output = torch.flip(output, [3])
                average += output[:, :k][:, flip_index] if flipped else output[:, :k]
                if i == 0:
                    tags.append(output[:, k:][:, flip_index] if flipped else output[:, k:])
            heatmaps.append(average / len(outputs))
        if config.project_to_image:
            heatmaps = [up(h, (base[1], base[0])) for h in heatmaps]
            tags = [up(t, (base[1], base[0])) for t in tags]
        if s == 1:
            if final is not None and not config.project_to_image:
                tags = [up(t, final.shape[2:]) for t in tags]
            tag_list += [t[..., None] for t in tags]
        average = (heatmaps[0] + heatmaps[1]) / 2.0 if config.flip else heatmaps[0]
        if final is None:
            final = average
        elif config.project_to_image:
            final += average
        else:
            final += up(average, final.shape[2:])
    return final / float(len(config.scales)), torch.cat(tag_list, dim=4)


@pytest.mark.parametrize("scales,flip,project", [((1.0,), True, True), ((1.0,), False, True), ((2.0, 1.0, 0.5), True, True),
                                                  ((1.0, 0.5), True, False)])
def test_predict_maps_merges_outputs_as_the_official_code(scales, flip, project):
    image = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    config = InferenceConfig(input_size=64, scales=scales, flip=flip, project_to_image=project)
    heatmaps, tags, _, _ = predict_maps(RandomOutputs(), image, config, COCO17.flip_index)
    expected_heatmaps, expected_tags = official_maps(RandomOutputs(), image, config, COCO17.flip_index)
    assert torch.equal(heatmaps, expected_heatmaps[0]) and torch.equal(tags, expected_tags[0])


def test_prepared_model_folds_every_batchnorm_and_keeps_outputs():
    model = randomize_batchnorm(build_model(4)).eval()   # outputs of order 1-10, not ~0
    prepared = prepare_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())   # deconv's too
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())          # a copy was folded
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        plain, fast = model(x), prepared(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(plain, fast):
        assert a.abs().max() > 1 and (a - b).abs().max() < 1e-4


def test_whole_pipeline_recovers_known_people_on_a_non_square_image():
    height, width = 150, 230
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    truth = np.zeros((3, 17, 3))
    for p, (cx, cy, h) in enumerate([(50, 70, 90), (120, 80, 100), (190, 60, 70)]):
        truth[p, :, 0] = cx + rng.uniform(-0.2, 0.2, 17) * h
        truth[p, :, 1] = cy + np.linspace(-0.45, 0.45, 17) * h
        truth[p, :, 2] = 2
    config = InferenceConfig(input_size=128)
    resized, center, box = resize_align(image, config.input_size)
    (w_in, h_in), _, _ = multi_scale_size(height, width, config.input_size, 1.0, 1.0)
    assert resized.shape[:2] == (h_in, w_in) == (128, 256)
    to_input = get_affine_transform(center, box, 0, (w_in, h_in))
    model = FakeHigherHRNet(affine_points(truth, to_input), normalize_image(resized)[None])
    for flip in (True, False):
        found, scores = predict_people(model, image, InferenceConfig(input_size=128, flip=flip))
        assert len(found) == 3 and scores.min() > 0.5
        order = np.argsort(found[:, :, 0].mean(1))
        error = np.abs(found[order][:, :, :2] - truth[:, :, :2])
        assert error.max() <= 1.0, error.max()
        assert found.shape[2] == 3 + (2 if flip else 1)


def test_ground_truth_as_predictions_gives_ap_one(tmp_path):
    ann = build_multi_person_scenes(tmp_path, "val", 6, image_size=96, seed=5)
    data = json.loads(Path(ann).read_text())
    results = []
    for image in data["images"]:
        people = [a for a in data["annotations"] if a["image_id"] == image["id"] and a["num_keypoints"] > 0]
        kps = np.array([a["keypoints"] for a in people], np.float32).reshape(-1, 17, 3)
        kps[..., 2] = (kps[..., 2] > 0).astype(np.float32)
        results += people_to_coco_results(kps, np.ones(len(kps)), image["id"])
    assert results
    metrics = coco_keypoint_ap(str(ann), results, COCO17.sigmas, print_table=False)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    train = build_multi_person_scenes(root, "train", 4, image_size=96, seed=1)
    val = build_multi_person_scenes(root, "val", 2, image_size=96, seed=1)
    return root, train, val


def test_tiny_model_training_loss_drops(tiny_scenes):
    root, train, _ = tiny_scenes
    torch.manual_seed(0)
    np.random.seed(0)
    dataset = BottomUpDataset(root / "images" / "train", train, input_size=64, augment=False)
    batch = collate_bottom_up([dataset[i] for i in range(len(dataset))])
    model = build_model(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = multi_resolution_loss(model(batch["image"]), batch, 17)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and min(losses[-3:]) < 0.7 * losses[0], losses


def test_tiny_model_learns_to_find_people_through_the_eval_path(tmp_path):
    """A W8 HigherHRNet trained 150 steps on four built-in scenes finds their people: COCO AP > 0 through
    evaluate_model (what eval.py runs), official thresholds without flip test. The four scenes are the largest
    single-person ones of 40 rendered at 128 px, so that the run is short and its AP far from 0 (0.77 to 0.96
    over five training seeds); training and evaluation use the same images: this proves the training,
    decoding and evaluation paths fit together, not generalisation."""
    ann = build_multi_person_scenes(tmp_path, "val", 40, image_size=128, seed=1)
    data = json.loads(Path(ann).read_text())
    labelled = [a for a in data["annotations"] if a["num_keypoints"] > 0]
    counts = np.bincount([a["image_id"] for a in labelled])
    crowd = {a["image_id"] for a in data["annotations"] if a.get("iscrowd")}
    singles = sorted((a for a in labelled if counts[a["image_id"]] == 1 and a["image_id"] not in crowd),
                     key=lambda a: -a["area"])[:4]
    keep = {a["image_id"] for a in singles}
    subset = tmp_path / "four.json"
    subset.write_text(json.dumps({**data, "images": [i for i in data["images"] if i["id"] in keep],
                                  "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}))
    torch.manual_seed(0)
    dataset = BottomUpDataset(tmp_path / "images" / "val", subset, input_size=128, augment=False)
    batch = collate_bottom_up([dataset[i] for i in range(len(dataset))])
    model = build_model(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(150):
        loss = multi_resolution_loss(model(batch["image"]), batch, 17, push_factor=0.1, pull_factor=0.1,
                                     ae_type="max", foreground_weight=10.0)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    config = InferenceConfig(input_size=128, flip=False)
    metrics, results = hh_eval.evaluate_model(model, tmp_path / "images" / "val", subset, config, progress=False,
                                              print_table=False)
    assert results and metrics["AP"] > 0.2, metrics


def test_torchrun_one_step_then_eval_writes_its_files(tiny_scenes, tmp_path, capsys):
    root, train, val = tiny_scenes
    env = {**os.environ, "POSE_OUTPUT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "higher_hrnet" / "train.py"), "--width", "4", "--input-size", "64", "--batch-size", "1",
               "--max-steps", "1", "--workers", "0", "--device", "cpu", "--run-name", "ddp",
               "--data", str(root / "images" / "train"), "--ann", str(train)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = tmp_path / "checkpoints" / "higher_hrnet" / "ddp" / "last.pt"
    assert checkpoint.is_file()
    assert torch.load(checkpoint, weights_only=True)["step"] == 1

    args = hh_eval.parse_args(["--checkpoint", str(checkpoint), "--data", str(root / "images" / "val"),
                               "--ann", str(val), "--run-name", "e", "--out", str(tmp_path), "--device", "cpu"])
    assert hh_eval.main(args) == 0
    assert f"COCO keypoint AP on 2 images of {val}:" in capsys.readouterr().out
    out = tmp_path / "outputs" / "higher_hrnet" / "e"
    assert {p.name for p in out.iterdir()} == {"results.json", "coco_output.txt", "config.yaml"}
    info = json.loads(Path(val).read_text())
    info.pop("annotations"), info.pop("categories")
    (tmp_path / "image_info.json").write_text(json.dumps(info))
    args = hh_eval.parse_args(["--checkpoint", str(checkpoint), "--data", str(root / "images" / "val"),
                               "--ann", str(tmp_path / "image_info.json"), "--run-name", "t", "--out", str(tmp_path)])
    assert hh_eval.main(args) == 0
    assert [p.name for p in (tmp_path / "outputs" / "higher_hrnet" / "t").iterdir()] == ["results.json"]
    args = hh_eval.parse_args(["--checkpoint", str(checkpoint), "--data", str(tmp_path), "--ann", str(val),
                               "--out", str(tmp_path), "--device", "cpu"])
    with pytest.raises(BadImageError, match=f"{tmp_path}: none of the 2 images of .* could be read"):
        hh_eval.main(args)      # a folder without the images: an error, not AP 0


def test_infer_takes_the_inference_settings_eval_has():
    """infer.py and eval.py share their test-setting flags (issue 20), and both reach the Predictor's config."""
    from higher_hrnet import infer as hh_infer
    flags = ["--inference", "seed", "--input-size", "320", "--scales", "2", "1", "--no-flip",
             "--detection-threshold", "0.3", "--tag-threshold", "0.7"]
    for args in (hh_infer.parse_args(flags), hh_eval.parse_args(flags)):
        predictor = hh_infer.Predictor(build_model(4), {"input_size": 256, "layout": COCO17.as_dict()},
                                       args.inference, **hh_infer.inference_overrides(args))
        config = predictor.config
        assert (config.input_size, config.scales, config.flip) == (320, (2.0, 1.0), False)
        assert (config.detection_threshold, config.tag_threshold) == (0.3, 0.7)
    default = hh_infer.Predictor(build_model(4), {"input_size": 256, "layout": COCO17.as_dict()},
                                 **hh_infer.inference_overrides(hh_infer.parse_args([])))
    assert (default.config.input_size, default.config.flip, default.config.detection_threshold) == (256, True, 0.1)
