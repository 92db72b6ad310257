"""Tests of common/: layouts, heatmaps, geometry, evaluation against pycocotools, image/annotation reading."""
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from common.data import AnnotationError, BadImageError, exit_on_bad_input, load_coco_keypoints, read_image
from common.evaluation import COCO_METRIC_NAMES, coco_keypoint_ap, count_flops, count_parameters, pck
from common.geometry import (affine_points, box_to_center_scale, flip_image, flip_keypoints, get_affine_transform,
                             warp_image)
from common.heatmaps import decode_heatmaps, make_heatmaps
from common.keypoints import COCO17, COCO_SIGMAS, get_layout, layout_from_coco_category, layout_from_dict
from common.loader import make_loader
from cpm_animal.model import AP10K17, CAT16, SIGMA_SOURCES
from higher_hrnet.dataset import CROWDPOSE14
from pose_spi.model import POSE_SPI13
from simple_baseline.model import LIP16, MPII16

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_DATA = Path(__file__).resolve().parent / "data"


def shared(path):
    full = SHARED / path
    if not full.exists():
        pytest.skip(f"{full} not present (../shared/data is only beside the development checkout)")
    return full


# ---- layouts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [COCO17, POSE_SPI13, MPII16, CAT16, AP10K17, CROWDPOSE14], ids=lambda l: l.name)
def test_every_layout_flip_pairs_are_symmetric(layout):
    index = layout.flip_index
    assert [index[i] for i in index] == list(range(layout.num_keypoints))  # an involution
    for a, b in layout.flip_pairs:
        names = (layout.names[a], layout.names[b])
        assert any("left" in n or n.startswith("l_") for n in names), names
    assert len(layout.sigmas) == layout.num_keypoints
    assert all(0 <= a < layout.num_keypoints and 0 <= b < layout.num_keypoints for a, b in layout.skeleton)
    assert layout_from_dict(json.loads(json.dumps(layout.as_dict()))) == layout   # as checkpoints store it


def test_pose_spi_sigmas_follow_names_not_positions():
    assert POSE_SPI13.num_keypoints == 13
    for name, sigma in zip(POSE_SPI13.names, POSE_SPI13.sigmas):
        assert sigma == COCO_SIGMAS[name]
    assert POSE_SPI13.sigmas != COCO17.sigmas[:13]
    assert len(POSE_SPI13.flip_pairs) == 6
    assert LIP16 is MPII16 and get_layout("crowdpose14", (COCO17, CROWDPOSE14)) is CROWDPOSE14
    assert MPII16.flip_pairs == ((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13))
    assert CAT16.flip_pairs == ((2, 5), (3, 6), (4, 7), (10, 13), (11, 14), (12, 15))
    assert "AP-10K" in CAT16.sigmas_note


def test_layout_from_coco_category_takes_sigmas_by_name():
    category = json.loads(shared("ap10k_sample/test_ap10k.json").read_text())["categories"][0]
    layout = layout_from_coco_category(category, SIGMA_SOURCES)
    assert layout.names == AP10K17.names and layout.sigmas == AP10K17.sigmas
    assert (0, 1) in layout.skeleton  # 1-based [1, 2] became 0-based
    odd = layout_from_coco_category({"name": "x", "keypoints": ["tip", "base"], "skeleton": [[1, 2]]})
    assert odd.sigmas == (0.05, 0.05) and "uniform" in odd.sigmas_note


# ---- heatmaps -----------------------------------------------------------------------------------

def test_heatmap_round_trip_subpixel_within_quarter_pixel():
    rng = np.random.default_rng(0)
    joints = np.concatenate([rng.uniform(2, 45, (20, 2)), np.full((20, 1), 2.0)], 1)
    maps, weights = make_heatmaps(joints, (48, 48), sigma=2.0, center="subpixel")
    assert maps.shape == (20, 48, 48) and weights.tolist() == [1.0] * 20
    assert np.all(maps.max((1, 2)) > 0.88)  # nearest pixel within 0.71 px of the center
    coords, maxvals = decode_heatmaps(torch.from_numpy(maps)[None])
    assert np.abs(coords[0].numpy() - joints[:, :2]).max() <= 0.25 + 1e-6


def test_heatmap_round_trip_truncate_is_the_integer_pixel():
    joints = np.array([[10.9, 5.2, 2], [0.4, 47.99, 2], [30.0, 30.0, 1]])
    maps, _ = make_heatmaps(joints, (48, 48), sigma=2.0, center="truncate")
    assert np.all(maps.max((1, 2)) == 1.0)  # the peak sits exactly on a pixel
    coords, _ = decode_heatmaps(torch.from_numpy(maps)[None])
    assert np.allclose(coords[0].numpy(), np.trunc(joints[:, :2]))


def test_heatmap_weights_and_edges():
    joints = np.array([[63.0, 47.0, 2], [64.2, 10, 2], [np.nan, np.nan, 0], [5, 5, 0], [-0.2, 3, 1]])
    maps, weights = make_heatmaps(joints, (64, 48), sigma=2.0)
    assert weights.tolist() == [1, 0, 0, 0, 1]
    assert maps[0, 47, 63] == 1.0  # a joint on the last row/column keeps its full peak
    assert maps[1].max() == 0 and maps[2].max() == 0 and maps[3].max() == 0
    signed, _ = make_heatmaps(joints, (64, 48), sigma=2.0, occluded_negative=True)
    assert signed[4].min() < -0.9 and signed[4].max() == 0 and signed[0].max() == 1.0
    # several people: per-joint maximum, the support is +-3 sigma
    two, w = make_heatmaps(np.array([[[10, 10, 2]], [[30, 10, 2]]]), (48, 24), sigma=1.5)
    assert two[0, 10, 10] == 1.0 and two[0, 10, 30] == 1.0 and two[0, 10, 20] == 0.0 and w[0] == 1


# ---- geometry -----------------------------------------------------------------------------------

def test_affine_round_trip_and_warp_lands_points_on_pixels():
    rng = np.random.default_rng(1)
    image = np.zeros((120, 160, 3), np.uint8)
    point = np.array([[70.0, 50.0]])
    image[50, 70] = 255
    for _ in range(5):
        center = rng.uniform(40, 100, 2)
        size = rng.uniform(60, 120, 2)
        rotation = rng.uniform(-45, 45)
        forward = get_affine_transform(center, size, rotation, (96, 128))
        inverse = get_affine_transform(center, size, rotation, (96, 128), inverse=True)
        pts = rng.uniform(0, 150, (10, 2))
        assert np.allclose(affine_points(affine_points(pts, forward), inverse), pts, atol=1e-3)
        warped = warp_image(image, get_affine_transform(point[0], (40, 40), rotation, (81, 81)), (81, 81),
                            interpolation=cv2.INTER_NEAREST)
        ys, xs = np.nonzero(warped[..., 0])
        mapped = affine_points(point, get_affine_transform(point[0], (40, 40), rotation, (81, 81)))[0]
        assert np.allclose(mapped, [40.5, 40.5], atol=1e-4)
        assert np.abs(xs.mean() - mapped[0]) <= 1.0 and np.abs(ys.mean() - mapped[1]) <= 1.0


def test_box_to_center_scale_keeps_aspect_ratio():
    center, size = box_to_center_scale([10, 20, 30, 90], aspect_ratio=0.75)
    assert np.allclose(center, [25, 65]) and np.allclose(size, [67.5 * 1.25, 90 * 1.25])


def test_flip_swaps_left_and_right():
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[5] = [10, 40, 2]   # left_shoulder
    keypoints[6] = [30, 40, 1]   # right_shoulder
    flipped = flip_keypoints(keypoints, 100, COCO17.flip_index)
    assert flipped[6].tolist() == [89, 40, 2] and flipped[5].tolist() == [69, 40, 1]
    assert np.array_equal(flip_keypoints(flipped, 100, COCO17.flip_index), keypoints)
    image = np.arange(12, dtype=np.uint8).reshape(2, 6)
    assert flip_image(image)[0, 0] == 5


# ---- evaluation ---------------------------------------------------------------------------------

def _gt_as_results(coco, perturb=None):
    results = []
    for ann in coco.dataset["annotations"]:
        if ann.get("num_keypoints", 1) == 0:
            continue
        kp = np.array(ann["keypoints"], np.float64).reshape(-1, 3)
        if perturb is not None:
            kp[:, :2] += np.asarray(perturb[str(ann["id"])])
        kp[:, 2] = 1.0
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "keypoints": kp.ravel().tolist(), "score": 1.0})
    return results


def test_coco_ground_truth_as_predictions_gives_ap_one():
    coco = load_coco_keypoints(shared("coco_sample/test_coco.json"))
    metrics = coco_keypoint_ap(coco, _gt_as_results(coco), COCO17.sigmas, print_table=False)
    assert tuple(metrics) == COCO_METRIC_NAMES
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR"] == pytest.approx(1.0)


def test_coco_perturbed_matches_pycocotools_called_directly(capsys):
    ann_file = shared("coco_sample/test_coco.json")
    results = json.loads((TEST_DATA / "coco_sample_perturbed_results.json").read_text())
    ours = coco_keypoint_ap(str(ann_file), results, COCO17.sigmas)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in capsys.readouterr().out
    gt = COCO(str(ann_file))
    direct = COCOeval(gt, gt.loadRes(json.loads((TEST_DATA / "coco_sample_perturbed_results.json").read_text())),
                      "keypoints")
    direct.evaluate(), direct.accumulate(), direct.summarize()
    assert [ours[n] for n in COCO_METRIC_NAMES] == pytest.approx(list(direct.stats), abs=1e-12)
    assert 0.2 < ours["AP"] < 0.99


def test_pose_spi_name_matched_sigmas_beat_first_13_coco_sigmas():
    coco = load_coco_keypoints(shared("pose_spi_toy/annotations/annotations.json"))
    noise = json.loads((TEST_DATA / "pose_spi_toy_noise.json").read_text())["offsets"]
    results = _gt_as_results(coco, noise)
    by_name = coco_keypoint_ap(coco, results, POSE_SPI13.sigmas, print_table=False)["AP"]
    by_position = coco_keypoint_ap(coco, results, COCO17.sigmas[:13], print_table=False)["AP"]
    assert by_name == pytest.approx(0.764, abs=0.01) and by_position == pytest.approx(0.522, abs=0.01)
    assert by_name > by_position + 0.15


def test_pck_hand_made_cases():
    gt = np.zeros((3, 2, 2))
    pred = gt.copy()
    pred[0, 0] = [0.4, 0]   # 0.4 of the norm: correct at 0.5
    pred[1, 0] = [0.6, 0]   # 0.6: wrong at 0.5
    pred[2, 1] = [0, 0.1]   # 0.1: correct, and exactly on the 0.1 threshold
    visible = np.array([[1, 1], [1, 0], [1, 1]], bool)  # the wrong joint 1 of sample 1 is not counted
    pred[1, 1] = [50, 50]
    table = pck(pred, gt, visible, norm=np.ones(3), thresholds=(0.5, 0.1))
    per_joint, mean = table[0.5]
    assert per_joint.tolist() == pytest.approx([2 / 3, 1.0]) and mean == pytest.approx(4 / 5)
    assert table[0.1][0].tolist() == pytest.approx([1 / 3, 1.0])


def test_parameter_and_flop_counts():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_parameters(conv) == 8 * 3 * 9
    assert count_flops(conv, torch.zeros(1, 3, 10, 10)) == 2 * 8 * 3 * 9 * 100
    with torch.device("meta"):
        big = torch.nn.Linear(1000, 1000)
    assert count_parameters(big) == 1_001_000


# ---- reading images and annotations -------------------------------------------------------------

def test_read_image_decodes_by_content_and_normalizes_formats(tmp_path):
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb[..., ::-1])
    jpeg_bytes = cv2.imencode(".jpg", rgb[..., ::-1])[1].tobytes()
    (tmp_path / "jpeg_inside.png").write_bytes(jpeg_bytes)
    cv2.imwrite(str(tmp_path / "gray.png"), np.full((8, 10), 77, np.uint8))
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((8, 10), 65535, np.uint16))
    rgba = np.dstack([rgb[..., ::-1], np.zeros((8, 10), np.uint8)])
    rgba[:4, :, 3] = 255
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    assert read_image(tmp_path / "rgb.png")[0, 0].tolist() == [200, 0, 0]
    jpeg = read_image(tmp_path / "jpeg_inside.png")
    assert jpeg.shape == (8, 10, 3) and abs(int(jpeg[4, 4, 0]) - 200) < 10 and jpeg[4, 4, 2] < 20
    assert read_image(tmp_path / "gray.png")[0, 0].tolist() == [77, 77, 77]
    assert read_image(tmp_path / "deep.png").dtype == np.uint8 and read_image(tmp_path / "deep.png").max() == 255
    alpha = read_image(tmp_path / "rgba.png")
    assert alpha[0, 0].tolist() == [200, 0, 0] and alpha[7, 0].tolist() == [0, 0, 0]


def test_real_toy_png_with_jpeg_data_reads():
    folder = shared("pose_spi_toy/images/train2017")
    jpeg_named_png = [p for p in sorted(folder.glob("*.png")) if p.read_bytes()[:2] == b"\xff\xd8"]
    assert jpeg_named_png, "the toy set is known to hold JPEG data in .png files"
    image = read_image(jpeg_named_png[0])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def _bad_files(tmp_path):
    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), np.full((16, 16, 3), 128, np.uint8))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return good, [tmp_path / "missing.jpg", tmp_path / "empty.jpg", tmp_path / "cut.jpg", tmp_path / "noise.png"]


def test_bad_images_raise_one_line_naming_the_file(tmp_path):
    _, bad = _bad_files(tmp_path)
    for path in bad:
        with pytest.raises(BadImageError) as error:
            read_image(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = read_image(self.paths[index])
        return {"image": torch.from_numpy(image).float().mean(), "noise": torch.rand(())}


def test_loader_with_workers_skips_and_counts_bad_images(tmp_path):
    good, bad = _bad_files(tmp_path)
    paths = [good] * 6 + bad
    loader = make_loader(_ImageList(paths), batch_size=5, shuffle=True, workers=2, seed=3)
    loader.sampler.set_epoch(0)
    batches = list(loader)  # the workers warn about each bad file; nothing raises
    assert sum(b["num_skipped"] for b in batches) == 4
    assert sum(len(b.get("image", [])) for b in batches) == 6
    # same seed and epoch -> same per-sample random draws, whatever worker drew them
    loader.sampler.set_epoch(0)
    again = list(loader)
    assert [b["noise"].tolist() for b in batches if "noise" in b] == [b["noise"].tolist() for b in again if "noise" in b]


def test_sampler_resumes_mid_epoch_with_the_same_samples():
    full = make_loader(_Index(), batch_size=4, shuffle=True, workers=0, seed=5)
    full.sampler.set_epoch(2)
    everything = [b["value"].tolist() for b in full]
    resumed = make_loader(_Index(), batch_size=4, shuffle=True, workers=0, seed=5)
    resumed.sampler.set_epoch(2, start_index=8)
    assert [b["value"].tolist() for b in resumed] == everything[2:]
    sharded = [make_loader(_Index(), 4, True, 0, 5, num_replicas=2, rank=r) for r in (0, 1)]
    seen = []
    for loader in sharded:
        loader.sampler.set_epoch(0)
        seen += [v for b in loader for v in b["index"].tolist()]
    assert sorted(seen) == list(range(20))


class _Index(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, index):
        return {"index": index, "value": float(np.random.rand()) + index}


def test_malformed_annotations_give_one_line_naming_file_and_id(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [ ')
    with pytest.raises(AnnotationError, match="broken.json: malformed JSON"):
        load_coco_keypoints(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "person", "keypoints": ["a", "b"], "skeleton": []}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "keypoints": [1, 1, 2], "bbox": [0, 0, 5, 5],
                         "area": 25, "iscrowd": 0}]}))
    with pytest.raises(AnnotationError) as error:
        load_coco_keypoints(wrong)
    assert "wrong.json: annotation 7:" in str(error.value) and "\n" not in str(error.value)

    def main():
        load_coco_keypoints(wrong)
    with pytest.raises(SystemExit) as exit_info:
        exit_on_bad_input(main)
    assert str(exit_info.value).startswith("error: ") and "annotation 7" in str(exit_info.value)


def test_keypoints_outside_the_image_warn_once_with_a_count_and_make_no_target(tmp_path):
    from pose_spi.dataset import PoseSPIDataset
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 40), np.uint8))
    inside, left, below = [10, 5, 2], [-3, 5, 2], [10, 25, 1]
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}],
           "categories": [{"id": 1, "keypoints": ["nose", "left_eye", "right_eye"]}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "keypoints": inside + left + below,
                            "area": 100, "bbox": [0, 0, 10, 10]}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = PoseSPIDataset(path, tmp_path, input_size=16)
    assert [str(w.message) for w in caught] == [f"{path}: 2 labelled keypoints lie outside their image (negative, "
                                                "or beyond its width or height); training targets leave them out"]
    assert data[0]["target"][:, 2].tolist() == [1.0, 0.0, 0.0]      # the regression target's visibility
    assert data.coco.anns[1]["keypoints"][3:6] == left               # evaluation keeps the file as it is
