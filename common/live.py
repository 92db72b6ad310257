"""Live input for infer.py (--camera N, --live URL_OR_VIDEO): each frame is processed as it arrives, the newest
first; frames that arrive while the model is busy are dropped and counted, never queued. Writes live_pose.mp4 (one
frame per processed frame, skeletons and running FPS drawn) and live.jsonl (one line of people per processed frame).
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path

import cv2

from common.data import BadImageError
from common.prediction import VIDEO_SUFFIXES, VideoWriter, fresh_folder


class Clock:
    """Real time; the tests pass a simulated one with the same two methods."""
    now = staticmethod(time.perf_counter)
    sleep = staticmethod(time.sleep)


class VideoFileSource:
    """A video file standing in for a camera: frame i arrives i / fps seconds after the first read."""

    def __init__(self, path, clock=None):
        self.capture, self.clock = cv2.VideoCapture(str(path)), clock or Clock()
        if not self.capture.isOpened():
            raise BadImageError(f"{path}: cannot open video")
        self.fps = self.capture.get(cv2.CAP_PROP_FPS) or 25.0
        self.next_index, self.dropped, self.start = 0, 0, None

    def read(self):
        """(index, RGB frame) of the newest frame that has arrived, or None at the end."""
        now = self.clock.now()
        self.start = now if self.start is None else self.start
        newest = int((now - self.start) * self.fps)
        if newest < self.next_index:        # faster than the frame rate: wait for the next frame
            self.clock.sleep(self.next_index / self.fps - (now - self.start))
        while self.next_index < newest:     # arrived while the model was busy: skipped unread
            if not self.capture.grab():
                return None
            self.next_index += 1
            self.dropped += 1
        ok, frame = self.capture.read()
        if not ok:
            return None
        self.next_index += 1
        return self.next_index - 1, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self):
        self.capture.release()


class CameraSource:
    """A camera index or a stream URL: a thread reads every frame and keeps only the newest."""

    def __init__(self, source):
        self.capture = cv2.VideoCapture(source)
        if not self.capture.isOpened():
            raise BadImageError(f"{'camera ' if isinstance(source, int) else ''}{source}: cannot open it")
        self.fps = self.capture.get(cv2.CAP_PROP_FPS) or 30.0
        self.dropped, self.newest, self.ended = 0, None, False
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read_all, daemon=True)
        self.reader.start()

    def _read_all(self):
        index = 0
        while not self.ended:
            ok, frame = self.capture.read()
            with self.changed:
                if not ok:
                    self.ended = True
                elif self.newest is not None:
                    self.dropped += 1
                self.newest = (index, frame) if ok else self.newest
                self.changed.notify()
            index += 1

    def read(self):
        with self.changed:
            self.changed.wait_for(lambda: self.newest is not None or self.ended)
            if self.newest is None:
                return None
            (index, frame), self.newest = self.newest, None
        return index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self):
        self.ended = True
        self.reader.join(timeout=5)     # the reader's last read returns before the capture is released
        self.capture.release()


def open_live_source(camera=None, live=None, clock=None):
    """--camera N (an OpenCV camera index) or --live: a video file (paced at its frame rate) or a stream URL."""
    if camera is not None:
        return CameraSource(camera)
    if Path(live).suffix.lower() in VIDEO_SUFFIXES and "://" not in live:
        if not Path(live).is_file():
            raise BadImageError(f"{live}: no such file")
        return VideoFileSource(live, clock)
    return CameraSource(live)


def can_show() -> bool:
    """Whether this OpenCV can open a window (opencv-python-headless cannot)."""
    try:
        cv2.namedWindow("posezoo")
        cv2.destroyWindow("posezoo")
        return True
    except cv2.error:
        return False


def run_live(predictor, source, out_dir, draw, show=False, clock=None) -> int:
    """Predict frames of `source` until it ends (or Ctrl-C, or q in the window); returns the exit status (1 when
    no frame came)."""
    clock = clock or Clock()
    if show and not can_show():
        print("--show: this OpenCV has no GUI support (opencv-python-headless); writing files only")
        show = False
    out_dir = fresh_folder(out_dir)      # an earlier run's files stay: this one takes <out_dir>-2 ...
    video, finished, processed, fps = VideoWriter(out_dir / "live_pose.mp4", source.fps), deque(maxlen=30), 0, 0.0
    try:
        with open(out_dir / "live.jsonl", "w") as lines:
            while (item := source.read()) is not None:
                index, image = item
                people = predictor.predict(image)
                finished.append(clock.now())
                fps = (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 else 0.0
                picture = next(iter(draw(image, people).values())).copy()
                for color, thickness in (((0, 0, 0), 3), ((255, 255, 0), 1)):   # outlined: readable on any image
                    cv2.putText(picture, f"{fps:.1f} FPS, {source.dropped} dropped", (8, 20),
                                cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, thickness, cv2.LINE_AA)
                video.write(picture)
                lines.write(json.dumps({"frame": index, "dropped": source.dropped, "fps": round(fps, 2),
                                        "people": [person.to_json() for person in people]}) + "\n")
                processed += 1
                if show:
                    cv2.imshow("posezoo", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        break
    except KeyboardInterrupt:
        pass
    finally:
        video.close()
        source.close()
    print(f"{processed} frames processed, {source.dropped} dropped while the model was busy, {fps:.1f} FPS at the "
          f"end; live_pose.mp4 and live.jsonl in {out_dir}")
    return 0 if processed else 1
