"""rtpe: student architecture, color conversion, teacher cache geometry, losses, LR schedule, AP paths,
ONNX parity and a tiny end-to-end distillation on built-in scenes."""
from __future__ import annotations

import json
import random
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.data import load_coco_keypoints
from common.engine import fit
from common.evaluation import coco_keypoint_ap
from common.keypoints import COCO17
from higher_hrnet.grouping import GroupingParams
from higher_hrnet.inference import fold_batchnorm
from higher_hrnet.scenes import ensure_scenes
from rtpe.dataset import DistillationDataset, collate_people
from rtpe.eval import evaluate_student, oracle_ap
from rtpe.infer import decoding_settings, maps_to_people, people_to_results
from rtpe.loss import DistillationObjective, associative_embedding_loss, keypoint_loss, segmentation_loss
from rtpe.model import ContextAwareModule, RealtimePoseStudent, rgb_to_hsv, rgb_to_lab
from rtpe.teacher_inference import build_cache, coco_items, people_keypoints, read_entry, read_index, render_oracle
from rtpe.train import RestartingCosineLR, restarting_cosine_lr, trainable_parameters, warmup_cosine

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts():
    with torch.device("meta"):
        assert count(ContextAwareModule(83, (1, 2, 3, 4))) == 77204
        assert count(ContextAwareModule(163, (1, 2, 3))) == 236304
        seed = RealtimePoseStudent("seed", "lab")
        assert count(seed) == 1905290
        assert count(seed.stem) == 325056
        assert count(RealtimePoseStudent("light", "lab")) < 200_000


def test_frozen_stem_and_trainable_parts():
    torch.manual_seed(0)
    model = RealtimePoseStudent("seed", "lab").train()
    assert not model.stem.training  # the teacher stem stays in eval mode under model.train()
    stem_buffers = {k: v.clone() for k, v in model.stem.state_dict().items()}
    segmentation, keypoints = model(torch.randn(2, 3, 64, 64))
    assert segmentation.shape == (2, 1, 16, 16) and keypoints.shape == (2, 18, 16, 16)
    (segmentation.mean() + keypoints.mean()).backward()
    assert all(p.grad is None for p in model.stem.parameters())
    for name, value in model.stem.state_dict().items():
        assert torch.equal(value, stem_buffers[name]), name
    for name, child in model.named_children():
        if name in ("stem", "color_transform"):
            continue
        grads = [p.grad for p in child.parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_middle_attention_branch_matters():
    torch.manual_seed(0)
    model = RealtimePoseStudent("light", "lab").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
        handle = model.attention_mid.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        after = model(x)[0]
        handle.remove()
    assert not torch.allclose(before, after)


def test_color_conversions_match_opencv():
    rng = np.random.default_rng(0)
    rgb = rng.random((16, 16, 3), dtype=np.float32)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    lab = rgb_to_lab(tensor)[0].permute(1, 2, 0).numpy()
    # OpenCV's float Lab goes through interpolated tables: agreement to a few tenths of a unit
    np.testing.assert_allclose(lab, cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab), atol=0.5)
    hsv = rgb_to_hsv(tensor)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(hsv, cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV), atol=1e-3)


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(0)
    model = RealtimePoseStudent("light", "hsv")
    model.train()
    model(torch.randn(2, 3, 64, 64))  # move the BN statistics away from their initial values
    model.eval()
    x = torch.randn(1, 3, 72, 56)
    with torch.no_grad():
        reference = model(x)
        folded = fold_batchnorm(model)(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(reference, folded):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_restarting_cosine_lr_values():
    expected = {0: 0.025, 350: 0.014, 699: 0.003, 700: 0.0255, 1407: 0.02601}
    for step, lr in expected.items():
        assert restarting_cosine_lr(step) == pytest.approx(lr, abs=2e-6), step
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.025)
    scheduler = RestartingCosineLR(optimizer)
    seen = {}
    for step in range(1408):
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    for step, lr in expected.items():
        assert seen[step] == pytest.approx(lr, abs=2e-6), step


def test_masked_loss_is_zero_on_zero_weight_pixels():
    torch.manual_seed(0)
    gt = torch.rand(2, 17, 8, 8)
    teacher = torch.rand(2, 17, 8, 8)
    weight = torch.ones(2, 1, 8, 8)
    weight[:, :, :4] = 0
    logits = torch.randn(2, 17, 8, 8, requires_grad=True)
    loss, _ = keypoint_loss(logits, gt, weight, teacher)
    loss.backward()
    assert torch.all(logits.grad[:, :, :4] == 0) and logits.grad[:, :, 4:].abs().sum() > 0
    changed = logits.detach().clone()
    changed[:, :, :4] = 1000.0
    assert keypoint_loss(changed, gt, weight, teacher)[0] == loss.detach()
    seg = torch.randn(2, 1, 8, 8)
    seg_changed = seg.clone()
    seg_changed[:, :, :4] = -50
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert segmentation_loss(seg, target, weight) == segmentation_loss(seg_changed, target, weight)
    # with only zero weights the loss is exactly 0, not NaN
    assert keypoint_loss(logits.detach(), gt, torch.zeros_like(weight), teacher)[0] == 0


def test_associative_embedding_loss():
    tags = torch.zeros(1, 1, 4, 4)
    tags.view(-1)[[0, 1]] = 1.0    # person 0: joints at pixels 0 and 1, tags 1 and 1
    tags.view(-1)[[5, 6]] = torch.tensor([3.0, 5.0])  # person 1: tags 3 and 5
    index = torch.tensor([[[0, 1, -1], [5, 6, -1]]])
    pull, push = associative_embedding_loss(tags, index)
    assert pull.item() == pytest.approx((0 + 1.0) / 2)          # person 1 spreads +-1 around 4
    assert push.item() == pytest.approx(np.exp(-9.0) * 2 / 2 * 0.5)


# ----------------------------------------------------------------------------------------------------------
# Data, cache, masks


def _write_scene(folder, people, crowd=None, size=(160, 120)):
    """A tiny COCO split with one image; people: list of (17,3) keypoint arrays (num_keypoints from v)."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(image_dir / "a.png"), np.full((size[1], size[0], 3), 90, np.uint8))
    anns = []
    for i, kps in enumerate(people):
        kps = np.asarray(kps, np.float64)
        labelled = kps[kps[:, 2] > 0]
        x0, y0 = (labelled[:, :2].min(0) - 4) if len(labelled) else (10, 10)
        x1, y1 = (labelled[:, :2].max(0) + 4) if len(labelled) else (40, 60)
        poly = [x0, y0, x1, y0, x1, y1, x0, y1]
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [poly],
                     "area": float((x1 - x0) * (y1 - y0)), "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "num_keypoints": int((kps[:, 2] > 0).sum()), "keypoints": kps.reshape(-1).tolist()})
    if crowd is not None:
        x0, y0, x1, y1 = crowd
        anns.append({"id": 99, "image_id": 1, "category_id": 1, "iscrowd": 1,
                     "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "area": float((x1 - x0) * (y1 - y0)),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "num_keypoints": 0, "keypoints": [0] * 51})
    ann = folder / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": size[0], "height": size[1]}],
                               "annotations": anns,
                               "categories": [{"id": 1, "name": "person", "keypoints": [str(i) for i in range(17)],
                                               "skeleton": []}]}))
    return image_dir, ann


def _person(x, y):
    rng = np.random.default_rng(int(x * 7 + y))
    kps = np.zeros((17, 3))
    kps[:, 0] = x + rng.uniform(-12, 12, 17).round()
    kps[:, 1] = y + np.linspace(-25, 25, 17).round()
    kps[:, 2] = 2
    return kps


def test_crowd_and_zero_keypoint_masks(tmp_path):
    unlabelled = np.zeros((17, 3))
    image_dir, ann = _write_scene(tmp_path, [_person(40, 60), unlabelled], crowd=(100, 20, 150, 100))
    dataset = DistillationDataset(image_dir, ann, None, crop_size=160, augment=False)
    sample = dataset[0]
    weight, segmentation = sample["weight"][0].numpy(), sample["segmentation"][0].numpy()
    # map = input / 4, the 160x120 image fills the 160 crop at scale 1 (centered vertically)
    dy = (160 - 120) / 2 / 4
    assert weight[int(60 / 4 + dy), int(125 / 4)] == 0          # inside the crowd box
    assert weight[int(35 / 4 + dy), int(25 / 4)] == 0           # inside the zero-keypoint person (10..40, 10..60)
    assert weight[int(60 / 4 + dy), int(70 / 4)] == 1           # plain background
    assert segmentation[int(60 / 4 + dy), int(125 / 4)] == 0    # a crowd is not a positive
    assert segmentation[int(60 / 4 + dy), int(40 / 4)] == 1     # the labelled person is
    assert sample["tag_index"].shape == (1, 17)                 # only the labelled person gets tags


def test_cached_teacher_lands_on_ground_truth_after_augmentation(tmp_path, monkeypatch):
    """The cache stores the exact original -> map affine (here a teacher that saw the image at 1.6x),
    so after the training augmentation the teacher's peak sits within one output pixel of the joint."""
    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    people = [_person(45, 60), _person(110, 55)]
    image_dir, ann = _write_scene(tmp_path, people)
    coco = load_coco_keypoints(ann)
    cache = build_cache(tmp_path / "cache" / "train", coco_items(coco, image_dir), "oracle", coco, oracle_scale=1.6)
    index = read_index(cache)
    assert index["teacher"] == "oracle" and index["images"]["a.png"] == "a.npz"
    entry = read_entry(cache / "a.npz")
    with np.load(cache / "a.npz") as raw:
        assert raw["heatmaps"].dtype == np.float16 and raw["heatmaps"].shape == (17, 48, 64)  # 160x120 seen at 1.6x, stride 4
    assert entry["affine"][0, 0] == pytest.approx(0.4)
    dataset = DistillationDataset(image_dir, ann, cache, crop_size=128, augment=True)
    checked = 0
    for seed in range(6):
        random.seed(seed)
        sample = dataset[0]
        teacher, gt = sample["teacher"].numpy(), sample["heatmaps"].numpy()
        for joint in range(17):
            if gt[joint].max() < 0.9 or teacher[joint].max() < 0.5:
                continue
            # compare each GT peak with the teacher's nearest strong response
            gy, gx = np.unravel_index(gt[joint].argmax(), gt[joint].shape)
            window = teacher[joint, max(gy - 3, 0):gy + 4, max(gx - 3, 0):gx + 4]
            ty, tx = np.unravel_index(window.argmax(), window.shape)
            ty, tx = ty + max(gy - 3, 0), tx + max(gx - 3, 0)
            assert abs(int(tx) - int(gx)) <= 1 and abs(int(ty) - int(gy)) <= 1
            checked += 1
    assert checked > 20


def test_ground_truth_as_teacher_gives_ap_1():
    ann = SHARED / "coco_sample" / "test_coco.json"
    if not ann.is_file():
        pytest.skip("../shared/data/coco_sample is not here")
    coco = load_coco_keypoints(ann)
    results = []
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        heatmaps, tags, affine = render_oracle(people_keypoints(coco, image_id), (info["width"], info["height"]))
        heatmaps = heatmaps.astype(np.float16).astype(np.float32)  # as cached
        to_image = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2]
        keypoints, scores = maps_to_people(heatmaps, tags, to_image, GroupingParams(num_joints=17))
        results += people_to_results(keypoints, scores, image_id)
    assert coco_keypoint_ap(coco, results, COCO17.sigmas, print_table=False)["AP"] == pytest.approx(1.0)


def test_one_training_step_all_losses(tmp_path):
    image_dir, ann = _write_scene(tmp_path, [_person(45, 60), _person(110, 55)])
    coco = load_coco_keypoints(ann)
    cache = build_cache(tmp_path / "cache", coco_items(coco, image_dir), "oracle", coco)
    dataset = DistillationDataset(image_dir, ann, cache, crop_size=64, augment=True)
    batch = collate_people([dataset[0], dataset[0]])
    torch.manual_seed(0)
    model = RealtimePoseStudent("light", "lab").train()
    objective = DistillationObjective("det")
    loss, parts = objective(model, batch)
    assert set(parts) >= {"attention", "keypoints", "pull", "push"} and torch.isfinite(loss)
    loss.backward()
    assert int(model.train_step) == 1 and float(model.attention_divisor) == pytest.approx(1 + 20 * np.exp(-0.001))
    params = trainable_parameters(model, "det")
    assert all(p.grad is not None for p in params)
    assert len(trainable_parameters(model, "seg")) < len(params)


def test_tiny_distillation_end_to_end(tmp_path, monkeypatch):
    """A light student distilled from the oracle on three built-in scenes through the shared training loop,
    then evaluated image -> keypoints (resize, network, grouping, pycocotools) on those scenes: AP >= 0.3 and
    at least half the oracle teacher's AP on the same images, the issue's bar. The three scenes are those of
    30 rendered ones whose smallest labelled person is largest (1-2 people each): on the built-in scenes'
    many tiny people (under 32 x 32 px) a peak one map pixel off already scores OKS ~0. 600 steps at LR 3e-3
    reached AP 0.64-0.65 (oracle 0.93; one or two threads); 150 steps gave 0.0, and 400 steps 0.42-0.58
    depending on the thread count, too close to the bar."""

    monkeypatch.setenv("POSE_OUTPUT_ROOT", str(tmp_path))
    data = Path(ensure_scenes(tmp_path, num_images=30, num_val=2, image_size=128, seed=3))
    ann = data / "annotations" / "person_keypoints_train.json"
    coco = load_coco_keypoints(ann)

    def smallest_person(image_id):
        return min(a["area"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))
                   if a["num_keypoints"] > 0 and not a["iscrowd"])

    ids = sorted((i for i in coco.getImgIds() if 1 <= len(people_keypoints(coco, i)) <= 2),
                 key=smallest_person, reverse=True)[:3]
    cache = build_cache(tmp_path / "cache", coco_items(coco, data / "images" / "train"), "oracle", coco)
    dataset = DistillationDataset(data / "images" / "train", ann, cache, crop_size=128, augment=False, image_ids=ids)
    torch.manual_seed(0)
    model = RealtimePoseStudent("light", "lab")
    steps, lr = 600, 3e-3
    args = Namespace(device="cpu", epochs=None, max_steps=steps, batch_size=len(ids), seed=0, workers=0,
                     run_name="tiny", resume=None, init_from=None, out=str(tmp_path), amp="none", sync_bn=False,
                     clip_grad=0.0, accumulate=1, val_every="0", log_every=100, hist_every=0, keep_best=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    objective = DistillationObjective("det")
    batch = collate_people([dataset[i] for i in range(len(ids))])
    with torch.no_grad():
        first_loss = float(objective(model.train(), batch)[0])
    settings = decoding_settings(128)
    model, _ = fit(args, model, dataset, objective, optimizer, model_name="rtpe", arch=model.arch, settings=settings,
                   scheduler=warmup_cosine(optimizer, lr, lr / 30, 10, steps), scheduler_interval="step",
                   collate_fn=collate_people)
    with torch.no_grad():
        assert float(objective(model.eval(), batch)[0]) < first_loss / 5

    metrics, _ = evaluate_student(model, settings, coco, data / "images" / "train", ids, input_size=128)
    teacher_ap = oracle_ap(coco, ids)
    assert metrics["AP"] >= 0.3 and metrics["AP"] >= 0.5 * teacher_ap, (metrics["AP"], teacher_ap)
