"""Evaluate a Pose-SPI checkpoint: COCO keypoint AP (sigmas by keypoint name) next to the mean-pose baseline.

    python pose_spi/eval.py                                   # newest checkpoint, built-in val set
    python pose_spi/eval.py --checkpoint CKPT --data IMAGES --ann ANN.json [--no-flip-test]
Prints the AP table, parameters and GFLOPs, and writes the predictions as COCO results JSON.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from common.evaluation import coco_keypoint_ap, count_flops, count_parameters, write_results_json
from pose_spi.dataset import build_datasets, to_image_pixels
from pose_spi.model import PoseSPI

MODEL_NAMES = ("pose_spi", "pose_spi_keypointrcnn")  # train.py and train_keypointrcnn.py runs


def decode_output(output, input_size, num_keypoints, raw_targets=False):
    """Network output (B, 3K) -> keypoints (B, K, 2) in input pixels and visibility scores (B, K) in [0, 1]."""
    out = output.float().view(-1, num_keypoints, 3)
    if raw_targets:  # the seed's: raw pixels, v regressed towards 0..2
        return out[..., :2], (out[..., 2] / 2).clamp(0, 1)
    return out[..., :2] * input_size, torch.sigmoid(out[..., 2])


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
    for batch in loader:
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


def load_model(checkpoint, device="cpu"):
    """PoseSPI rebuilt from a checkpoint's stored config; returns (model, config)."""
    from common.engine import load_checkpoint
    from pose_spi.model import model_config

    state = load_checkpoint(checkpoint)
    config = argparse.Namespace(**state["config"])
    model = PoseSPI(**model_config(config))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config


def load_for_inference(args):
    """(checkpoint, device, model, config, output dirs of its run) for --checkpoint, else the newest Pose-SPI
    checkpoint; without one, say in one line how to get one and exit 1."""
    from common.engine import checkpoint_or_exit, output_dirs

    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAMES, "python pose_spi/train.py", args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, config = load_model(checkpoint, device)
    dirs = output_dirs(Path(checkpoint).parent.parent.name, Path(checkpoint).parent.name, args.out)
    return checkpoint, device, model, config, dirs


def main(argv=None):
    from common.engine import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--no-flip-test", dest="flip_test", action="store_false",
                        help="one forward pass per image; score = mean visibility")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="with --ann and no --val-ann: evaluate the same held-out split train.py used")
    parser.add_argument("--val-ann", help="evaluate this annotation file as a whole")
    args = parser.parse_args(argv)
    checkpoint, device, model, config, dirs = load_for_inference(args)
    data_args = argparse.Namespace(
        data=args.data, ann=args.ann, val_ann=args.val_ann, val_data=args.data, val_fraction=args.val_fraction,
        input_size=config.input_size, num_keypoints=config.num_keypoints, raw_targets=config.raw_targets,
        augment=False, subset=None, repeat=1)
    if args.ann and not args.val_ann and getattr(config, "ann", None) != args.ann:
        # a file train.py never saw: evaluate all of it
        data_args.val_ann = args.ann
    train_set, val_set = build_datasets(data_args, dirs["data"])
    print(f"checkpoint {checkpoint} ({config.head} head, {config.encoder} encoder)")
    print(f"parameters {count_parameters(model):,}; GFLOPs per image "
          f"{count_flops(model, torch.zeros(1, 1, config.input_size, config.input_size, device=device)) / 1e9:.4f}")
    points, scores, _ = predict(model, val_set, device, flip_test=args.flip_test, raw_targets=config.raw_targets)
    print(f"COCO keypoint AP on {len(val_set)} images ({val_set.ann_file}), sigmas by keypoint name:")
    stats = coco_ap(val_set, points, scores)
    baseline = mean_pose_ap(mean_pose(train_set), val_set)
    print(f"AP {stats['AP']:.4f}  (mean-pose baseline AP {baseline:.4f})")
    path = write_results_json(to_results(val_set, points, scores), Path(dirs["outputs"]) / "predictions.json")
    print(f"predictions written to {path}")


if __name__ == "__main__":
    from common.data import exit_on_bad_input

    exit_on_bad_input(main)
