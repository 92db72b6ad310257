"""higher_hrnet model side: official key lists and parameter counts, output shapes, the checkpoint
loader (official forms, fp16, seed names, ImageNet backbone), the ImageNet classification scripts
and prepare_data on tiny fake archives. Full-size models are only built on the meta device.
"""

import hashlib
import json
import runpy
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.synthetic import L_EL, L_HIP, L_KNEE, L_SH, L_WR, PELVIS, R_EL, R_HIP, R_KNEE, R_SH, R_WR, THORAX
from higher_hrnet import eval_classification, prepare_data, train_classification
from higher_hrnet.checkpoints import (CheckpointError, convert_seed_state_dict, higher_hrnet_config,
                                      load_higher_hrnet, load_imagenet_backbone, load_official_checkpoint)
from higher_hrnet.eval_classification import read_synset_names
from higher_hrnet.model import ClassificationHRNet, HigherHRNet, build_model
from higher_hrnet.train import PRESETS as POSE_PRESETS
from higher_hrnet.train_classification import POSE_CLASSES, pose_figure, render_pose

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
REPO = Path(__file__).resolve().parents[1]

# sha256 of the reference key lists ("name (d0,d1,...)" lines joined by "\n"), so the check also
# runs on a clone without ../shared/reference.
OFFICIAL = {
    "higher_hrnet_w32": (lambda: build_model(32), 1810, 28_645_331,
                         "4521daa643e0eaec8ce06f93f85747f5a712b5a8c58e39d3621c728deaf1acbb"),
    "higher_hrnet_w48": (lambda: build_model(48), 1810, 63_827_139,
                         "a09b2d0c5a9fa6c2e60c707ead1ebabff2c34e70d5d8f73339d1d92b873f54e3"),
    "cls_hrnet_w32": (lambda: ClassificationHRNet(32), 1956, 41_232_680,
                      "2a8ef2ae0969c7f009dccb4921eae11e6ad465d24f55520024350f48bb324da8"),
}


def key_lines(model):
    return [f"{name} ({','.join(map(str, t.shape))})" for name, t in model.state_dict().items()]


def on_meta(build):
    with torch.device("meta"):
        return build()


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_names_shapes_and_parameter_counts_match_official(name):
    build, num_keys, num_params, digest = OFFICIAL[name]
    model = on_meta(build)
    lines = key_lines(model)
    reference = REFERENCE / f"{name}_keys.txt"
    if reference.is_file():  # a readable diff when the shared copy is there
        expected = [line for line in reference.read_text().split("\n") if line]
        assert lines == expected
    assert len(lines) == num_keys
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest
    assert sum(p.numel() for p in model.parameters()) == num_params


def tiny_model(seed=0, width=4):
    """A tiny HigherHRNet with non-trivial BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(width)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    for name, p in model.named_parameters():
        if name.startswith("final_layers"):
            p.data.normal_(0, 0.1)
    return model.eval()


def test_output_shapes_on_tiny_width():
    model = tiny_model()
    assert model.conv1.out_channels == 8 and model.layer1[0].conv3.out_channels == 32  # stem x width/32
    with torch.no_grad():
        for height, width in ((512, 512), (640, 640), (512, 704)):
            quarter, half = model(torch.zeros(1, 3, height, width))
            assert quarter.shape == (1, 34, height // 4, width // 4)
            assert half.shape == (1, 17, height // 2, width // 2)
    with torch.device("meta"):
        one_tag = HigherHRNet(4, num_joints=14, tag_per_joint=False)
        quarter, half = one_tag(torch.zeros(2, 3, 256, 192))
    assert quarter.shape == (2, 15, 64, 48) and half.shape == (2, 14, 128, 96)
    assert higher_hrnet_config(one_tag.state_dict()) == (4, 14, False)
    assert higher_hrnet_config(model.state_dict()) == (4, 17, True)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_model(30)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 500, 512))


def test_classification_hrnet_tiny_forward():
    model = ClassificationHRNet(4, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


# --- the seed's names -------------------------------------------------------------------------

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def seed_names(classification=False):
    """Every state-dict name of the seed's HigherHRNet / ClassificationHRNet, enumerated from the
    seed's module tree (HRNetBackbone.stages -> HighResolutionStage.blocks/transition_layer)."""
    names = []

    def conv_bn(prefix, conv="0", bn="1", bias=False):
        names.append(f"{prefix}.{conv}.weight")
        if bias:
            names.append(f"{prefix}.{conv}.bias")
        names.extend(f"{prefix}.{bn}.{b}" for b in BN)

    def unit(prefix, convs, downsample):
        for i in range(1, convs + 1):
            names.append(f"{prefix}.conv{i}.weight")
            names.extend(f"{prefix}.bn{i}.{b}" for b in BN)
        if downsample:
            conv_bn(f"{prefix}.downsample")

    names.append("backbone.conv1.weight")
    names.extend(f"backbone.bn1.{b}" for b in BN)
    names.append("backbone.conv2.weight")
    names.extend(f"backbone.bn2.{b}" for b in BN)
    for u in range(4):
        unit(f"backbone.stages.0.blocks.0.scales_blocks.0.{u}", 3, u == 0)
    conv_bn("backbone.stages.0.transition_layer.transition_blocks.0")
    conv_bn("backbone.stages.0.transition_layer.transition_blocks.1")
    for s, modules in ((1, 1), (2, 4), (3, 3)):
        branches = s + 1
        for m in range(modules):
            for b in range(branches):
                for u in range(4):
                    unit(f"backbone.stages.{s}.blocks.{2 * m}.scales_blocks.{b}.{u}", 2, False)
            outputs = 1 if (s == 3 and m == modules - 1 and not classification) else branches
            for i in range(outputs):
                for j in range(branches):
                    fusion = f"backbone.stages.{s}.blocks.{2 * m + 1}.scales_fusion_layers.{i}.{j}"
                    if j > i:
                        conv_bn(fusion)
                    for k in range(i - j):
                        conv_bn(f"{fusion}.{k}")
        if s < 3:
            conv_bn(f"backbone.stages.{s}.transition_layer.transition_blocks.{s + 1}")
    if classification:
        for i in range(4):
            unit(f"classification_head.chann_incr_blocks.{i}", 3, True)
        for i in range(3):
            conv_bn(f"classification_head.downsample_blocks.{i}", bias=True)
        conv_bn("classification_head.final_conv", bias=True)
        names += ["classification_head.classifier.weight", "classification_head.classifier.bias"]
    else:
        names += ["init_heatmaps_head.weight", "init_heatmaps_head.bias"]
        conv_bn("deconv_layers.0.deconv")
        for r in range(4):
            unit(f"deconv_layers.0.resid_blocks.{r}", 2, False)
        names += ["deconv_layers.0.final_layer.weight", "deconv_layers.0.final_layer.bias"]
    return names


@pytest.mark.parametrize("classification", [False, True])
def test_seed_names_map_one_to_one_onto_official(classification):
    model = on_meta(lambda: ClassificationHRNet(32) if classification else build_model(32))
    seed = seed_names(classification)
    converted = convert_seed_state_dict({name: torch.zeros(()) for name in seed})
    assert len(converted) == len(seed)
    assert set(converted) == set(model.state_dict())


def test_seed_mapping_examples():
    pairs = {
        "backbone.bn2.running_var": "bn2.running_var",
        "backbone.stages.0.blocks.0.scales_blocks.0.0.downsample.1.weight": "layer1.0.downsample.1.weight",
        "backbone.stages.0.transition_layer.transition_blocks.0.0.weight": "transition1.0.0.weight",
        "backbone.stages.0.transition_layer.transition_blocks.1.1.bias": "transition1.1.0.1.bias",
        "backbone.stages.2.transition_layer.transition_blocks.3.0.weight": "transition3.3.0.0.weight",
        "backbone.stages.2.blocks.6.scales_blocks.2.3.bn2.bias": "stage3.3.branches.2.3.bn2.bias",
        "backbone.stages.3.blocks.5.scales_fusion_layers.0.3.0.weight": "stage4.2.fuse_layers.0.3.0.weight",
        "backbone.stages.3.blocks.1.scales_fusion_layers.3.0.2.1.weight": "stage4.0.fuse_layers.3.0.2.1.weight",
        "init_heatmaps_head.weight": "final_layers.0.weight",
        "deconv_layers.0.deconv.0.weight": "deconv_layers.0.0.0.weight",
        "deconv_layers.0.resid_blocks.3.bn2.running_mean": "deconv_layers.0.4.0.bn2.running_mean",
        "deconv_layers.0.final_layer.bias": "final_layers.1.bias",
        "classification_head.chann_incr_blocks.2.downsample.0.weight": "incre_modules.2.0.downsample.0.weight",
        "classification_head.downsample_blocks.1.0.bias": "downsamp_modules.1.0.bias",
        "classification_head.final_conv.1.running_mean": "final_layer.1.running_mean",
        "classification_head.classifier.weight": "classifier.weight",
    }
    converted = convert_seed_state_dict({seed: torch.tensor(i) for i, seed in enumerate(pairs)})
    assert {name: int(v) for name, v in converted.items()} == {o: i for i, o in enumerate(pairs.values())}
    with pytest.raises(CheckpointError, match="backbone.something_else"):
        convert_seed_state_dict({"backbone.something_else.weight": torch.zeros(1)})


def test_seed_checkpoint_file_loads_and_reproduces_outputs(tmp_path):
    source = tiny_model(seed=1)
    official = source.state_dict()
    rename = {seed: next(iter(convert_seed_state_dict({seed: None}))) for seed in seed_names()}
    seed_state = {seed: official[name] for seed, name in rename.items()}
    assert len(seed_state) == len(official)
    path = tmp_path / "higher_hrnet_32.pt"
    torch.save({"module": {"model": seed_state}, "epoch": 3}, path)
    target = load_higher_hrnet(path).eval()  # width, joints and tag channels read from the weights
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for a, b in zip(source(x), target(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- official checkpoint forms ----------------------------------------------------------------

def _official_forms(state):
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    # fp16 640 releases: nn.Sequential(to_fp16, model) names everything "1.", convs in float16.
    fp16 = {f"1.{k}": (v.half() if k.endswith("weight") and v.dim() == 4 else v) for k, v in state.items()}
    return {
        "bare": state,
        "state_dict_wrapper": {"state_dict": state, "epoch": 10},
        "model_wrapper": {"model": state},
        "module_prefix": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "fp16_640": fp16,
        "fp16_640_dataparallel": {f"module.{k}": v for k, v in fp16.items()},
        "missing_num_batches_tracked": no_counters,
    }


def test_loader_accepts_each_official_form(tmp_path):
    state = tiny_model(seed=3).state_dict()
    target = build_model(4)
    for form, content in _official_forms(state).items():
        for tensor in target.state_dict().values():
            tensor.zero_()
        # Reading a file is slow (the weights_only unpickler goes tensor by tensor), so one form
        # goes through a file and the others are handed over as the dicts torch.load would return.
        if form == "fp16_640_dataparallel":
            torch.save(content, tmp_path / "fp16.pth")
            content = tmp_path / "fp16.pth"
        loaded = load_official_checkpoint(target, content).state_dict()
        for name, value in state.items():
            if form.startswith("fp16") and value.dim() == 4:
                value = value.half().float()
            if name.endswith("num_batches_tracked") and form == "missing_num_batches_tracked":
                continue
            assert loaded[name].dtype == value.dtype, (form, name)
            assert torch.equal(loaded[name], value), (form, name)


def test_loader_errors_are_one_clear_line(tmp_path):
    w32 = on_meta(lambda: build_model(32))
    w48_state = {f"module.{k}": v for k, v in on_meta(lambda: build_model(48)).state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_official_checkpoint(w32, {"state_dict": w48_state})
    assert "W48" in str(error.value) and "W32" in str(error.value) and "\n" not in str(error.value)

    model = tiny_model()
    state = model.state_dict()
    extra = dict(state, **{"stage5.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="1 unexpected.*stage5.weight"):
        load_official_checkpoint(model, extra)
    missing = {k: v for k, v in state.items() if k != "conv1.weight"}
    with pytest.raises(CheckpointError, match="1 missing.*conv1.weight"):
        load_official_checkpoint(model, missing)
    wrong_joints = dict(state, **{"final_layers.1.weight": torch.zeros(14, 4, 1, 1)})
    with pytest.raises(CheckpointError, match="final_layers.1.weight"):
        load_official_checkpoint(model, wrong_joints)
    # weights_only=True: a file that needs arbitrary unpickling is refused, naming the file.
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": state, "args": __import__("argparse").Namespace(lr=1)}, pickled)
    with pytest.raises(CheckpointError, match="pickled.pth: cannot be read with weights_only=True"):
        load_official_checkpoint(model, pickled)
    with pytest.raises(CheckpointError, match="not found"):
        load_official_checkpoint(model, tmp_path / "absent.pth")


def test_imagenet_backbone_loads_1752_of_1810_by_name():
    pose = on_meta(lambda: build_model(32))
    imagenet = on_meta(lambda: ClassificationHRNet(32))
    assert load_imagenet_backbone(pose, {"state_dict": imagenet.state_dict()}) == 1752
    with pytest.raises(CheckpointError, match="W32 but the model is W48"):
        load_imagenet_backbone(on_meta(lambda: build_model(48)), imagenet.state_dict())


# --- ImageNet scripts on a tiny ImageFolder ---------------------------------------------------

def _tiny_imagefolder(root):
    for split, count in (("train", 4), ("val", 2)):
        for c, pose in enumerate(("arms_up", "lying", "no_person")):
            (root / split / pose).mkdir(parents=True)
            for i in range(count):
                image = render_pose(pose, np.random.default_rng([c, i, split == "val"]), size=40)
                cv2.imwrite(str(root / split / pose / f"{i}.png"), image)
    return root


def test_builtin_pose_classes_have_their_geometry():
    """Each built-in class draws what its name says, in the person's own frame (up = pelvis -> thorax)."""
    def raised(points, shoulder, wrist, up):  # wrist above the shoulder along the body
        return (points[wrist] - points[shoulder]) @ up > 0

    for pose in POSE_CLASSES[1:]:
        for i in range(20):
            points = pose_figure(np.random.default_rng([7, i]), pose, 80).points
            up = points[THORAX] - points[PELVIS]
            up /= np.linalg.norm(up)
            arms_up = [raised(points, L_SH, L_WR, up), raised(points, R_SH, R_WR, up)]
            thighs = [(points[k] - points[h]) @ -up / np.linalg.norm(points[k] - points[h])
                      for h, k in ((L_HIP, L_KNEE), (R_HIP, R_KNEE))]
            assert (abs(up[1]) < np.sin(np.radians(40))) == (pose == "lying"), (pose, i)  # body axis
            assert (max(thighs) < np.cos(np.radians(55))) == (pose == "crouching"), (pose, i)
            assert points.min() >= 0 and points.max() < 80, (pose, i)  # the whole person is in view
            if pose in ("arms_down", "arms_out", "arms_up", "one_arm_up"):
                assert sum(arms_up) == {"arms_down": 0, "arms_up": 2, "one_arm_up": 1}.get(pose, sum(arms_up))
            if pose == "arms_out":
                for shoulder, elbow in ((L_SH, L_EL), (R_SH, R_EL)):
                    upper = points[elbow] - points[shoulder]
                    assert abs(upper @ up) < np.cos(np.radians(65)) * np.linalg.norm(upper), (pose, i)


def test_classification_train_eval_and_backbone_transfer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path / "root"))
    data = _tiny_imagefolder(tmp_path / "folder")
    args = train_classification.parse_args(
        ["--data", str(data), "--width", "4", "--image-size", "32", "--resize-size", "36",
         "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--run-name", "tiny", "--device", "cpu"])
    assert args.preset == "official" and args.lr == 0.05 and args.lr_steps == [30, 60, 90]
    summary = train_classification.main(args)
    assert summary["steps"] == 2 and {"top1", "top5"} <= set(summary["metrics"])
    assert summary["metrics"]["top5"] == 1.0  # 3 classes: every label is in the top 5
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "checkpoints in" in last_line and str(tmp_path / "root") in last_line

    checkpoint = tmp_path / "root" / "checkpoints" / "hrnet_classification" / "tiny" / "last.pt"
    assert eval_classification.main(eval_classification.parse_args(["--run-name", "val", "--workers", "0"])) == 0
    metrics = json.loads((tmp_path / "root/outputs/hrnet_classification/val/metrics.json").read_text())
    assert metrics["images"] == 6 and Path(metrics["checkpoint"]).parent == checkpoint.parent
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    assert eval_classification.main(eval_classification.parse_args(
        ["--mode", "custom", "--images", str(data / "val" / "lying"), str(bad), "--run-name", "custom"])) == 0
    out = tmp_path / "root/outputs/hrnet_classification/custom"
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 2 and len(predictions[0]["top5"]) == 3
    assert {t["class"] for t in predictions[0]["top5"]} == {"arms_up", "lying", "no_person"}
    assert (out / "0_top5.png").is_file()
    assert "bad.jpg: empty file" in capsys.readouterr().err

    trained = torch.load(checkpoint, weights_only=True)["model"]
    # A file without our config (an official release in DataParallel form): classes = sorted folders.
    official = tmp_path / "official_form.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.items()}}, official)
    assert eval_classification.main(eval_classification.parse_args(
        ["--checkpoint", str(official), "--data", str(data), "--workers", "0", "--run-name", "official",
         "--image-size", "32", "--resize-size", "40"])) == 0
    metrics = json.loads((tmp_path / "root/outputs/hrnet_classification/official/metrics.json").read_text())
    assert metrics["images"] == 6 and (metrics["image_size"], metrics["resize_size"]) == (32, 40)

    pose = build_model(4)
    assert load_imagenet_backbone(pose, checkpoint) == 1752
    assert torch.equal(pose.stage4[2].branches[3][3].conv2.weight, trained["stage4.2.branches.3.3.conv2.weight"])
    assert torch.equal(pose.layer1[0].bn3.running_mean, trained["layer1.0.bn3.running_mean"])


def test_classification_defaults_and_builtin_data(tmp_path, monkeypatch, capsys):
    args = train_classification.parse_args([])
    assert (args.preset, args.image_size) == ("builtin", 64)
    assert args.width == POSE_PRESETS["cpu"]["width"]  # the pose preset can load this backbone
    small = dict(num_images=3 * len(POSE_CLASSES), num_val=2 * len(POSE_CLASSES))
    first = train_classification.ensure_builtin_imagefolder(tmp_path / "a", **small)
    second = train_classification.ensure_builtin_imagefolder(tmp_path / "b", **small)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == len(POSE_CLASSES) * (3 + 2)
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    # validation images come from their own stream: none repeats a training image
    train_bytes = {p.read_bytes() for p in (first / "train").rglob("*.png")}
    assert not train_bytes & {p.read_bytes() for p in (first / "val").rglob("*.png")}
    stamp = (first / "params.json").stat().st_mtime_ns
    assert train_classification.ensure_builtin_imagefolder(tmp_path / "a", **small) == first
    assert (first / "params.json").stat().st_mtime_ns == stamp  # rendered once
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path / "fresh"))
    with pytest.raises(SystemExit) as done:
        eval_classification.main(eval_classification.parse_args([]))
    assert done.value.code == 1 and "train_classification.py" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train_classification", "eval_classification", "prepare_data"])
def test_scripts_answer_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "higher_hrnet" / f"{script}.py"), run_name="__main__")
    assert done.value.code == 0 and "usage" in capsys.readouterr().out


# --- prepare_data on tiny fake archives -------------------------------------------------------

def _zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_prepare_coco_from_zips(tmp_path, monkeypatch, capsys):
    src = tmp_path / "downloads"
    src.mkdir()
    _zip(src / "train2017.zip", {"train2017/000000000009.jpg": b"a" * 100, "train2017/000000000025.jpg": b"b"})
    _zip(src / "val2017.zip", {"val2017/000000000139.jpg": b"c" * 10, "../escape.jpg": b"x"})
    _zip(src / "annotations_trainval2017.zip", {"annotations/person_keypoints_val2017.json": b"{}",
                                                "annotations/person_keypoints_train2017.json": b"{}"})
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path / "root"))
    assert prepare_data.main(prepare_data.parse_args(["coco", "--src", str(src)])) == 0
    dest = tmp_path / "root" / "data" / "coco"
    assert (dest / "images/train2017/000000000009.jpg").read_bytes() == b"a" * 100
    assert (dest / "images/val2017/000000000139.jpg").is_file()
    assert (dest / "annotations/person_keypoints_val2017.json").is_file()
    assert not (tmp_path / "root" / "data" / "escape.jpg").exists()
    output = capsys.readouterr().out
    assert "unsafe member" in output and output.strip().splitlines()[-1] == f"coco prepared in {dest}"
    prepare_data.main(prepare_data.parse_args(["coco", "--src", str(src)]))
    assert "0 files written, 5 already in place" in capsys.readouterr().out

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    assert prepare_data.main(prepare_data.parse_args([])) == 1
    assert prepare_data.main(prepare_data.parse_args(["--src", str(src)])) == 0  # found by its archives


def test_prepare_imagenet_from_kaggle_zip(tmp_path, capsys):
    cls = "ILSVRC/Data/CLS-LOC"
    archive = tmp_path / prepare_data.IMAGENET_ARCHIVE
    _zip(archive, {
        "LOC_synset_mapping.txt": "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n",
        "LOC_val_solution.csv": "ImageId,PredictionString\n"
                                "ILSVRC2012_val_00000001,n01443537 1 2 3 4 n01443537 5 6 7 8\n"
                                "ILSVRC2012_val_00000002,n01440764 1 2 3 4\n",
        f"{cls}/train/n01440764/n01440764_1.JPEG": b"t1",
        f"{cls}/train/n01443537/n01443537_7.JPEG": b"t2",
        f"{cls}/val/ILSVRC2012_val_00000001.JPEG": b"v1",
        f"{cls}/val/ILSVRC2012_val_00000002.JPEG": b"v2",
        f"{cls}/test/ILSVRC2012_test_00000001.JPEG": b"test",
        "LOC_train_solution.csv": "ImageId,PredictionString\n",
    })
    dest = tmp_path / "imagenet"
    assert prepare_data.main(prepare_data.parse_args(["imagenet", "--src", str(archive), "--dest", str(dest)])) == 0
    assert (dest / "val/n01443537/ILSVRC2012_val_00000001.JPEG").read_bytes() == b"v1"
    assert (dest / "val/n01440764/ILSVRC2012_val_00000002.JPEG").read_bytes() == b"v2"
    assert (dest / "train/n01443537/n01443537_7.JPEG").read_bytes() == b"t2"
    assert not (dest / "test").exists()
    assert (dest / "LOC_synset_mapping.txt").read_text().startswith("n01440764 tench")
    assert read_synset_names(dest / "LOC_synset_mapping.txt") == {"n01440764": "tench", "n01443537": "goldfish"}
    with pytest.raises(SystemExit, match="LOC_synset_mapping"):
        prepare_data.prepare_imagenet(_empty_zip(tmp_path), dest)


def _empty_zip(tmp_path):
    path = tmp_path / "empty.zip"
    _zip(path, {"readme.txt": b"nothing"})
    return path
