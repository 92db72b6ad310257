"""The prediction API every folder offers, and the input loop every infer.py runs.

    predictor = Predictor.from_checkpoint("checkpoints/<model>/<run>/best.pt", device="cpu")  # the folder's class
    people = predictor(cv2.imread("photo.jpg"))      # or predictor("photo.jpg"): list[Person], image pixels
Every infer.py writes the people it finds to predictions.json in one schema (see the top README).
"""
from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from common.data import BadImageError, read_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


@dataclass
class Person:
    """One person (or animal) found in an image, in that image's pixels."""
    keypoints: np.ndarray            # (K, 2) float32: x, y
    scores: np.ndarray               # (K,) float32: per-keypoint confidence
    score: float                     # the person's score (ranks detections, as COCO results do)
    box: tuple                       # (x, y, w, h) around its keypoints with a positive score
    extra: dict = field(default_factory=dict)   # per-keypoint values one folder adds: cpm "visible", ...

    def as_array(self) -> np.ndarray:
        """(K, 3) x, y, score: what the drawing functions and COCO results take."""
        return np.concatenate([self.keypoints, self.scores[:, None]], 1).astype(np.float32)

    def to_json(self) -> dict:
        entry = {"score": round(float(self.score), 5), "box": [round(float(v), 2) for v in self.box],
                 "keypoints": [[round(float(x), 2), round(float(y), 2), round(float(s), 5)]
                               for (x, y), s in zip(self.keypoints, self.scores)]}
        if self.extra:
            entry["extra"] = {k: np.round(np.asarray(v, np.float64), 5).tolist() if np.asarray(v).dtype.kind == "f"
                              else np.asarray(v).tolist() for k, v in self.extra.items()}
        return entry


def make_person(keypoints, scores, score, **extra) -> Person:
    """A Person whose box is the extent of its keypoints with a positive score (of all, when none has one)."""
    keypoints = np.asarray(keypoints, np.float32)[:, :2]
    scores = np.asarray(scores, np.float32)
    seen = keypoints[scores > 0] if (scores > 0).any() else keypoints
    low, high = seen.min(0), seen.max(0)
    return Person(keypoints, scores, float(score), (*map(float, low), *map(float, high - low)), extra)


class Predictor:
    """image (BGR uint8 as cv2.imread gives it, or a path) -> list[Person]. Each folder subclasses it with
    `from_checkpoint(path, device)` and `predict(image_rgb)`; `layout` names the keypoints it returns."""
    model_name = ""
    layout = None

    def __call__(self, image) -> list[Person]:
        if isinstance(image, (str, Path)):
            return self.predict(read_image(image))     # decoded by content, always RGB
        image = np.asarray(image)
        return self.predict(cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB))

    def predict(self, image_rgb) -> list[Person]:
        raise NotImplementedError


def iter_inputs(source, limit=None, errors=None):
    """Yield (name, RGB uint8 image, file, frame index or None) for an image file, a folder of images
    (sorted) or a video's frames. An unreadable image prints one error line naming the file (also appended
    to `errors` when that is a list) and the others continue. `limit` keeps a folder's first N files."""
    source = Path(source)
    if source.suffix.lower() in VIDEO_SUFFIXES:
        capture = cv2.VideoCapture(str(source))
        if not capture.isOpened():
            raise BadImageError(f"{source}: cannot open video")
        for index in itertools.count():
            ok, frame = capture.read()
            if not ok:
                break
            yield f"{source.stem}_{index:06d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), source, index
        capture.release()
        return
    paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() else [source]
    for path in paths[:limit or None]:
        try:
            image = read_image(path)
        except BadImageError as error:
            print(f"error: {error}", file=sys.stderr)
            if errors is not None:
                errors.append(str(error))
            continue
        yield path.stem, image, path, None


class VideoWriter:
    """mp4 writer of RGB frames, opened at the first frame's size."""

    def __init__(self, path, fps=25.0):
        self.path, self.fps, self.writer = Path(path), fps, None

    def write(self, rgb):
        if self.writer is None:
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, rgb.shape[1::-1])
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self):
        if self.writer is not None:
            self.writer.release()


def fresh_folder(out_dir) -> Path:
    """out_dir, created; when an earlier run wrote to it, the first free `<out_dir>-2`, `-3` ... instead."""
    base, number = Path(out_dir), 1
    out_dir = base
    while out_dir.is_dir() and any(out_dir.iterdir()):
        number += 1
        out_dir = base.with_name(f"{base.name}-{number}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def run_inference(predictor: Predictor, sources, out_dir, checkpoint, draw, limit=None) -> int:
    """Predict every image (or frame) of `sources`; write <name>_<picture>.jpg per image (an mp4 per video) and
    predictions.json (the schema in the top README). draw(image, people) -> {picture name: RGB image} (video:
    the first one). A folder an earlier run wrote to is left alone: this run takes `<out_dir>-2`, `-3` ...
    Returns the exit status: 1 (and no predictions.json) when no image was found or none could be read."""
    out_dir = fresh_folder(out_dir)
    records, errors = [], []
    for source in map(Path, sources):
        video = None
        try:
            if not source.exists():
                raise BadImageError(f"{source}: no such file or folder")
            frames = None
            if source.suffix.lower() in VIDEO_SUFFIXES:     # the drawn video keeps the input's frame rate
                capture = cv2.VideoCapture(str(source))
                video = VideoWriter(out_dir / f"{source.stem}_pose.mp4", capture.get(cv2.CAP_PROP_FPS) or 25.0)
                frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
                capture.release()
            for name, image, path, frame in tqdm(iter_inputs(source, limit, errors), desc=source.name, total=frames,
                                                 unit="frame" if video else "image", dynamic_ncols=True, leave=False,
                                                 disable=not (video or source.is_dir())):
                people = predictor.predict(image)
                pictures = draw(image, people)
                if video is not None:
                    video.write(next(iter(pictures.values())))
                for kind, picture in ({} if video else pictures).items():
                    cv2.imwrite(str(out_dir / f"{name}_{kind}.jpg"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                records.append({"file": str(path), "frame": frame, "width": image.shape[1], "height": image.shape[0],
                                "people": [person.to_json() for person in people]})
        except BadImageError as error:   # a missing input or a video that cannot be opened; the others go on
            print(f"error: {error}", file=sys.stderr)
            errors.append(str(error))
        if video is not None:
            video.close()
    if not records:
        out_dir.rmdir()
        print(f"error: {'no input could be read' if errors else 'no images found in ' + ', '.join(map(str, sources))}"
              f"; nothing written", file=sys.stderr)
        return 1
    document = {"model": predictor.model_name, "checkpoint": str(checkpoint),
                "keypoint_names": list(predictor.layout.names),
                "skeleton": [list(edge) for edge in predictor.layout.skeleton], "images": records}
    (out_dir / "predictions.json").write_text(json.dumps(document, indent=1))
    print(f"{len(records)} images or frames, {sum(len(r['people']) for r in records)} people"
          f"{f', {len(errors)} inputs unreadable' if errors else ''}; drawings and predictions.json in {out_dir}")
    return 0
