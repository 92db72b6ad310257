"""Evaluate ClassificationHRNet: top-1/top-5 on a validation ImageFolder (`--mode val`), or the top-5
classes with their probabilities drawn on your own images (`--mode custom`, the seed's two modes).

  python higher_hrnet/eval_classification.py                          # newest checkpoint, built-in val
  python higher_hrnet/eval_classification.py --data data/imagenet --checkpoint hrnetv2_w32_imagenet_pretrained.pth
  python higher_hrnet/eval_classification.py --mode custom --images photo.jpg my_folder/
Works with our checkpoints, the official ImageNet release and the seed's `hrnet_32.pt`; the width and
class count are read from the weights. Writes to outputs/hrnet_classification/<run>/.
"""

import argparse
import json
import sys
from pathlib import Path

import cv2
import torch
import torch.nn.functional as F
from torchvision.datasets.folder import find_classes

from common.data import BadImageError, exit_on_bad_input, read_image
from common.prediction import IMAGE_SUFFIXES
from common.runs import add_common_args, checkpoint_or_exit, load_checkpoint, output_dirs, pick_device
from higher_hrnet.checkpoints import CheckpointError, checkpoint_width, load_official_checkpoint, read_state_dict
from higher_hrnet.model import ClassificationHRNet
from higher_hrnet.train_classification import (MODEL_NAME, PRESETS, ImageFolderSamples,
                                               draw_predictions, ensure_builtin_imagefolder,
                                               eval_transform, evaluate_topk)

SYNSET_FILE = "LOC_synset_mapping.txt"


def load_classifier(path):
    """(model, info) from any supported checkpoint; info holds our checkpoints' settings and config (image
    size, class names, data folder); it is {} for files without them (official, seed)."""
    path = Path(path)
    raw = load_checkpoint(path)     # one line for a missing, refused or damaged file
    config = {**raw.get("config", {}), **raw.get("settings", {})} if isinstance(raw, dict) else {}
    state = read_state_dict(raw, name=path)
    if "classifier.weight" not in state:
        raise CheckpointError(f"{path}: not a ClassificationHRNet checkpoint (no classifier weights)")
    width = checkpoint_width(state)
    model = ClassificationHRNet(width, num_classes=state["classifier.weight"].shape[0])
    load_official_checkpoint(model, state)
    return model.eval(), config


def read_synset_names(path):
    """LOC_synset_mapping.txt lines 'n01440764 tench, Tinca tinca' -> {'n01440764': 'tench'}."""
    names = {}
    for line in Path(path).read_text().splitlines():
        wnid, _, description = line.strip().partition(" ")
        if wnid:
            names[wnid] = description.split(",")[0].strip() or wnid
    return names


def class_display_names(class_names, args, data_root):
    candidates = [args.class_names] if args.class_names else []
    if data_root is not None:
        candidates.append(Path(data_root) / SYNSET_FILE)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            synsets = read_synset_names(candidate)
            return [synsets.get(c, c) for c in class_names]
    return list(class_names)


def image_paths(inputs):
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            yield from sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield item


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("val", "custom"), default="val",
                        help="val: top-1/top-5 on <data>/val; custom: draw top-5 on --images (default: val)")
    parser.add_argument("--images", nargs="+", default=None,
                        help="custom mode: image files or folders (default: one val image per class, 8 at most)")
    parser.add_argument("--class-names", default=None,
                        help=f"a {SYNSET_FILE} for readable ImageNet names (default: <data>/{SYNSET_FILE})")
    parser.add_argument("--image-size", type=int, default=None, help="crop size (default: the checkpoint's, else 224)")
    parser.add_argument("--resize-size", type=int, default=None, help="short-side resize (default: the checkpoint's, else 256)")
    add_common_args(parser, role="eval", batch_size=32, workers=2)
    return parser.parse_args(argv)


def main(args):
    checkpoint = checkpoint_or_exit(args.checkpoint, MODEL_NAME, "python higher_hrnet/train_classification.py",
                                    args.out, hint=" (the official hrnetv2_w32_imagenet_pretrained.pth works)")
    try:
        model, config = load_classifier(checkpoint)
    except CheckpointError as error:
        print(f"error: {error}")
        return 1
    device = pick_device(args.device)
    model.to(device)
    official = PRESETS["official"]
    image_size = args.image_size or config.get("image_size") or official["image_size"]
    resize_size = args.resize_size or config.get("resize_size") or official["resize_size"]
    dirs = output_dirs(MODEL_NAME, args.run_name, args.out)
    if args.data and not Path(args.data).is_dir():
        print(f"error: {args.data}: data folder not found (expected <data>/val/<class>/<image>)")
        return 1
    data_root = Path(args.data) if args.data else (Path(config["data_root"]) if config.get("data_root") else None)
    if data_root is None or not data_root.is_dir():
        data_root = ensure_builtin_imagefolder(dirs["root"])
    num_classes = model.classifier.out_features
    class_names = config.get("class_names")
    if not class_names:
        # Files without a config (official, seed): the class index is the sorted folder order,
        # as in torchvision's ImageFolder (ImageNet: sorted WordNet ids).
        found = find_classes(str(data_root / "val"))[0] if (data_root / "val").is_dir() else []
        class_names = found if len(found) == num_classes else [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        print(f"error: {checkpoint}: {num_classes} classes in the weights but {len(class_names)} names in its config")
        return 1
    out_dir = dirs["outputs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = eval_transform(image_size, resize_size)
    print(f"checkpoint {checkpoint}: HRNet-W{model.width}, {num_classes} classes, eval {resize_size}/{image_size}")

    if args.mode == "val":
        val_set = ImageFolderSamples(data_root / "val", transform, classes=class_names)
        metrics = evaluate_topk(model, val_set, args.batch_size, args.workers, device)
        print(f"{len(val_set)} images of {data_root / 'val'}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}")
        report = {**metrics, "images": len(val_set), "data": str(data_root / "val"), "checkpoint": str(checkpoint),
                  "image_size": image_size, "resize_size": resize_size}
        (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"outputs written to {out_dir}")
        return 0

    shown_names = class_display_names(class_names, args, data_root)
    # default: the first validation image of each of the first 8 classes
    inputs = args.images or [min(folder.glob("*.png")) for folder in sorted((data_root / "val").iterdir())
                             if folder.is_dir() and any(folder.glob("*.png"))][:8]
    predictions, failures = [], 0
    for path in image_paths(inputs):
        try:
            image = read_image(path)
        except BadImageError as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        tensor = transform(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        with torch.no_grad():
            probabilities = F.softmax(model(tensor[None].to(device))[0], 0).cpu()
        values, indices = probabilities.topk(min(5, num_classes))
        predictions.append({"image": str(path), "top5": [
            {"class": class_names[i], "name": shown_names[i], "probability": round(float(p), 6)}
            for p, i in zip(values.tolist(), indices.tolist())]})
        drawn = draw_predictions(image, probabilities, shown_names)
        cv2.imwrite(str(out_dir / f"{Path(path).stem}_top5.png"), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        print(f"{path}: " + ", ".join(f"{t['name']} {t['probability']:.1%}" for t in predictions[-1]["top5"]))
    (out_dir / "predictions.json").write_text(json.dumps(predictions, indent=2) + "\n")
    print(f"outputs written to {out_dir}")
    return 1 if failures and not predictions else 0


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main, parse_args()))
