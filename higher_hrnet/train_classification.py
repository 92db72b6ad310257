"""Train ClassificationHRNet on an ImageFolder (ImageNet): the backbone pretraining of HigherHRNet.

  python higher_hrnet/train_classification.py                  # built-in pose classes, two CPU cores
  python higher_hrnet/train_classification.py --data data/imagenet              # official recipe, W32
  torchrun --nproc_per_node=4 higher_hrnet/train_classification.py --data data/imagenet
`--data` holds `train/<class>/*` and `val/<class>/*` (see prepare_data.py for the ImageNet archive).
Preset `official` (HRNet-Image-Classification, cls_hrnet_w32_sgd_lr5e-2_wd1e-4_bs32_x100): SGD lr
0.05, momentum 0.9, weight decay 1e-4, Nesterov, 100 epochs, LR x0.1 at 30/60/90, 32 images per
GPU on 4 GPUs, RandomResizedCrop 224 + flip; evaluation resizes to 256 and center-crops 224.
Preset `builtin` (no --data) renders 7 classes of people from the pose scenes' figures (no_person,
arms_down, arms_out, arms_up, one_arm_up, crouching, lying) and trains the width of train.py's `cpu`
preset (W8 today; --width 16 works too) on 64 px crops: AdamW lr 4e-3, weight decay 0.05, 100 warm-up
steps then cosine decay, the last BatchNorm of each residual block zero-initialized, 6 epochs.
Any flag given overrides the preset.
"""

import argparse
import math
from dataclasses import replace
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
from common.engine import fit, planned_steps
from common.loader import SeededSamples, collate_skip_bad
from common.pretrained import resolve_pretrained
from common.runs import (add_common_args, local_main_first, output_dirs, parse_with_preset,
                         setup_device_and_distributed)
from common.synthetic import (L_ANK, L_EL, L_HIP, L_KNEE, L_SH, L_WR, PELVIS, R_ANK, R_EL, R_HIP, R_KNEE, R_SH,
                              R_WR, THORAX, ensure_dataset, random_background, random_human_figure,
                              rasterize_human)
from higher_hrnet.checkpoints import load_official_checkpoint
from higher_hrnet.model import BasicBlock, Bottleneck, ClassificationHRNet
from higher_hrnet.train import PRESETS as POSE_PRESETS

MODEL_NAME = "hrnet_classification"
OFFICIAL_IMAGENET_FILE = "hrnetv2_w32_imagenet_pretrained.pth"

PRESETS = {
    "official": dict(width=32, image_size=224, resize_size=256, crop_min_scale=0.08, epochs=100,
                     batch_size=32, lr=0.05, lr_steps=[30, 60, 90], workers=4, optimizer="sgd",
                     weight_decay=1e-4, schedule="step", warmup_steps=0, zero_init_residual=False,
                     builtin_per_class=None, builtin_size=None),
    # Built-in pose classes on two CPU cores (README: what each choice bought, measured): 64 px crops
    # of the 80 px images, AdamW with warm-up and cosine decay, residual blocks starting as identities.
    # The width follows the pose `cpu` preset, so its backbone can start from this checkpoint.
    "builtin": dict(width=POSE_PRESETS["cpu"]["width"], image_size=64, resize_size=72, crop_min_scale=0.5,
                    epochs=6, batch_size=32, lr=4e-3, lr_steps=None, workers=1, optimizer="adamw",
                    weight_decay=0.05, schedule="cosine", warmup_steps=100, zero_init_residual=True,
                    builtin_per_class=1000, builtin_size=80),
}
MOMENTUM, NESTEROV, LR_FACTOR = 0.9, True, 0.1

# ---------------------------------------------------------------------------------------------
# Built-in data: an ImageFolder of people in six pose classes plus "no person", drawn with the
# figures, backgrounds and clutter of the built-in pose scenes (common.synthetic), rendered once.

POSE_CLASSES = ("no_person", "arms_down", "arms_out", "arms_up", "one_arm_up", "crouching", "lying")
# Upper-arm direction per arm class, in degrees from the body's "down" towards the arm's own side.
ARM_ANGLES = {"down": (15, 40), "out": (70, 110), "up": (150, 185)}
BUILTIN_VERSION = 3  # bump when the renderer changes so the cached folder is rendered again
BUILTIN_DEFAULTS = dict(num_images=len(POSE_CLASSES) * 1000, num_val=len(POSE_CLASSES) * 100, image_size=80, seed=0,
                        version=BUILTIN_VERSION)   # image counts are of all classes together


def _unit(vector):
    return vector / max(float(np.linalg.norm(vector)), 1e-6)


def _aim_limb(points, root, middle, end, down, outward, angle, bend):
    """Point the limb root -> middle -> end `angle` degrees from `down` towards `outward` (its segment
    lengths kept), the second segment `bend` degrees further."""
    first = np.linalg.norm(points[middle] - points[root])
    second = np.linalg.norm(points[end] - points[middle])
    a, b = np.radians(angle), np.radians(angle + bend)
    points[middle] = points[root] + first * (np.cos(a) * down + np.sin(a) * outward)
    points[end] = points[middle] + second * (np.cos(b) * down + np.sin(b) * outward)


def pose_figure(rng, pose, size):
    """A random person (common.synthetic's figure: proportions, facing, colors) posed as `pose`,
    0.5-0.85 of the image side tall or wide, placed at random in a size x size image with all of it in view."""
    while True:  # standing upright (no rare bent-over figure), facing the camera or turned away:
        # seen from the side one arm hides the other and the classes would overlap
        fig = random_human_figure(rng, size, (0, 0), angle_range=0.35)  # near standing
        points = fig.points.copy()
        down = _unit(points[PELVIS] - points[THORAX])
        if abs(np.sin(fig.yaw)) <= 0.5 and down[1] >= np.cos(0.5):
            break
    across = np.array([-down[1], down[0]])
    arms = {"arms_down": ("down", "down"), "arms_out": ("out", "out"), "arms_up": ("up", "up"),
            "one_arm_up": tuple(rng.permutation(["up", "down"]))}.get(pose)
    if arms is None:  # crouching or lying: any arms but raised ones
        arms = tuple(rng.choice(["down", "out"], 2))
    for (shoulder, elbow, wrist), arm in zip(((L_SH, L_EL, L_WR), (R_SH, R_EL, R_WR)), arms):
        outward = across if (points[shoulder] - points[THORAX]) @ across >= 0 else -across
        _aim_limb(points, shoulder, elbow, wrist, down, outward, rng.uniform(*ARM_ANGLES[arm]),
                  rng.uniform(-30, 30))
    if pose == "crouching":  # thighs out and up, shins back down
        for hip, knee, ankle in ((L_HIP, L_KNEE, L_ANK), (R_HIP, R_KNEE, R_ANK)):
            outward = across if (points[hip] - points[PELVIS]) @ across >= 0 else -across
            thigh = rng.uniform(60, 105)
            _aim_limb(points, hip, knee, ankle, down, outward, thigh, rng.uniform(-15, 15) - thigh)
    head = fig.head_center
    if pose == "lying":
        angle = np.radians(rng.choice([-1, 1]) * rng.uniform(70, 110))
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points, head = points @ rotation.T, rotation @ head
    fig = replace(fig, points=points, head_center=head)
    low, high = points.min(0) - fig.head_radius, points.max(0) + fig.head_radius
    scale = rng.uniform(0.5, 0.85) * size / (high - low).max()
    slack = size - scale * (high - low)  # anywhere in the image, but all of the person in view
    return fig.moved(scale, rng.uniform(0.1, 0.9, 2) * slack - low * scale)


def render_pose(pose, rng, size=BUILTIN_DEFAULTS["image_size"]):
    """One RGB image of class `pose`: a cluttered built-in background, the posed person, sensor noise."""
    image = random_background(rng, (size, size))
    if pose != "no_person":
        labels, colors, _ = rasterize_human(pose_figure(rng, pose, size), (0, 0), image.shape[:2])
        image[labels > 0] = colors[labels[labels > 0]]
    noise = rng.normal(0, rng.uniform(1, 5), (size, size, 1))
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def build_pose_classes(folder, split, count, progress=True, image_size=80, seed=0, version=BUILTIN_VERSION):
    """Write `count` images of `split`, in equal shares per class, as <folder>/<split>/<class>/<image>.png. The
    validation images come from a seed stream disjoint from training. version: of this renderer (part of the
    cache key, see ensure_builtin_imagefolder)."""
    stream = {"train": 0, "val": 1}[split]
    for class_index, pose in enumerate(POSE_CLASSES):
        out = Path(folder) / split / pose
        out.mkdir(parents=True, exist_ok=True)
        for i in range(count // len(POSE_CLASSES)):
            image = render_pose(pose, np.random.default_rng([seed, stream, class_index, i]), image_size)
            cv2.imwrite(str(out / f"{pose}_{i:05d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def ensure_builtin_imagefolder(root=None, **params):
    """<root>/data/hrnet_poses, the built-in pose-class ImageFolder (train/ and val/), rendered by
    common.synthetic.ensure_dataset unless its params.json matches. params override BUILTIN_DEFAULTS:
    num_images, num_val (all classes together), image_size, seed."""
    return ensure_dataset("hrnet_poses", build_pose_classes, BUILTIN_DEFAULTS, root, **params)


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


def zero_init_residual(model):
    """Zero the last BatchNorm scale of every residual block, so each block starts as the identity."""
    for module in model.modules():
        if isinstance(module, Bottleneck):
            torch.nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, BasicBlock):
            torch.nn.init.zeros_(module.bn2.weight)


def build_optimizer_and_scheduler(model, args, num_samples):
    """(optimizer, scheduler, "epoch" | "step") of the recipe in args."""
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=MOMENTUM,
                                    weight_decay=args.weight_decay, nesterov=NESTEROV)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.schedule == "step":
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_steps, gamma=LR_FACTOR), "epoch"
    total, warmup = planned_steps(args, num_samples), max(args.warmup_steps, 0)

    def factor(step):  # linear warm-up from lr/warmup, then half a cosine down to 0 at the last step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step"


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, help="HRNet width: 32, 48, or tiny 8/16 (default: %(default)s)")
    parser.add_argument("--image-size", type=int, help="training/eval crop size (default: %(default)s)")
    parser.add_argument("--resize-size", type=int, help="eval resize of the short side (default: %(default)s)")
    parser.add_argument("--crop-min-scale", type=float,
                        help="smallest image fraction a RandomResizedCrop keeps (official: 0.08; "
                             "default: %(default)s)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), help="sgd (Nesterov) or adamw (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, help="weight decay (default: %(default)s)")
    parser.add_argument("--schedule", choices=("step", "cosine"),
                        help="step: LR x0.1 at --lr-steps epochs; cosine: per step down to 0 after the warm-up "
                             "(default: %(default)s)")
    parser.add_argument("--lr-steps", type=int, nargs="+", help="epochs where LR drops x0.1 (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, help="linear LR warm-up steps, cosine schedule (default: %(default)s)")
    parser.add_argument("--zero-init-residual", type=int, choices=(0, 1),
                        help="1: zero the last BatchNorm of each residual block (default: %(default)s)")
    parser.add_argument("--builtin-per-class", type=int,
                        help="built-in data: training images per class (default: %(default)s)")
    parser.add_argument("--builtin-size", type=int, help="built-in data: image side in px (default: %(default)s)")
    add_common_args(parser, val_every="1e")
    # official with --data (ImageNet), builtin without
    return parse_with_preset(parser, PRESETS, argv, default="builtin", default_with_data="official")


def main(args):
    setup_device_and_distributed(args)
    dirs = output_dirs(MODEL_NAME, args.run_name, args.out)
    if args.data:
        data_root = Path(args.data)
    else:
        with local_main_first(args):
            data_root = ensure_builtin_imagefolder(dirs["root"], image_size=args.builtin_size,
                                                   num_images=len(POSE_CLASSES) * args.builtin_per_class)
    train_set = ImageFolderSamples(data_root / "train", train_transform(args.image_size, args.crop_min_scale))
    val_set = None
    if (data_root / "val").is_dir():
        val_set = ImageFolderSamples(data_root / "val", eval_transform(args.image_size, args.resize_size),
                                     classes=train_set.classes)
    args.data_root = str(data_root)     # in the checkpoint's config: eval_classification.py finds the data

    model = ClassificationHRNet(args.width, num_classes=len(train_set.classes))
    resolve_pretrained(args.pretrained, filename=OFFICIAL_IMAGENET_FILE, url=None,
                       load_fn=lambda state: load_official_checkpoint(model, state))
    if args.zero_init_residual:
        zero_init_residual(model)
    optimizer, scheduler, interval = build_optimizer_and_scheduler(model, args, len(train_set))

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
                         arch=model.arch, settings=settings, scheduler=scheduler, scheduler_interval=interval,
                         evaluate=evaluate, best_metric="top1" if evaluate else None, log_images=log_images)
    if args.rank == 0:
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
        print(f"final: {metrics}" if metrics else "final: no validation folder, no metrics")
        print(f"outputs: checkpoints in {summary['last_checkpoint'].parent}, "
              f"TensorBoard logs in {summary['tensorboard']}")
    return summary


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
