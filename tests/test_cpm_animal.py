"""Tests of cpm_animal: the seed model's size and shapes, the seed JSON reader, flip/crop/rotation keeping
keypoints on their pixels, signed targets, PCK, the preset overrides, a short overfit and the three scripts."""
from __future__ import annotations

import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cpm_animal import eval as cpm_eval
from cpm_animal import infer, train
from cpm_animal.dataset import (ImageCache, KeypointCrops, check_heatmap_size, denormalize, load_coco_records,
                                load_seed_json)
from cpm_animal.eval import compute_metrics, ground_truth, predict
from cpm_animal.infer import decode_predictions
from cpm_animal.model import CAT16, CPM, NORMS, SIZES, config_from_dict, heatmap_size, target_codec
from cpm_animal.presets import PresetError, load_preset
from cpm_animal.quadrupeds import render_quadruped
from cpm_animal.train import cpm_loss

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CATS = SHARED / "cats_akd" / "train"
TINY = {"size": "tiny"}
NAMES = CAT16.names


def test_original_size_has_the_seed_parameter_count_and_output_shape():
    with torch.device("meta"):
        model = CPM(SIZES["original"])
        out = model(torch.empty(2, 3, 368, 368))
    assert sum(p.numel() for p in model.parameters()) == 40_205_052
    assert tuple(out.shape) == (7, 2, 16, 45, 45)
    assert heatmap_size(model.config) == (45, 45)


@pytest.mark.parametrize("norm", NORMS)
def test_other_input_sizes_work_with_every_norm(norm):
    model = CPM(config_from_dict({**TINY, "norm_layer": norm, "input_size": [72, 56], "stages": 3,
                         "center_map": True, "background": True, "drop_rate": 0.2}))
    out = model(torch.randn(2, 3, 56, 72))
    assert tuple(out.shape) == (3, 2, 17, 13, 17)  # 16 keypoints + background; 56 -> 27 -> 13, 72 -> 35 -> 17
    assert heatmap_size(model.config) == (17, 13)


def test_layer_norm_model_rejects_another_input_size():
    model = CPM(config_from_dict({**TINY, "norm_layer": "layer"}))
    with pytest.raises(ValueError, match="fixes the input"):
        model(torch.randn(1, 3, 80, 80))


def write_cat_json(folder: Path, with_corrupt=True):
    (folder / "images").mkdir(parents=True)
    images, keypoints = {}, {}
    for i in range(3):
        cv2.imwrite(str(folder / "images" / f"c{i}.jpg"), np.full((40, 60, 3), 90, np.uint8))
        images[str(i)] = {"file_name": f"c{i}.jpg", "width": 60, "height": 40}
        keypoints[str(i)] = {n: [0.1 + 0.05 * k, 0.2 + 0.04 * k, k % 2] for k, n in enumerate(NAMES)}
    if with_corrupt:
        keypoints["2"] = {n: [1.99, 1.99, 1] for n in NAMES}
    ann = folder / "train_keypoints_annotations.json"
    ann.write_text(json.dumps({"info": {}, "images": images, "keypoints": keypoints}))
    return ann


def test_seed_json_parser_reads_x_first_and_drops_the_corrupt_entry(tmp_path, capsys):
    records = load_seed_json(write_cat_json(tmp_path))
    assert [r["id"] for r in records] == ["0", "1"]
    assert "annotation 2" in capsys.readouterr().out
    kpts = records[0]["keypoints"]
    assert kpts[1, 0] == pytest.approx(0.15 * 60) and kpts[1, 1] == pytest.approx(0.24 * 40)  # x first
    assert kpts[0, 2] == 1 and kpts[1, 2] == 2  # seed 0 occluded -> 1, seed 1 visible -> 2


def test_real_cat_json_drops_the_entry_outside_its_image(capsys):
    if not CATS.is_dir():
        pytest.skip("../shared/data is absent")
    records = load_seed_json(CATS / "train_keypoints_annotations.json")
    out = capsys.readouterr().out
    assert "annotation 137" in out and "outside the image" in out
    ann = json.loads((CATS / "train_keypoints_annotations.json").read_text())
    present = sum((CATS / "images" / info["file_name"]).is_file() for info in ann["images"].values())
    assert len(records) == present - 1 and "137" not in {r["id"] for r in records}  # 136 in the shared sample


def test_coco_animal_reader_crops_ap10k_boxes(tmp_path):
    folder = SHARED / "ap10k_sample"
    if not folder.is_dir():
        pytest.skip("../shared/data is absent")
    records, layout = load_coco_records(folder / "test_ap10k.json", folder, "ap10k17")
    assert len(records) == 2 and layout.num_keypoints == 17
    config = CPM(config_from_dict({**TINY, "num_keypoints": 17})).config
    sample = KeypointCrops(records, layout, config, {}, ImageCache(tmp_path, 256), target_codec(config, 1.5))[0]
    assert tuple(sample["heatmap"].shape) == (17, 15, 15)
    labelled = sample["gt"][:, 2] > 0
    back = sample["inverse"][:, :2] @ sample["keypoints"][:, :2].T + sample["inverse"][:, 2:]
    assert torch.allclose(back.T[labelled], sample["gt"][labelled, :2], atol=0.05)


def dot_records(tmp_path, size=(160, 120)):
    """An image with one colored disc per keypoint (color k -> keypoint k) and its record."""
    width, height = size
    rng = np.random.default_rng(3)
    image = np.zeros((height, width, 3), np.uint8)
    grid_x, grid_y = np.meshgrid(np.linspace(35, width - 35, 4), np.linspace(30, height - 30, 4))
    points = np.stack([grid_x.ravel(), grid_y.ravel()], 1) + rng.uniform(-4, 4, (16, 2))
    colors = [(20 + 14 * k, 255 - 12 * k, (97 * k) % 256) for k in range(16)]
    for (x, y), color in zip(points, colors):
        cv2.circle(image, (int(round(x)), int(round(y))), 4, color, -1)
    points = np.round(points)
    path = tmp_path / "dots.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    kpts = np.concatenate([points, np.full((16, 1), 2)], 1).astype(np.float32)
    record = {"id": "0", "image": path, "width": float(width), "height": float(height), "keypoints": kpts, "box": None}
    return record, np.array(colors, np.float32)


def dots_dataset(tmp_path, augmentations, input_size=128):
    record, colors = dot_records(tmp_path)
    config = CPM(config_from_dict({**TINY, "norm_layer": "none", "input_size": input_size})).config
    return KeypointCrops([record], CAT16, config, augmentations, ImageCache(tmp_path / "cache", 800)), colors


def color_centroid(image, color):
    close = np.abs(image.astype(np.float32) - color).sum(2) < 40
    ys, xs = np.nonzero(close)
    return np.array([xs.mean(), ys.mean()]) if len(xs) else None


def test_crop_and_rotation_keep_keypoints_on_their_pixels(tmp_path):
    augmentations = {"all": [{"name": "random_crop", "scale": [0.9, 1.1], "shift": 0.05},
                             {"name": "rotation", "degrees": 30}]}
    dataset, colors = dots_dataset(tmp_path, augmentations)
    checked = 0
    for seed in range(3):
        random.seed(seed)
        sample = dataset[0]
        image = denormalize(sample["image"])
        for k, (x, y, v) in enumerate(sample["keypoints"].numpy()):
            center = color_centroid(image, colors[k])
            if v == 0 or center is None:
                continue
            assert np.hypot(*(center - (x, y))) < 1.5, (seed, k, center, (x, y))
            checked += 1
        # the inverse maps input pixels back onto the original keypoints
        back = sample["inverse"].numpy()[:, :2] @ sample["keypoints"].numpy()[:, :2].T + sample["inverse"].numpy()[:, 2:]
        assert np.allclose(back.T, sample["gt"].numpy()[:, :2], atol=1e-2)
    assert checked > 30


def test_flip_moves_pixels_and_swaps_left_right_labels(tmp_path):
    dataset, colors = dots_dataset(tmp_path, {"all": [{"name": "hflip", "p": 1.0}]})
    plain, _ = dots_dataset(tmp_path, {})
    flipped, original = dataset[0], plain[0]
    image = denormalize(flipped["image"])
    width = dataset.input_size[0]
    left_paw, right_paw = NAMES.index("front_left_paw"), NAMES.index("front_right_paw")
    # the point now labelled left paw is the mirrored right paw, and sits on the right paw's disc
    assert float(flipped["keypoints"][left_paw, 0]) == pytest.approx(
        width - 1 - float(original["keypoints"][right_paw, 0]), abs=1e-3)
    center = color_centroid(image, colors[right_paw])
    assert np.hypot(*(center - flipped["keypoints"][left_paw, :2].numpy())) < 1.5
    for a, b in CAT16.flip_pairs:
        assert "left" in NAMES[a] and NAMES[b] == NAMES[a].replace("left", "right")


def test_flip_keeps_anatomical_left_on_rendered_quadrupeds(tmp_path):
    """Renderer chirality: facing right shows the right flank (its shoulder visible, the left one hidden
    by the body); after a flip the animal faces left and the joint labelled left must be the near one."""
    shoulder_l, shoulder_r = NAMES.index("left_shoulder"), NAMES.index("right_shoulder")
    found = 0
    for index in range(40):
        image, xy, visible = render_quadruped(np.random.default_rng([11, index]), 96)
        if visible[shoulder_l] == visible[shoulder_r]:
            continue  # three-quarter views, occluders
        facing_right = xy[NAMES.index("head"), 0] > xy[NAMES.index("bottom_spine"), 0]
        near_is_left = bool(visible[shoulder_l])
        assert near_is_left != facing_right
        path = tmp_path / f"q{index}.png"
        cv2.imwrite(str(path), image[:, :, ::-1])
        kpts = np.concatenate([xy, np.where(visible > 0, 2, 1)[:, None]], 1).astype(np.float32)
        record = {"id": str(index), "image": path, "width": 96.0, "height": 96.0, "keypoints": kpts, "box": None}
        config = CPM(config_from_dict({**TINY, "norm_layer": "none"})).config
        sample = KeypointCrops([record], CAT16, config, {"all": [{"name": "hflip", "p": 1.0}]},
                               ImageCache(tmp_path, 800))[0]["keypoints"].numpy()
        flipped_facing_right = sample[NAMES.index("head"), 0] > sample[NAMES.index("bottom_spine"), 0]
        assert flipped_facing_right != facing_right
        assert (sample[shoulder_l, 2] == 2) != flipped_facing_right  # the near shoulder is still the visible one
        found += 1
        if found == 3:
            break
    assert found == 3


def test_signed_targets_and_crop_exclusion(tmp_path):
    dataset, _ = dots_dataset(tmp_path, {}, input_size=64)
    record = dataset.records[0]
    record["keypoints"][3, 2] = 1                      # occluded
    record["keypoints"][5, :2] = (-500, -500)          # far outside any crop
    dataset.records[0]["box"] = [20, 20, 120, 80]
    dataset.codec, dataset.signed = target_codec(dataset.model_config, 1.5), True
    sample = dataset[0]
    maps, weights = sample["heatmap"].numpy(), sample["target_weight"].numpy()
    assert maps[3].min() == pytest.approx(-1, abs=0.2) and maps[3].max() <= 0
    assert maps[0].max() == pytest.approx(1, abs=0.2) and maps[0].min() >= 0
    assert weights[5] == 0 and sample["keypoints"][5, 2] == 0  # pushed out: unlabelled, not occluded
    # decoding the targets gives back the positions (original pixels) and the visibility sign
    xy, _, visible = decode_predictions(sample["heatmap"][None], dataset.model_config, sample["inverse"][None])
    stride = 2 ** dataset.model_config.trunk_pools
    scale = 120 * 1.25 / 64  # original pixels per input pixel
    error = np.hypot(*(xy[0].numpy() - sample["gt"].numpy()[:, :2]).T)
    assert (error[weights > 0] < 0.5 * stride * scale).all()
    assert not visible[0, 3] and visible[0, 0]


def test_pck_on_hand_made_cases():
    gt = np.zeros((2, 16, 3), np.float32)
    gt[..., 2] = 2
    gt[1, :, 2] = 0  # second animal: nothing labelled, must not count
    gt[0, 15, 2] = 1  # occluded but labelled: counts
    pred = gt[..., :2].copy()
    pred[0, :4, 0] += 3.0       # 3 px off with norm 100: fails 0.01, passes 0.05
    pred[0, 4:8, 0] += 8.0      # fails 0.05, passes 0.1
    pred[0, 8:10, 1] += 15.0    # fails 0.1, passes 0.2
    pred[0, 15] += 30.0         # fails everything
    metrics, table = compute_metrics(pred, None, gt, np.array([100.0, 100.0]), (0.05, 0.1, 0.2))
    assert metrics["pck@0.05"] == pytest.approx(9 / 16)
    assert metrics["pck@0.1"] == pytest.approx(13 / 16)
    assert metrics["pck@0.2"] == pytest.approx(15 / 16)
    assert table[0.05][0][4] == 0 and table[0.1][0][4] == 1


def test_preset_overrides(tmp_path):
    config = load_preset("cpu", ["model.drop_rate=0.1", "optimizer.name=sgd", "metric.pck_thresholds=[0.1,0.3]",
                                "checkpoint_path=null", "model.input_size=[96,64]"])
    assert config["model"]["drop_rate"] == 0.1 and config["optimizer"]["name"] == "sgd"
    assert config["metric"]["pck_thresholds"] == [0.1, 0.3] and config["model"]["input_size"] == [96, 64]
    with pytest.raises(PresetError, match="unknown key 'drop_rat'"):
        load_preset("cpu", ["model.drop_rat=0.1"])
    with pytest.raises(PresetError, match="group.key=value"):
        load_preset("cpu", ["model.drop_rate"])
    assert load_preset("seed")["model"]["size"] == "original"
    config = load_preset("cpu", ["dataset.heatmap_size=30"])
    with pytest.raises(SystemExit, match="dataset.heatmap_size=23"):
        check_heatmap_size(config, CPM(config_from_dict({"size": "small"})).config)


def test_short_overfit_learns_two_quadrupeds(tmp_path, one_thread):
    torch.manual_seed(0)
    records = []
    for i in range(2):
        image, xy, visible = render_quadruped(np.random.default_rng([5, i]), 96)
        cv2.imwrite(str(tmp_path / f"{i}.png"), image[:, :, ::-1])
        kpts = np.concatenate([xy, np.where(visible > 0, 2, 1)[:, None]], 1).astype(np.float32)
        records.append({"id": str(i), "image": tmp_path / f"{i}.png", "width": 96.0, "height": 96.0,
                        "keypoints": kpts, "box": None})
    model = CPM(config_from_dict({**TINY, "norm_layer": "group"}))
    dataset = KeypointCrops(records, CAT16, model.config, {}, ImageCache(tmp_path, 800), target_codec(model.config, 1.5))
    batch = {k: torch.stack([dataset[i][k] for i in range(2)]) for k in ("image", "heatmap", "target_weight")}
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    before = predict(model, dataset, "cpu")
    first = None
    for _ in range(150):
        loss, _ = cpm_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first or float(loss.detach())
    after = predict(model, dataset, "cpu")
    gt, norm = ground_truth(dataset, after["index"])
    pck_before = compute_metrics(before["pred"], None, gt, norm)[0]["pck@0.1"]
    pck_after = compute_metrics(after["pred"], None, gt, norm)[0]["pck@0.1"]
    assert float(loss.detach()) < 0.5 * first
    assert pck_after >= 0.7 > pck_before + 0.3


def test_train_eval_infer_scripts(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    small_data = ["dataset.builtin_train_images=8", "dataset.builtin_val_images=4", "dataset.builtin_image_size=64",
                  "model.size=tiny", "dataset.heatmap_size=15", "dataset.batch_size=4",
                  "trainer.num_threads=null"]
    train.main(["--max-steps", "2", "--run-name", "t", *small_data])
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "mean shape" in out
    assert out.strip().splitlines()[-1].startswith("outputs:")
    checkpoint = tmp_path / "checkpoints" / "cpm_animal" / "t" / "last.pt"
    assert checkpoint.is_file()
    cpm_eval.main([])
    out, err = capsys.readouterr()
    assert "PCK@0.1" in out and "parameters:" in out and "eval:   0%" in err
    assert json.loads((tmp_path / "outputs" / "cpm_animal" / "eval-t" / "metrics.json").read_text())["pck@0.1"] >= 0
    image = tmp_path / "data" / "cpm_animal" / "quadrupeds" / "val" / "images" / "000000.jpg"
    assert infer.main(["--input", str(image), "--checkpoint", str(checkpoint)]) == 0
    result = json.loads((tmp_path / "outputs" / "cpm_animal" / "infer-t" / "predictions.json").read_text())
    assert result["keypoint_names"] == list(CAT16.names) and len(result["images"]) == 1
    [animal] = result["images"][0]["people"]
    assert len(animal["keypoints"]) == 16 and len(animal["extra"]["visible"]) == 16
    assert (tmp_path / "outputs" / "cpm_animal" / "infer-t" / "000000_pose.jpg").is_file()
    # a second run and --run-name: folders of their own; an empty folder is an error, not an empty JSON
    assert infer.main(["--input", str(image), "--checkpoint", str(checkpoint)]) == 0
    assert infer.main(["--input", str(image), "--run-name", "mine", "--checkpoint", str(checkpoint)]) == 0
    assert all((tmp_path / "outputs" / "cpm_animal" / name / "predictions.json").is_file()
               for name in ("infer-t-2", "mine"))
    (tmp_path / "empty").mkdir()
    assert infer.main(["--input", str(tmp_path / "empty"), "--checkpoint", str(checkpoint)]) == 1


def test_eval_without_checkpoint_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as done:
        cpm_eval.main([])
    assert done.value.code == 1 and "cpm_animal/train.py" in capsys.readouterr().err
