"""Tests for simple_baseline/: parameter counts and shapes, the offline pretrained policy, targets,
flip test, PCKh, the LIP/MPII readers, an overfit run and the three scripts end to end (tiny sizes)."""
import json
import socket
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import simple_baseline.eval as eval_script
import simple_baseline.infer as infer_script
import simple_baseline.train as train_script

from common.evaluation import coco_keypoint_ap
from common.keypoints import COCO17
from simple_baseline.crops import CROP_DEFAULTS, build_single_person_crops
from simple_baseline.dataset import TopDownDataset, read_coco_topdown, read_lip_csv, read_mpii_json, target_codec
from simple_baseline.eval import coco_results, mean_pose_in_crop, mean_pose_predictions, pckh_table, run_predictions
from simple_baseline.infer import flip_heatmaps_back
from simple_baseline.model import LIP16, PoseResNet, build_model, load_pretrained_backbone
from simple_baseline.train import compute_loss

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY = dict(backbone="resnet18", num_joints=16, deconv_filters=(8, 8, 8))


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backbone, joints, filters, expected", [
    ("resnet18", 16, (256, 256, 256), 15_376_464),
    ("resnet50", 17, (256, 256, 256), 33_999_697),
    ("resnet18", 16, (512, 512, 512), 23_770_704),  # the seed's head
    ("resnet18", 16, (64, 64, 64), 11_833_296),     # the cpu preset (README)
])
def test_parameter_counts_match_the_paper_configurations(backbone, joints, filters, expected):
    with torch.device("meta"):
        model = PoseResNet(backbone, joints, filters)
    assert count(model) == expected


def test_output_shapes_are_a_quarter_of_the_input():
    with torch.device("meta"):
        model = PoseResNet("resnet18", 16)
        assert model(torch.empty(1, 3, 256, 256)).shape == (1, 16, 64, 64)
        assert model(torch.empty(1, 3, 256, 192)).shape == (1, 16, 64, 48)
    tiny = PoseResNet(**TINY).eval()
    assert tiny(torch.zeros(1, 3, 128, 96)).shape == (1, 16, 32, 24)


def test_head_init_follows_the_paper():
    model = PoseResNet(**TINY)
    deconv = model.deconv_layers[0]
    assert deconv.bias is None and 0.0005 < deconv.weight.std().item() < 0.002
    assert model.final_layer.weight.std().item() < 0.002 and model.final_layer.bias.abs().max() == 0
    assert torch.all(model.deconv_layers[1].weight == 1) and torch.all(model.deconv_layers[1].bias == 0)


def test_pretrained_none_never_touches_the_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("network touched")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", no_network)  # not even the cache is looked at
    model = build_model(**TINY)
    load_pretrained_backbone(model, "none")
    assert isinstance(model, PoseResNet)


def test_pretrained_imagenet_offline_stops_with_one_line_naming_the_file(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("offline")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as info:
        load_pretrained_backbone(build_model(**TINY), "imagenet")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and "--pretrained none" in message and "\n" not in message


def test_pretrained_path_loads_backbone_weights(tmp_path):
    source = PoseResNet(**TINY)
    torch.save(source.backbone.state_dict(), tmp_path / "backbone.pth")
    model = build_model(**TINY)
    load_pretrained_backbone(model, str(tmp_path / "backbone.pth"))
    assert torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)


# ---------------------------------------------------------------------------------------------- data

def write_image(path, width=64, height=64):
    cv2.imwrite(str(path), np.full((height, width, 3), 128, np.uint8))


def test_targets_full_peak_on_the_last_row_and_column_and_zero_weight_for_missing(tmp_path):
    write_image(tmp_path / "a.png")
    joints = np.zeros((16, 3), np.float32)
    joints[0] = (60, 60, 1)      # maps to heatmap pixel (15, 15): the last row and column
    joints[1] = (32, 32, 1)      # heatmap center (8, 8)
    joints[2] = (-40, 10, 1)     # outside the crop
    # joints[3:] unlabelled (nan in the CSV -> weight 0)
    record = {"image": str(tmp_path / "a.png"), "joints": joints, "box": (0, 0, 64, 64)}
    dataset = TopDownDataset([record], LIP16.flip_index, target_codec((64, 64), 4, 2.0), padding=1.0)
    sample = dataset[0]
    target, weight = sample["target"].numpy(), sample["target_weight"].numpy()
    assert target.shape == (16, 16, 16)
    assert target[0, 15, 15] == pytest.approx(1.0) and target[1, 8, 8] == pytest.approx(1.0)
    assert weight.tolist() == [1, 1] + [0] * 14
    assert target[2:].max() == 0
    # sigma 2 and +-3 sigma support: 6 pixels away is still drawn, 7 is not
    assert target[1, 8, 14] == pytest.approx(np.exp(-36 / 8), rel=1e-4) and target[1, 8, 15] == 0


def test_flip_back_twice_is_identity_and_the_shift_moves_one_pixel():
    heatmaps = torch.rand(2, 16, 8, 6)
    once = flip_heatmaps_back(heatmaps, LIP16.flip_index)
    assert not torch.equal(once, heatmaps)
    assert torch.equal(flip_heatmaps_back(once, LIP16.flip_index), heatmaps)
    assert torch.equal(once[0, 0, :, 0], heatmaps[0, 5, :, -1])  # r_ankle <- mirrored l_ankle
    shifted = flip_heatmaps_back(heatmaps, LIP16.flip_index, shift=True)
    assert torch.equal(shifted[..., 1:], once[..., :-1])


LIP_ROWS = [
    "img_a.jpg," + ",".join(f"{10 + j},{20 + j},{j % 2}" for j in range(16)),
    "img_b.jpg," + ",".join("nan,nan,nan" if j in (0, 5) else f"{j},{2 * j},0" for j in range(16)),
    "img_c.jpg," + ",".join(f"{j},{j},1" for j in range(16)),
]


def test_lip_csv_parser_on_hand_written_rows(tmp_path):
    for name in ("img_a.jpg", "img_b.jpg", "img_c.jpg"):
        write_image(tmp_path / name)
    (tmp_path / "lip.csv").write_text("\n".join(LIP_ROWS) + "\n")
    records, skipped = read_lip_csv(tmp_path / "lip.csv", tmp_path)
    assert skipped == 0 and len(records) == 3
    assert records[0]["joints"][3].tolist() == [13, 23, 1]   # v=1 and v=0 both mean "labelled"
    assert records[0]["joints"][2].tolist() == [12, 22, 1]
    assert records[1]["joints"][:, 2].tolist() == [0, 1, 1, 1, 1, 0] + [1] * 10
    assert records[2]["head_size"] == pytest.approx(np.sqrt(2))  # neck (8,8) to head top (9,9)


def test_lip_csv_bad_rows_are_warned_skipped_and_counted(tmp_path):
    write_image(tmp_path / "img_a.jpg")
    rows = [LIP_ROWS[0], "img_a.jpg,1,2,3", LIP_ROWS[1]]  # wrong column count; img_b.jpg missing
    (tmp_path / "lip.csv").write_text("\n".join(rows) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records, skipped = read_lip_csv(tmp_path / "lip.csv", tmp_path)
    messages = [str(w.message) for w in caught]
    assert len(records) == 1 and skipped == 2
    assert any("row 2" in m and "columns" in m for m in messages)
    assert any("row 3" in m and "img_b.jpg" in m for m in messages)
    assert any("skipped 2" in m for m in messages)


def test_lip_csv_parser_on_real_lip_rows(tmp_path):
    source = SHARED_DATA / "lip_annotations" / "val_annotations.csv"
    if not source.is_file():
        pytest.skip("../shared/data is not available")
    lines = source.read_text().splitlines()[:300]
    (tmp_path / "sample.csv").write_text("\n".join(lines) + "\n")
    records, skipped = read_lip_csv(tmp_path / "sample.csv", tmp_path, check_images=False)
    assert skipped == 0 and len(records) == 300
    cells = [line.split(",") for line in lines]
    triples = np.array([c[1:] for c in cells], dtype=object).reshape(300, 16, 3)
    missing = np.array([[t[0] == "nan" for t in row] for row in triples])
    flags = {t[2] for row in triples for t in row if t[0] != "nan"}
    assert flags <= {"0", "1"} and missing.any()
    weights = np.stack([r["joints"][:, 2] for r in records])
    assert np.array_equal(weights == 0, missing)
    first_labelled = np.argwhere(~missing)[0]
    x = float(triples[first_labelled[0], first_labelled[1], 0])
    assert records[first_labelled[0]]["joints"][first_labelled[1], 0] == x


def test_mpii_json_reader_on_the_shared_sample():
    folder = SHARED_DATA / "mpii_sample"
    if not folder.is_dir():
        pytest.skip("../shared/data is not available")
    records = read_mpii_json(folder / "test_mpii.json", folder)
    assert len(records) == 5 and all(Path(r["image"]).is_file() for r in records)
    dataset = TopDownDataset(records, LIP16.flip_index, target_codec((64, 64), 4, 2.0))
    sample = dataset[0]
    assert sample["image"].shape == (3, 64, 64) and sample["target_weight"].sum() > 8


# ---------------------------------------------------------------------------------------------- metrics

def _mean_pose_pckh(train_records, val_records):
    """PCKh@0.5 Mean of the mean-pose baseline (train mean pose placed in every val person's crop)."""
    dataset = TopDownDataset(train_records, LIP16.flip_index, target_codec((128, 128), 4, 2.0))
    mean_pose = mean_pose_in_crop(train_records, dataset)
    val_records = [r for r in val_records if (r["joints"][:, 2] > 0).sum() >= 2]
    centers, sizes = zip(*[dataset.crop_box(r, 1, 1) for r in val_records])
    pred = mean_pose_predictions(mean_pose, {"pred": np.zeros((len(val_records), 16, 2), np.float32),
                                             "center": centers, "size": sizes}, dataset.heatmap_size)
    gt = np.stack([r["joints"] for r in val_records])
    return pckh_table(pred, gt, np.array([r["head_size"] for r in val_records]))["Mean"]


def test_built_in_poses_vary_as_much_as_lip_poses(tmp_path):
    """The built-in crops' pose spread is calibrated to LIP: the mean-pose baseline scores about what it
    scores on the real LIP annotations, and clearly more than at the renderer's full angle range."""
    source = SHARED_DATA / "lip_annotations" / "val_annotations.csv"
    if not source.is_file():
        pytest.skip("../shared/data is not available")
    lip, _ = read_lip_csv(source, tmp_path, check_images=False)
    lip_baseline = _mean_pose_pckh(lip[: len(lip) // 2], lip[len(lip) // 2:])

    def built_in_baseline(spread):
        splits = [build_single_person_crops(tmp_path / str(spread), split, count, pose_spread=spread)
                  for split, count in (("train", 400), ("val", 300))]
        train, val = (read_lip_csv(s["lip"], s["images"])[0] for s in splits)
        return _mean_pose_pckh(train, val)

    calibrated = built_in_baseline(CROP_DEFAULTS["pose_spread"])
    assert abs(calibrated - lip_baseline) < 0.03, (calibrated, lip_baseline)
    assert built_in_baseline(1.0) < calibrated - 0.02


def test_pckh_on_hand_made_cases():
    gt = np.zeros((2, 16, 3), np.float32)
    gt[..., 0] = np.arange(16) * 10.0
    gt[..., 1] = 50.0
    gt[..., 2] = 1
    head = np.array([10.0, 10.0])
    assert pckh_table(gt[..., :2], gt, head)["Mean"] == 1.0
    near = gt[..., :2] + np.array([0.0, 4.0])   # 0.4 x head size away: inside @0.5, outside @0.1
    rows = pckh_table(near, gt, head)
    assert rows["Mean"] == 1.0 and rows["Mean@0.1"] == 0.0 and rows["Head"] == 1.0
    far = gt[..., :2] + np.array([6.0, 0.0])    # 0.6 x head size away
    assert all(v == 0.0 for v in pckh_table(far, gt, head).values())
    # missing joints and samples without a head size do not count
    gt[0, 0, 2] = 0
    far[1] = gt[1, :, :2]
    head[0] = np.nan
    assert pckh_table(far, gt, head)["Mean"] == 1.0


# ---------------------------------------------------------------------------------------------- scripts

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny `train.py --max-steps 2` run on a tiny built-in set, shared by the script tests.
    compute_loss is wrapped to record whether every BatchNorm is in train mode at each step."""
    root = tmp_path_factory.mktemp("simple_baseline")
    modes = []
    original = train_script.compute_loss

    def recording_loss(model, batch):
        modes.append(all(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)))
        return original(model, batch)

    mp = pytest.MonkeyPatch()
    mp.setenv("POSE_OUTPUT_ROOT", str(root))
    mp.setattr(train_script, "compute_loss", recording_loss)
    args = train_script.parse_args([
        "--max-steps", "2", "--val-every", "1", "--batch-size", "4", "--workers", "0", "--input-size", "64", "64",
        "--deconv-filters", "8", "8", "8", "--builtin-train", "16", "--builtin-val", "6", "--run-name", "tiny"])
    summary = train_script.main(args)
    mp.undo()
    return root, summary, modes


def test_train_max_steps_2_writes_checkpoints_and_keeps_bn_training_after_validation(trained_run):
    root, summary, modes = trained_run
    assert summary["steps"] == 2
    # validation ran after step 1; step 2 must still train BatchNorm (the seed froze it there)
    assert modes == [True, True]
    assert (root / "checkpoints" / "simple_baseline" / "tiny" / "last.pt").is_file()
    metrics = json.loads((root / "outputs" / "simple_baseline" / "tiny" / "metrics.json").read_text())
    assert 0.0 <= metrics["PCKh@0.5"] <= 1.0 and "baseline_PCKh@0.5" in metrics


def test_eval_defaults_to_newest_checkpoint_and_visualizes(trained_run, monkeypatch, capsys):
    root, _, _ = trained_run
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(root))
    metrics = eval_script.main(eval_script.parse_args(["--visualize", "2", "--batch-size", "4"]))
    out = capsys.readouterr().out
    assert "NOT the official MPII PCKh" in out and "mean-pose baseline" in out
    assert 0.0 <= metrics["PCKh@0.5"] <= 1.0
    assert len(list((root / "outputs" / "simple_baseline" / "eval-tiny" / "vis").glob("*.jpg"))) == 2
    assert out.strip().splitlines()[-1].startswith("metrics written to")


def test_eval_refuses_a_checkpoint_of_another_architecture(trained_run, monkeypatch, tmp_path):
    root, summary, _ = trained_run
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(root))
    with pytest.raises(SystemExit, match="another architecture: backbone: checkpoint 'resnet18' vs requested 'resnet34'"):
        eval_script.main(eval_script.parse_args(["--backbone", "resnet34"]))
    other = torch.load(summary["last_checkpoint"], weights_only=True)
    other["model_name"] = "higher_hrnet"
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a simple_baseline checkpoint.*higher_hrnet"):
        eval_script.main(eval_script.parse_args(["--checkpoint", str(tmp_path / "other.pt")]))


def test_eval_without_any_checkpoint_says_how_to_get_one(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        eval_script.main(eval_script.parse_args([]))
    assert info.value.code == 1 and "simple_baseline/train.py" in capsys.readouterr().err


def test_infer_on_an_image_a_folder_and_a_10_frame_video(trained_run, monkeypatch, tmp_path):
    root, _, _ = trained_run
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(root))
    images = sorted((root / "data" / "single_person" / "images" / "val").glob("*.jpg"))[:3]
    folder = tmp_path / "folder"
    folder.mkdir()
    for image in images[:2]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.jpg").write_bytes(b"")  # one error line, the others continue
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (128, 128))
    for i in range(10):
        writer.write(cv2.imread(str(images[i % 3])))
    writer.release()

    for name, source in (("one", images[0]), ("folder", folder), ("video", video)):
        argv = ["--input", str(source), "--run-name", name, "--no-flip-test"]
        assert infer_script.main(infer_script.parse_args(argv)) == 0
    out = root / "outputs" / "simple_baseline"
    assert len(list((out / "one").glob("*_pose.jpg"))) == 1
    assert len(list((out / "folder").glob("*_pose.jpg"))) == 2
    predictions = json.loads((out / "video" / "predictions.json").read_text())
    assert predictions["keypoint_names"] == list(LIP16.names) and predictions["model"] == "simple_baseline"
    frames = predictions["images"]
    assert len(frames) == 10 and [f["frame"] for f in frames] == list(range(10))
    assert len(frames[0]["people"]) == 1 and len(frames[0]["people"][0]["keypoints"]) == 16
    capture = cv2.VideoCapture(str(out / "video" / "clip_pose.mp4"))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 10
    empty = tmp_path / "empty"
    empty.mkdir()
    assert infer_script.main(infer_script.parse_args(["--input", str(empty), "--run-name", "empty"])) == 1
    assert not (out / "empty").exists()


def test_overfit_a_few_built_in_images(trained_run):
    """A small network memorises 2 built-in crops: PCKh@0.5 > 90% on them (no augmentation)."""
    root, _, _ = trained_run
    data = root / "data" / "single_person"
    records, _ = read_lip_csv(data / "annotations" / "lip_train.csv", data / "images" / "train")
    dataset = TopDownDataset(records[:2], LIP16.flip_index, target_codec((64, 64), 2, 2.0))
    batch = {k: torch.stack([dataset[i][k] for i in range(2)]) for k in ("image", "target", "target_weight")}
    torch.manual_seed(0)
    model = PoseResNet("resnet18", 16, (16, 16, 16, 16))  # 4 deconvolutions: 32x32 heatmaps
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(OVERFIT_STEPS):
        loss, _ = compute_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # No flip test: a memorised network has never seen the mirrored crops.
    predictions = run_predictions(model, dataset, LIP16.flip_index, batch_size=2, flip_test=False)
    rows = pckh_table(predictions["pred"], predictions["gt"], predictions["head_size"])
    assert rows["Mean"] > 0.9, rows


OVERFIT_STEPS = 250  # 200 steps reached 93% in a trial run; the margin keeps the test robust


def test_coco_topdown_reader_and_ap_of_ground_truth_predictions():
    folder = SHARED_DATA / "coco_sample"
    if not folder.is_dir():
        pytest.skip("../shared/data is not available")
    records, coco = read_coco_topdown(folder / "test_coco.json", folder)
    assert len(records) == 12  # 14 people, of which 12 are non-crowd with keypoints
    dataset = TopDownDataset(records[:1], COCO17.flip_index, target_codec((48, 64), 4, 2.0), train=True)
    assert dataset[0]["image"].shape == (3, 64, 48) and dataset[0]["target"].shape == (17, 16, 12)
    gt = np.stack([r["joints"] for r in records])
    predictions = {"index": np.arange(len(records)), "pred": gt[..., :2], "scores": gt[..., 2]}
    assert coco_keypoint_ap(coco, coco_results(predictions, records), COCO17.sigmas, print_table=False)["AP"] == 1.0


@pytest.mark.parametrize("flags, message", [
    (["--input-size", "48", "64"], "--input-size 48 64: both sides must be multiples of 32"),
    (["--warmup", "1.5"], "--warmup 1.5: the warm-up is a fraction of the run"),
])
def test_train_rejects_bad_settings_before_touching_data(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_script.main(train_script.parse_args(flags + ["--out", str(tmp_path)]))
    assert not any(tmp_path.iterdir())  # no data rendered, no run folders made
