"""The live path (issue 20): frames arriving faster than the model takes them are dropped and counted, never
queued, under a simulated clock; rtpe/infer.py --live on a video file writes one mp4 frame and one JSON line per
processed frame."""
import importlib
import json
import re
import time

import cv2
import numpy as np
import pytest

import _old_checkpoints as old
from common.live import CameraSource, VideoFileSource, can_show, run_live
from common.prediction import VideoWriter


class SimulatedClock:
    def __init__(self):
        self.time = 0.0

    def now(self):
        return self.time

    def sleep(self, seconds):
        self.time += max(seconds, 0.0)


class SlowPredictor:
    """Takes `cost` simulated seconds per frame and finds no one."""
    def __init__(self, clock, cost):
        self.clock, self.cost = clock, cost

    def predict(self, image):
        self.clock.sleep(self.cost)
        return []


def write_video(path, frames=30, fps=10.0):
    video = VideoWriter(path, fps)
    for index in range(frames):
        video.write(np.full((48, 64, 3), index * 4 % 256, np.uint8))
    video.close()
    return path


@pytest.mark.parametrize("cost, processed", [(0.25, [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]),
                                              (0.05, list(range(30)))])
def test_frames_are_dropped_not_queued(tmp_path, capsys, cost, processed):
    """10 fps in; a model that takes 0.25 s takes the newest frame each time (frame floor(2.5 k) at 0.25 k s) and
    drops the others; one that takes 0.05 s waits for each frame and drops none."""
    video = write_video(tmp_path / "clip.mp4")
    clock = SimulatedClock()
    source = VideoFileSource(video, clock)
    assert run_live(SlowPredictor(clock, cost), source, tmp_path / "out", lambda image, people: {"pose": image},
                    clock=clock) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "live.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == processed
    assert source.dropped == 30 - len(processed)
    assert f"{len(processed)} frames processed, {30 - len(processed)} dropped" in capsys.readouterr().out
    assert lines[-1]["fps"] == pytest.approx(1 / max(cost, 0.1))     # waits for frames when faster than 10 fps
    written = cv2.VideoCapture(str(tmp_path / "out" / "live_pose.mp4"))
    assert int(written.get(cv2.CAP_PROP_FRAME_COUNT)) == len(processed)


def test_a_stream_keeps_only_the_newest_frame(tmp_path, capsys):
    """CameraSource (a camera or stream URL; here a file read as fast as it decodes, as a stream that outpaces the
    model): a reader thread overwrites the frame the model has not taken yet, so each frame is processed or
    counted as dropped, and more arrive than a model taking 20 ms per frame can take."""
    video = write_video(tmp_path / "clip.mp4", frames=60)

    class Busy:
        def predict(self, image):
            time.sleep(0.02)
            return []
    source = CameraSource(str(video))
    assert run_live(Busy(), source, tmp_path / "out", lambda image, people: {"pose": image}) == 0
    frames = [json.loads(line)["frame"] for line in (tmp_path / "out" / "live.jsonl").read_text().splitlines()]
    assert frames == sorted(frames) and len(frames) + source.dropped == 60 and source.dropped > 0


@pytest.mark.parametrize("folder", ["rtpe", "simple_baseline"])
def test_infer_live_on_a_video_file(tmp_path, capsys, folder):
    """Through infer.py's flags, real clock: every frame is processed or dropped; --show on headless OpenCV says so."""
    checkpoint = old.rebuild(old.load_fixture(folder), tmp_path / f"{folder}.pt")
    video = write_video(tmp_path / "clip.mp4", frames=12, fps=25.0)
    infer = importlib.import_module(f"{folder}.infer")
    args = infer.parse_args(["--checkpoint", str(checkpoint), "--live", str(video), "--show",
                             "--out", str(tmp_path), "--run-name", "live"])
    assert infer.main(args) == 0
    out = tmp_path / "outputs" / folder / "live"
    lines = (out / "live.jsonl").read_text().splitlines()
    assert int(cv2.VideoCapture(str(out / "live_pose.mp4")).get(cv2.CAP_PROP_FRAME_COUNT)) == len(lines) >= 1
    printed = capsys.readouterr().out
    processed, dropped = map(int, re.search(r"(\d+) frames processed, (\d+) dropped", printed).groups())
    assert processed == len(lines) and processed + dropped == 12
    assert ("no GUI support" in printed) == (not can_show())
