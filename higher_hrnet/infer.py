"""Run HigherHRNet on an image, a folder of images or a video: skeleton overlay, tag plot, heatmap plot, JSON.

    python higher_hrnet/infer.py                                  # newest checkpoint, built-in val images
    python higher_hrnet/infer.py photo.jpg --checkpoint pose_higher_hrnet_w32_512.pth --threshold 0.2
    python higher_hrnet/infer.py clip.mp4 --preset seed           # video in, annotated video out
Writes to outputs/higher_hrnet/<run>/: <name>_pose.jpg, <name>_tags.png, <name>_heatmaps.jpg per image
(a <name>_pose.mp4 for a video) and predictions.json. --threshold hides joints (e.g. refined ones) below it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from common.data import VIDEO_SUFFIXES, BadImageError, VideoWriter, exit_on_bad_input, iter_inputs, video_properties
from common.drawing import draw_heatmap_overlay, draw_people
from common.engine import output_dirs
from common.geometry import get_affine_transform, warp_image
from common.keypoints import get_layout
from higher_hrnet.eval import add_plain_network_arg, load_for_inference
from higher_hrnet.inference import PRESETS, maps_to_people, predict_maps, preset


def person_colour(index):
    hue = int(179 * ((index * 0.618) % 1.0))
    return tuple(int(c) for c in cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2RGB)[0, 0])


def draw_tag_plot(people, names, threshold, size=(640, 360)):
    """Each person's joint tags (first tag dimension) against the joint: well-grouped people are flat,
    separated lines. RGB uint8."""
    width, height = size
    plot = np.full((height, width, 3), 255, np.uint8)
    margin = 40
    shown = [p[p[:, 2] > threshold] for p in people]
    values = np.concatenate([p[:, 3] for p in shown]) if any(len(p) for p in shown) else np.zeros(1)
    lo, hi = float(values.min()) - 0.5, float(values.max()) + 0.5
    to_y = lambda v: int(height - margin - (v - lo) / (hi - lo) * (height - 2 * margin))
    to_x = lambda j: int(margin + j * (width - 2 * margin) / max(len(names) - 1, 1))
    cv2.line(plot, (margin, height - margin), (width - margin, height - margin), (0, 0, 0), 1)
    for j, name in enumerate(names):
        cv2.putText(plot, name[:6], (to_x(j) - 12, height - margin + 14 + 10 * (j % 2)), cv2.FONT_HERSHEY_PLAIN,
                    0.7, (0, 0, 0), 1)
    for tick in np.linspace(lo, hi, 5):
        cv2.putText(plot, f"{tick:.1f}", (2, to_y(tick) + 4), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1)
    for index, person in enumerate(people):
        for j in np.flatnonzero(person[:, 2] > threshold):
            cv2.circle(plot, (to_x(j), to_y(person[j, 3])), 4, person_colour(index), -1, cv2.LINE_AA)
    cv2.putText(plot, "tag value per joint (one colour per person)", (margin, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1, cv2.LINE_AA)
    return plot


def heatmaps_on_image(image, heatmaps, center, box):
    """The maximum over joints of the heatmaps, warped back onto the image and overlaid."""
    peak = heatmaps.max(0)[0].numpy()
    inverse = get_affine_transform(center, box, 0, (peak.shape[1], peak.shape[0]), inverse=True)
    back = warp_image(np.clip(peak, 0, 1), inverse, (image.shape[1], image.shape[0]))
    return draw_heatmap_overlay(image, back[None], alpha=0.55)


def run_image(model, image, config, layout, threshold, device):
    heatmaps, tags, center, box = predict_maps(model, image, config, layout.flip_index, layout.num_keypoints, device)
    people, scores = maps_to_people(heatmaps, tags, center, box, config, layout.num_keypoints)
    keep = scores >= 0 if len(scores) else np.zeros(0, bool)
    pose = draw_people(image, [p[:, :3] for p in people[keep]], layout.skeleton, threshold)
    return people, scores, pose, heatmaps, center, box


def to_json(people, scores, names):
    return [{"score": float(s), "keypoints": {n: [round(float(x), 2), round(float(y), 2), round(float(v), 4)]
                                              for n, (x, y, v) in zip(names, p[:, :3])},
             "tags": [[round(float(t), 4) for t in row] for row in p[:, 3:]]} for p, s in zip(people, scores)]


def main(args):
    _, device, model, info = load_for_inference(args)
    layout = get_layout(args.layout)
    config = preset(args.preset, input_size=args.input_size or info["input_size"])
    inputs = args.inputs
    if not inputs:
        from common.synthetic import ensure_dataset
        inputs = [str(ensure_dataset("multi_person", args.out) / "images" / "val")]
    out_dir = output_dirs("higher_hrnet", args.run_name or f"infer-{time.strftime('%Y%m%d-%H%M%S')}", args.out)["outputs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions, unreadable = {}, []
    for source in map(Path, inputs):
        is_video = source.suffix.lower() in VIDEO_SUFFIXES
        video = VideoWriter(out_dir / f"{source.stem}_pose.mp4", video_properties(source)[0]) if is_video else None
        try:
            for name, image, path, frame in iter_inputs(source, args.max_images, unreadable, detail=True):
                people, scores, pose, heatmaps, center, box = run_image(model, image, config, layout,
                                                                        args.threshold, device)
                if video is not None:  # a video keeps one list of people per frame under its own path
                    video.write(pose)
                    predictions.setdefault(str(path), []).append(to_json(people, scores, layout.names))
                    continue
                cv2.imwrite(str(out_dir / f"{name}_pose.jpg"), pose[:, :, ::-1])
                cv2.imwrite(str(out_dir / f"{name}_heatmaps.jpg"),
                            heatmaps_on_image(image, heatmaps, center, box)[:, :, ::-1])
                cv2.imwrite(str(out_dir / f"{name}_tags.png"),
                            draw_tag_plot(people, layout.names, args.threshold)[:, :, ::-1])
                predictions[str(path)] = to_json(people, scores, layout.names)
                print(f"{path}: {len(people)} people")
            if video is not None:
                print(f"{source}: {len(predictions.get(str(source), []))} frames")
        except BadImageError as error:  # a video that cannot be opened; the other inputs go on
            print(f"error: {error}", file=sys.stderr)
            unreadable.append(str(error))
        if video is not None:
            video.close()
    (out_dir / "predictions.json").write_text(json.dumps(predictions, indent=1))
    if unreadable:
        print(f"{len(unreadable)} input(s) could not be read")
    print(f"outputs: {out_dir}")
    return 1 if unreadable and not predictions else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="images, folders or videos (default: built-in val images)")
    parser.add_argument("--checkpoint", default=None, help="weights (default: newest higher_hrnet checkpoint)")
    parser.add_argument("--preset", default="official", choices=sorted(PRESETS), help="test settings (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=None, help="short side (default: the checkpoint's training size)")
    parser.add_argument("--threshold", type=float, default=0.1, help="draw joints scoring above this (default: %(default)s)")
    parser.add_argument("--layout", default="coco17", help="keypoint layout (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=8, help="at most this many images from folders (default: %(default)s; 0 = all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=None, help="output root (default: $POSE_OUTPUT_ROOT, else .)")
    parser.add_argument("--run-name", default=None, help="output folder name (default: infer-<timestamp>)")
    add_plain_network_arg(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main, parse_args()))
