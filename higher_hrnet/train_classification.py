"""Train ClassificationHRNet on an ImageFolder (ImageNet): the backbone pretraining of HigherHRNet.

  python higher_hrnet/train_classification.py                  # built-in shapes data, tiny width, CPU
  python higher_hrnet/train_classification.py --data data/imagenet              # official recipe, W32
  torchrun --nproc_per_node=4 higher_hrnet/train_classification.py --data data/imagenet
`--data` holds `train/<class>/*` and `val/<class>/*` (see prepare_data.py for the ImageNet archive).
Preset `official` (HRNet-Image-Classification, cls_hrnet_w32_sgd_lr5e-2_wd1e-4_bs32_x100): SGD lr
0.05, momentum 0.9, weight decay 1e-4, Nesterov, 100 epochs, LR x0.1 at 30/60/90, 32 images per
GPU on 4 GPUs, RandomResizedCrop 224 + flip; evaluation resizes to 256 and center-crops 224.
Preset `builtin` is the same recipe at CPU size. Any flag given overrides the preset.
"""

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

from common.data import IMAGENET_MEAN, IMAGENET_STD, exit_on_bad_input, read_image
from common.drawing import make_grid
from common.engine import fit
from common.loader import SeededSamples, collate_skip_bad
from common.pretrained import resolve_pretrained
from common.runs import (add_common_args, local_main_first, output_dirs, parse_with_preset,
                         setup_device_and_distributed)
from higher_hrnet.checkpoints import load_official_checkpoint
from higher_hrnet.model import ClassificationHRNet

MODEL_NAME = "hrnet_classification"
OFFICIAL_IMAGENET_FILE = "hrnetv2_w32_imagenet_pretrained.pth"

PRESETS = {
    "official": dict(width=32, image_size=224, resize_size=256, crop_min_scale=0.08, epochs=100,
                     batch_size=32, lr=0.05, lr_steps=[30, 60, 90], workers=4),
    # Built-in shapes: 6 classes, 32 px crops that keep at least 35% of the image (an 8% crop of a
    # shape picture often holds no shape), the official schedule shape compressed to 30 epochs.
    "builtin": dict(width=8, image_size=32, resize_size=36, crop_min_scale=0.35, epochs=30,
                    batch_size=32, lr=0.05, lr_steps=[18, 26], workers=2),
}
MOMENTUM, WEIGHT_DECAY, NESTEROV, LR_FACTOR = 0.9, 1e-4, True, 0.1

# ---------------------------------------------------------------------------------------------
# Built-in data: a small ImageFolder of generated shapes, rendered deterministically on first use.

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "stripes")
BUILTIN_SIZE, BUILTIN_TRAIN_PER_CLASS, BUILTIN_VAL_PER_CLASS = 80, 40, 10


def _random_color(rng, avoid=None):
    while True:
        color = rng.integers(0, 256, 3)
        if avoid is None or np.abs(color - avoid).sum() > 200:
            return color


def render_shape(shape, rng, size=BUILTIN_SIZE):
    """One RGB image of `shape` with random colors, size, position and rotation over noise."""
    background = _random_color(rng)
    image = np.clip(background + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    color = tuple(int(c) for c in _random_color(rng, avoid=background))
    radius = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    thickness = max(2, int(radius / 4))

    def polygon(n, r=radius, phase=angle):
        t = phase + np.arange(n) * 2 * np.pi / n
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).round().astype(np.int32)

    if shape == "circle":
        cv2.circle(image, (int(cx), int(cy)), int(radius), color, -1, cv2.LINE_AA)
    elif shape == "ring":
        cv2.circle(image, (int(cx), int(cy)), int(radius), color, thickness, cv2.LINE_AA)
    elif shape in ("square", "triangle"):
        cv2.fillPoly(image, [polygon(4 if shape == "square" else 3)], color, cv2.LINE_AA)
    elif shape == "cross":
        for phase in (angle, angle + np.pi / 2):
            a, b = polygon(2, phase=phase)
            cv2.line(image, tuple(map(int, a)), tuple(map(int, b)), color, thickness, cv2.LINE_AA)
    elif shape == "stripes":
        direction = np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        for offset in (-1.0, 0.0, 1.0):
            center = np.array([cx, cy]) + offset * radius * 0.6 * normal
            a, b = center - radius * direction, center + radius * direction
            cv2.line(image, tuple(map(int, a)), tuple(map(int, b)), color, max(2, thickness // 2),
                     cv2.LINE_AA)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def ensure_builtin_imagefolder(data_root, seed=0):
    """Render the built-in shapes ImageFolder under data_root/hrnet_shapes (once) and return it."""
    root = Path(data_root) / "hrnet_shapes"
    done = root / ".complete"
    if done.is_file():
        return root
    # Validation images come from a seed stream disjoint from training.
    for split, per_class, stream in (("train", BUILTIN_TRAIN_PER_CLASS, 0),
                                     ("val", BUILTIN_VAL_PER_CLASS, 1)):
        for class_index, shape in enumerate(SHAPE_CLASSES):
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, stream, class_index, i])
                image = render_shape(shape, rng)
                cv2.imwrite(str(folder / f"{shape}_{i:04d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    done.write_text("rendered by higher_hrnet/train_classification.py\n")
    return root


# ---------------------------------------------------------------------------------------------
# Data

def train_transform(image_size, crop_min_scale=0.08):
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist()),
    ])


def eval_transform(image_size, resize_size):
    return v2.Compose([
        v2.Resize(resize_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist()),
    ])


class ImageFolderSamples(Dataset):
    """`root/<class>/<image>` -> {"image": (3,S,S) float, "label": int}. Images are decoded by
    content (common.data.read_image); an unreadable one raises BadImageError, which the shared
    loader turns into a warning and a skipped sample."""

    def __init__(self, root, transform, classes=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SystemExit(f"{self.root}: image folder not found")
        found, _ = find_classes(str(self.root))
        self.classes = list(classes) if classes is not None else found
        class_to_idx = {c: i for i, c in enumerate(self.classes)}
        extra = sorted(set(found) - set(class_to_idx))
        if extra:
            raise SystemExit(f"{self.root}: class folders not in the training classes: {extra[:5]}")
        self.samples = make_dataset(str(self.root), {c: class_to_idx[c] for c in found}, IMG_EXTENSIONS)
        if not self.samples:
            raise SystemExit(f"{self.root}: no images found (expected {self.root}/<class>/<image>)")
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous()
        return {"image": self.transform(image), "label": label}


@torch.no_grad()
def evaluate_topk(model, dataset, batch_size, workers, device):
    """Top-1 and top-5 accuracy over `dataset` (unreadable images are skipped and reported)."""
    loader = DataLoader(SeededSamples(dataset), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_skip_bad)
    model.eval()
    correct1 = correct5 = total = skipped = 0
    for batch in loader:
        skipped += batch.pop("num_skipped")
        if not batch:
            continue
        logits = model(batch["image"].to(device))
        labels = batch["label"].to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(1).sum())
        total += len(labels)
    if skipped:
        print(f"evaluation: skipped {skipped} unreadable images")
    return {"top1": correct1 / max(total, 1), "top5": correct5 / max(total, 1)}


def denormalize(images):
    """(B,3,H,W) normalized float -> list of HxWx3 uint8 RGB."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=images.device)[:, None, None]
    pixels = ((images * std + mean).clamp(0, 1) * 255).round().byte()
    return [p.permute(1, 2, 0).cpu().numpy() for p in pixels]


def draw_predictions(image, probabilities, class_names, top=5):
    """The image with its top classes and probabilities written under it (RGB uint8)."""
    values, indices = torch.as_tensor(probabilities).topk(min(top, len(class_names)))
    scale = max(1.0, image.shape[1] / 320)
    line_h = int(18 * scale)
    panel = np.full((line_h * len(values) + 6, image.shape[1], 3), 255, np.uint8)
    for row, (p, i) in enumerate(zip(values.tolist(), indices.tolist())):
        text = f"{p:5.1%} {class_names[i]}"[:60]
        cv2.putText(panel, text, (4, line_h * (row + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * scale,
                    (0, 0, 0), max(1, int(scale)), cv2.LINE_AA)
    return np.concatenate([image, panel], 0)


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, help="HRNet width: 32, 48, or tiny 8/16 (default: %(default)s)")
    parser.add_argument("--image-size", type=int, help="training/eval crop size (default: %(default)s)")
    parser.add_argument("--resize-size", type=int, help="eval resize of the short side (default: %(default)s)")
    parser.add_argument("--crop-min-scale", type=float,
                        help="smallest image fraction a RandomResizedCrop keeps (official: 0.08; "
                             "default: %(default)s)")
    parser.add_argument("--lr-steps", type=int, nargs="+", help="epochs where LR drops x0.1 (default: %(default)s)")
    add_common_args(parser, val_every="1e")
    # official with --data (ImageNet), builtin without
    return parse_with_preset(parser, PRESETS, argv, default="builtin", default_with_data="official")


def main(args):
    setup_device_and_distributed(args)
    dirs = output_dirs(MODEL_NAME, args.run_name, args.out)
    if args.data:
        data_root = Path(args.data)
    else:
        data_root = dirs["data"] / "hrnet_shapes"
        with local_main_first(args):
            ensure_builtin_imagefolder(dirs["data"], seed=0)
    train_set = ImageFolderSamples(data_root / "train", train_transform(args.image_size, args.crop_min_scale))
    val_set = None
    if (data_root / "val").is_dir():
        val_set = ImageFolderSamples(data_root / "val", eval_transform(args.image_size, args.resize_size),
                                     classes=train_set.classes)
    args.data_root = str(data_root)     # in the checkpoint's config: eval_classification.py finds the data

    model = ClassificationHRNet(args.width, num_classes=len(train_set.classes))
    resolve_pretrained(args.pretrained, filename=OFFICIAL_IMAGENET_FILE, url=None,
                       load_fn=lambda state: load_official_checkpoint(model, state))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY, nesterov=NESTEROV)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_steps, gamma=LR_FACTOR)

    def compute_loss(net, batch):
        logits = net(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        accuracy = (logits.argmax(1) == batch["label"]).float().mean()
        return loss, {"train_top1": float(accuracy)}

    evaluate = None
    if val_set is not None:
        def evaluate(net):
            return evaluate_topk(net, val_set, args.batch_size, args.workers, next(net.parameters()).device)

    def log_images(net, batch):
        probabilities = net(batch["image"][:8]).softmax(1).cpu()
        drawn = [draw_predictions(img, p, train_set.classes, top=3)
                 for img, p in zip(denormalize(batch["image"][:8]), probabilities)]
        return {"predictions": make_grid(drawn)}

    settings = {"image_size": args.image_size, "resize_size": args.resize_size, "class_names": train_set.classes}
    model, summary = fit(args, model, train_set, compute_loss, optimizer, model_name=MODEL_NAME,
                         arch=model.arch, settings=settings, scheduler=scheduler, evaluate=evaluate,
                         best_metric="top1" if evaluate else None, log_images=log_images)
    if args.rank == 0:
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
        print(f"final: {metrics}" if metrics else "final: no validation folder, no metrics")
        print(f"outputs: checkpoints in {summary['last_checkpoint'].parent}, "
              f"TensorBoard logs in {summary['tensorboard']}")
    return summary


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
