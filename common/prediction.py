"""The prediction API every folder offers, and the input loop every infer.py runs.

    predictor = Predictor.from_checkpoint("checkpoints/<model>/<run>/best.pt", device="cpu")  # the folder's class
    people = predictor(cv2.imread("photo.jpg"))      # or predictor("photo.jpg"): list[Person], image pixels
Every infer.py writes the people it finds to predictions.json in one schema (see the top README).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from common.data import BadImageError, read_image
from common.drawing import draw_people

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
        return self.predict(as_rgb(image))

    def predict(self, image_rgb) -> list[Person]:
        raise NotImplementedError


def as_rgb(image) -> np.ndarray:
    """A path (decoded by content) or a BGR / grayscale uint8 array -> RGB uint8 (H, W, 3)."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    image = np.asarray(image)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB)


# --- Inputs: an image, a folder of images or a video --------------------------------------------------------

def iter_inputs(source, limit=None, errors=None):
    """Yield (name, RGB uint8 image, file, frame index or None) for an image file, a folder of images
    (sorted) or a video's frames. An unreadable image prints one error line naming the file (also appended
    to `errors` when that is a list) and the others continue. `limit` keeps a folder's first N files."""
    source = Path(source)
    if source.suffix.lower() in VIDEO_SUFFIXES:
        capture = cv2.VideoCapture(str(source))
        if not capture.isOpened():
            raise BadImageError(f"{source}: cannot open video")
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            yield f"{source.stem}_{index:06d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), source, index
            index += 1
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


def video_properties(source):
    """(frames per second, frame count) of a video file, for writing an output of the same length."""
    capture = cv2.VideoCapture(str(source))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    return fps, count


class VideoWriter:
    """mp4 writer taking RGB frames; opened lazily at the first frame's size."""

    def __init__(self, path, fps=25.0):
        self.path, self.fps, self.writer = Path(path), fps, None

    def write(self, rgb):
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                          (rgb.shape[1], rgb.shape[0]))
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self):
        if self.writer is not None:
            self.writer.release()


# --- The loop every infer.py runs ---------------------------------------------------------------------------

def draw_skeletons(predictor, threshold=0.0):
    """The default drawing: each person's skeleton in its own color, joints scoring above `threshold`."""
    def draw(image, people):
        return {"pose": draw_people(image, [p.as_array() for p in people], predictor.layout.skeleton, threshold)}
    return draw


def run_inference(predictor: Predictor, sources, out_dir, checkpoint, draw=None, limit=None) -> int:
    """Predict every image (or frame) of `sources`; write <name>_<picture>.jpg per image (an mp4 per video)
    and predictions.json. draw(image, people) -> {picture name: RGB image} (video: the first one).
    Returns the exit status: 1 when nothing could be read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw = draw or draw_skeletons(predictor)
    records, errors = [], []
    for source in map(Path, sources):
        if not source.exists():
            print(f"error: {source}: no such file or folder", file=sys.stderr)
            errors.append(str(source))
            continue
        video = VideoWriter(out_dir / f"{source.stem}_pose.mp4", video_properties(source)[0]) \
            if source.suffix.lower() in VIDEO_SUFFIXES else None
        try:
            for name, image, path, frame in iter_inputs(source, limit, errors):
                people = predictor.predict(image)
                pictures = draw(image, people)
                if video is not None:
                    video.write(next(iter(pictures.values())))
                for kind, picture in ({} if video else pictures).items():
                    cv2.imwrite(str(out_dir / f"{name}_{kind}.jpg"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                records.append({"file": str(path), "frame": frame, "width": image.shape[1], "height": image.shape[0],
                                "people": [person.to_json() for person in people]})
        except BadImageError as error:   # a video that cannot be opened; the other inputs go on
            print(f"error: {error}", file=sys.stderr)
            errors.append(str(error))
        if video is not None:
            video.close()
    write_predictions(out_dir / "predictions.json", predictor, checkpoint, records)
    print(f"{len(records)} images or frames, {sum(len(r['people']) for r in records)} people"
          f"{f', {len(errors)} inputs unreadable' if errors else ''}; drawings and predictions.json in {out_dir}")
    return 1 if errors and not records else 0


def write_predictions(path, predictor: Predictor, checkpoint, records) -> Path:
    """predictions.json: the model, its keypoint names and skeleton, then one record per image or frame."""
    layout = predictor.layout
    document = {"model": predictor.model_name, "checkpoint": str(checkpoint), "keypoint_names": list(layout.names),
                "skeleton": [list(edge) for edge in layout.skeleton], "images": records}
    Path(path).write_text(json.dumps(document, indent=1))
    return Path(path)
