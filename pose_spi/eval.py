"""Evaluate a Pose-SPI checkpoint: COCO keypoint AP (sigmas by keypoint name) next to the mean-pose baseline.

    python pose_spi/eval.py                                   # newest checkpoint, built-in val set
    python pose_spi/eval.py --checkpoint CKPT --data IMAGES --ann ANN.json [--no-flip-test]
Prints the AP table, parameters and GFLOPs, and writes the predictions as COCO results JSON.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.data import exit_on_bad_input, load_coco_keypoints
from common.evaluation import coco_keypoint_ap, count_flops, count_parameters, write_results_json
from common.runs import (add_common_args, at_least, checkpoint_or_exit, is_training_file, model_from_checkpoint,
                         output_dirs, pick_device)
from pose_spi.dataset import PoseSPIDataset, ensure_synthetic, split_image_ids, to_image_pixels
from pose_spi.infer import MODEL_NAMES, decode_output
from pose_spi.model import build_model, upgrade_checkpoint


def self_oks(a, b, sigmas):
    """OKS between two predictions of the same person (B, K, 2), scaled by the extent of `a`."""
    extent = (a.amax(1) - a.amin(1)).clamp(min=1.0)
    area = extent[:, 0] * extent[:, 1]
    d2 = ((a - b) ** 2).sum(-1)
    k2 = (2 * torch.as_tensor(sigmas, dtype=a.dtype, device=a.device)) ** 2
    return torch.exp(-d2 / (2 * area[:, None] * k2[None])).mean(1)


@torch.no_grad()
def predict(model, dataset, device="cpu", batch_size=64, flip_test=True, raw_targets=False, loss_fn=None):
    """Keypoints (N, K, 3) as (x, y, visibility) in original-image pixels, one score per image, mean loss.

    flip_test averages the prediction with that of the mirrored image; their agreement (an OKS between
    the two) becomes the detection score, which ranks good predictions first in COCO AP. Without it
    the score is the mean visibility.
    """
    model.eval()
    s, k = dataset.input_size, dataset.num_keypoints
    flip_index = dataset.layout.flip_index
    all_points, all_scores, losses = [], [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True, leave=False):
        images = batch["image"].to(device)
        output = model(images)
        if loss_fn is not None:
            losses.append(float(loss_fn(output, batch["target"].to(device))[0]) * len(images))
        xy, vis = decode_output(output, s, k, raw_targets)
        score = vis.mean(1)
        if flip_test:
            xy_f, vis_f = decode_output(model(images.flip(-1)), s, k, raw_targets)
            xy_f = xy_f[:, flip_index]
            xy_f[..., 0] = s - 1 - xy_f[..., 0]
            score = self_oks(xy, xy_f, dataset.layout.sigmas) * score
            xy, vis = (xy + xy_f) / 2, (vis + vis_f[:, flip_index]) / 2
        xy = to_image_pixels(xy.cpu().numpy(), batch["size"].numpy()[:, None, :], s)
        all_points.append(np.concatenate([xy, vis.cpu().numpy()[..., None]], -1))
        all_scores.append(score.cpu().numpy())
    mean_loss = sum(losses) / len(dataset) if losses else None
    return np.concatenate(all_points), np.concatenate(all_scores), mean_loss


def to_results(dataset, points, scores):
    return [{"image_id": int(image_id), "category_id": int(dataset.category_id),
             "keypoints": p.reshape(-1).tolist(), "score": float(s)}
            for image_id, p, s in zip(dataset.image_ids, points, scores)]


def coco_ap(dataset, points, scores, print_table=True):
    """COCO AP of one prediction per image over the dataset's images; sigmas follow the keypoint names."""
    return coco_keypoint_ap(dataset.coco, to_results(dataset, points, scores), dataset.layout.sigmas,
                            print_table=print_table, image_ids=dataset.image_ids)


def mean_pose(train_set):
    """Mean keypoint position over the training set (input pixels, (K, 2)), labelled points only."""
    total, count = np.zeros((train_set.num_keypoints, 2)), np.zeros((train_set.num_keypoints, 1))
    for index in range(len(train_set.people)):
        keypoints = train_set.input_keypoints(index)
        labelled = keypoints[:, 2:3] > 0
        total += keypoints[:, :2] * labelled
        count += labelled
    return (total / np.maximum(count, 1)).astype(np.float32)


def mean_pose_ap(mean_xy, dataset, print_table=False):
    """AP of predicting the same (mean) pose in every image: the floor a model must beat."""
    sizes = np.array([[info["width"], info["height"]] for info in dataset.coco.loadImgs(dataset.image_ids)],
                     np.float32)
    xy = to_image_pixels(mean_xy[None], sizes[:, None, :], dataset.input_size)
    points = np.concatenate([xy, np.ones(xy.shape[:2] + (1,), np.float32)], -1)
    return coco_ap(dataset, points, np.ones(len(dataset)), print_table)["AP"]


def scored_images(args, saved, checkpoint, data_root):
    """(dataset, what it is) that eval scores. A file is the training file when its content is (train.py stored its
    sha256, so another spelling of its path or a copy is caught): then only the images train.py held out."""
    arch, settings = saved["arch"], saved["settings"]
    common = dict(input_size=arch["input_size"], num_keypoints=arch["num_keypoints"],
                  normalize=not settings["raw_targets"])
    if args.val_ann or args.ann:
        ann = Path(args.val_ann or args.ann)
        image_dir = Path(args.data) if args.data else ann.parent
    else:
        image_dir, ann = ensure_synthetic(data_root, size=arch["input_size"])["val"]
    if not ann.is_file():
        raise SystemExit(f"error: {ann}: annotation file not found")
    if "train_ann_sha256" in settings:
        training_file, held_out = is_training_file(ann, settings), settings["val_image_ids"]
    else:   # checkpoints before issue 19: the path train.py was given, and the split it made
        training_file, held_out = str(ann) == saved["config"].get("ann"), None
    if not training_file:
        return PoseSPIDataset(ann, image_dir, **common), f"all of {ann}"
    if held_out is None and "train_ann_sha256" not in settings:
        held_out = split_image_ids(load_coco_keypoints(ann, arch["num_keypoints"]), args.val_fraction)[1]
    if not held_out:
        raise SystemExit(f"error: {ann} is the file {checkpoint} was trained on, all of it: scores on it would "
                         "be on training images; evaluate another file (--val-ann)")
    return (PoseSPIDataset(ann, image_dir, image_ids=held_out, **common),
            f"the validation split of {ann} (its training file; the images train.py held out)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, role="eval")
    parser.add_argument("--no-flip-test", dest="flip_test", action="store_false",
                        help="one forward pass per image; score = mean visibility")
    parser.add_argument("--val-fraction", type=at_least(0.0, above=True), default=0.2,
                        help="checkpoints before issue 19, with their training --ann: the held-out share train.py used")
    parser.add_argument("--val-ann", help="evaluate this annotation file as a whole")
    args = parser.parse_args(argv)
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAMES, "python pose_spi/train.py", args.out)
    device = pick_device(args.device)
    model, saved = model_from_checkpoint(checkpoint, build_model, MODEL_NAMES, upgrade_checkpoint, device)
    arch, settings = saved["arch"], saved["settings"]
    dirs = output_dirs(checkpoint.parent.parent.name, checkpoint.parent.name, args.out)
    val_set, split = scored_images(args, saved, checkpoint, dirs["data"])
    print(f"checkpoint {checkpoint} ({arch['head']} head, {arch['encoder']} encoder)")
    example = torch.zeros(1, 1, arch["input_size"], arch["input_size"], device=device)
    print(f"parameters {count_parameters(model):,}; GFLOPs per image {count_flops(model, example) / 1e9:.4f}")
    points, scores, _ = predict(model, val_set, device, flip_test=args.flip_test, raw_targets=settings["raw_targets"])
    print(f"COCO keypoint AP on {len(val_set)} images: {split}; sigmas by keypoint name:")
    stats = coco_ap(val_set, points, scores)
    mean_xy = settings.get("mean_pose")   # the training set's, stored by train.py
    baseline = f"{mean_pose_ap(np.float32(mean_xy), val_set):.4f}" if mean_xy else "n/a (not in this checkpoint)"
    print(f"AP {stats['AP']:.4f}  (mean-pose baseline AP {baseline})")
    path = write_results_json(to_results(val_set, points, scores), Path(dirs["outputs"]) / "results.json")
    print(f"results written to {path}")


if __name__ == "__main__":
    exit_on_bad_input(main)
