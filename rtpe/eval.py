"""Evaluate the rtpe student, or its teacher, on the same images: COCO AP and segmentation IoU.

    python rtpe/eval.py                                    # newest rtpe checkpoint, built-in val scenes
    python rtpe/eval.py --model teacher                    # the teacher cache of the built-in val scenes
    python rtpe/eval.py --data ~/coco --split val2017 --list ../shared/reference/coco_minival2017_100.txt

Student: letterbox to --input-size, network, grouping (higher_hrnet.grouping, one tag dimension).
Teacher: its cached maps (rtpe/teacher_inference.py: a higher_hrnet checkpoint or the oracle), grouped the
same way at stride 4 of the teacher input. Writes results.json, metrics.json and a table to
outputs/rtpe/<run>/.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common.data import exit_on_bad_input, load_coco_keypoints


def evaluate_cache(coco, cache_dir, image_ids):
    """AP of cached teacher maps grouped at stride 4 (tags per joint or shared)."""
    from common.evaluation import coco_keypoint_ap
    from common.keypoints import COCO17
    from higher_hrnet.grouping import GroupingParams
    from rtpe.infer import SEED_GROUPING, maps_to_people, people_to_results
    from rtpe.teacher_inference import read_entry, read_index

    index = read_index(cache_dir)
    if index is None:
        raise SystemExit(f"{cache_dir}: no teacher cache (run rtpe/teacher_inference.py)")
    params = GroupingParams(num_joints=17, **SEED_GROUPING)
    results = []
    for image_id in image_ids:
        name = coco.loadImgs(image_id)[0]["file_name"]
        entry = read_entry(Path(cache_dir) / index["images"][name])
        to_image = np.linalg.inv(np.vstack([entry["affine"], [0, 0, 1]]))[:2]
        keypoints, scores = maps_to_people(entry["heatmaps"], entry["tags"], to_image, params)
        results += people_to_results(keypoints, scores, image_id)
    metrics = coco_keypoint_ap(coco, results, COCO17.sigmas, print_table=True, image_ids=image_ids)
    return metrics, results, index["teacher"]


def main(args):
    from common.engine import output_dirs
    from common.evaluation import write_results_json
    from rtpe.infer import default_checkpoint, load_student
    from rtpe.train import evaluate_student, select_image_ids

    checkpoint = default_checkpoint(args) if args.model == "student" else None  # say so before any work
    if args.data is None:
        from common.synthetic import ensure_dataset
        data = Path(ensure_dataset("multi_person", root=args.out))
        ann, image_dir, split = data / "annotations" / "person_keypoints_val.json", data / "images" / "val", "val"
    else:
        data, split = Path(args.data), args.split
        ann = Path(args.ann) if args.ann else data / "annotations" / f"person_keypoints_{split}.json"
        image_dir = data / "images" / split
    coco = load_coco_keypoints(ann)
    image_ids = select_image_ids(coco, args.list, args.limit)

    if args.model == "teacher":
        if args.teacher_cache:
            cache = Path(args.teacher_cache) / split
        else:
            from rtpe.teacher_inference import ensure_builtin_cache
            root, _ = ensure_builtin_cache(args.teacher, args.out)
            cache = root / split
        metrics, results, who = evaluate_cache(coco, cache, image_ids)
        label = f"teacher ({who}, cache {cache})"
    else:
        model = load_student(checkpoint)
        metrics, results = evaluate_student(model, coco, image_dir, image_ids, args.input_size, print_table=True)
        label = f"student {model.preset}/{model.colour} ({checkpoint}, input {args.input_size})"
    out_dir = output_dirs("rtpe", args.run_name or f"eval_{args.model}", args.out)["outputs"]
    write_results_json(results, out_dir / "results.json")
    (out_dir / "metrics.json").write_text(json.dumps({"model": label, "images": len(image_ids), **metrics}, indent=1))
    print(f"\n{label} on {len(image_ids)} images of {ann}")
    print("| AP | AP50 | AP75 | AR | seg IoU |\n|---|---|---|---|---|")
    seg = f"{metrics['seg_IoU']:.3f}" if "seg_IoU" in metrics else "-"
    print(f"| {metrics['AP']:.3f} | {metrics['AP50']:.3f} | {metrics['AP75']:.3f} | {metrics['AR']:.3f} | {seg} |")
    print(f"results.json and metrics.json written to {out_dir}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("student", "teacher"), default="student", help="what to evaluate")
    p.add_argument("--checkpoint", default=None, help="student checkpoint (default: the newest rtpe one)")
    p.add_argument("--teacher", default="auto", help="built-in data: auto, oracle or higher_hrnet weights")
    p.add_argument("--teacher-cache", default=None, help="teacher cache root with <split>/ (own data)")
    p.add_argument("--data", default=None, help="COCO-style folder (default: the built-in scenes)")
    p.add_argument("--ann", default=None, help="annotation file (default: <data>/annotations/person_keypoints_<split>.json)")
    p.add_argument("--split", default="val2017", help="split under --data (default: %(default)s)")
    p.add_argument("--list", default=None, help="file of image names to evaluate (a minival list)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--input-size", type=int, default=256, help="student input, longer side (default: %(default)s)")
    p.add_argument("--run-name", default=None, help="output folder under outputs/rtpe/")
    p.add_argument("--out", default=None, help="output root (default: $POSE_OUTPUT_ROOT, else .)")
    return p.parse_args(argv)


if __name__ == "__main__":
    exit_on_bad_input(main, parse_args())
