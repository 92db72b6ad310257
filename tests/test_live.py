"""The live path (issue 20): frames arriving faster than the model takes them are dropped and counted, never
queued, under a simulated clock; rtpe/infer.py --live on a video file writes one mp4 frame and one JSON line per
processed frame."""
import json

import cv2
import numpy as np
import pytest

import _old_checkpoints as old
from common.live import VideoFileSource, can_show, run_live
from common.prediction import VideoWriter
from rtpe import infer as rtpe_infer


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
        video.write(np.full((48, 64, 3), index * 8, np.uint8))
    video.close()
    return path


@pytest.mark.parametrize("cost, processed", [(0.25, [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]),
                                              (0.05, list(range(30)))])
def test_frames_are_dropped_not_queued(tmp_path, cost, processed):
    """10 fps in; a model that takes 0.25 s takes the newest frame each time (frame floor(2.5 k) at 0.25 k s) and
    drops the others; one that takes 0.05 s waits for each frame and drops none."""
    video = write_video(tmp_path / "clip.mp4")
    clock = SimulatedClock()
    counts = run_live(SlowPredictor(clock, cost), VideoFileSource(video, clock), tmp_path / "out",
                      lambda image, people: {"pose": image}, clock=clock)
    lines = [json.loads(line) for line in (tmp_path / "out" / "live.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == processed
    assert counts["processed"] == len(processed) and counts["dropped"] == 30 - len(processed)
    assert lines[-1]["fps"] == pytest.approx(1 / max(cost, 0.1))     # waits for frames when faster than 10 fps
    written = cv2.VideoCapture(str(tmp_path / "out" / "live_pose.mp4"))
    assert int(written.get(cv2.CAP_PROP_FRAME_COUNT)) == len(processed)


def test_rtpe_live_on_a_video_file(tmp_path, capsys):
    checkpoint = old.rebuild(old.load_fixture("rtpe"), tmp_path / "rtpe.pt")
    video = write_video(tmp_path / "clip.mp4", frames=12, fps=25.0)
    args = rtpe_infer.parse_args(["--checkpoint", str(checkpoint), "--live", str(video), "--show",
                                  "--out", str(tmp_path), "--run-name", "live"])
    assert rtpe_infer.main(args) == 0
    out = tmp_path / "outputs" / "rtpe" / "live"
    lines = (out / "live.jsonl").read_text().splitlines()
    assert int(cv2.VideoCapture(str(out / "live_pose.mp4")).get(cv2.CAP_PROP_FRAME_COUNT)) == len(lines) >= 1
    assert len(lines) + json.loads(lines[-1])["dropped"] == 12
    printed = capsys.readouterr().out
    assert f"{len(lines)} frames processed" in printed
    assert ("no GUI support" in printed) == (not can_show())
