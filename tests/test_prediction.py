"""The prediction API every folder shares (common/prediction.py): Person, BGR-or-path input, the input loop
over images, folders and videos, and the predictions.json schema every infer.py writes."""
import json

import cv2
import numpy as np
import pytest

from common.keypoints import COCO17
from common.drawing import draw_people
from common.prediction import Predictor, VideoWriter, iter_inputs, make_person, run_inference


class CenterPredictor(Predictor):
    """One 'person' whose keypoints all sit at the image center, scored by the image's mean red."""
    model_name = "center"
    layout = COCO17

    def predict(self, image_rgb):
        h, w = image_rgb.shape[:2]
        keypoints = np.tile([[w / 2, h / 2]], (17, 1))
        scores = np.linspace(0, 1, 17)
        return [make_person(keypoints, scores, image_rgb[..., 0].mean() / 255)]


def test_person_box_json_and_bgr_or_path_input(tmp_path):
    person = make_person([[10, 20], [30, 5], [0, 0]], [0.5, 0.9, 0.0], 0.7, visible=np.array([True, False, True]))
    assert person.box == (10.0, 5.0, 20.0, 15.0)     # the keypoints with a positive score only
    entry = person.to_json()
    assert entry["keypoints"][1] == [30.0, 5.0, 0.9] and entry["score"] == 0.7
    assert entry["extra"] == {"visible": [True, False, True]}
    bgr = np.zeros((4, 6, 3), np.uint8)
    bgr[..., 2] = 200                                  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    [from_array] = CenterPredictor()(bgr)
    [from_path] = CenterPredictor()(tmp_path / "red.png")
    assert from_array.score == from_path.score == pytest.approx(200 / 255)
    [from_gray] = CenterPredictor()(np.zeros((4, 6), np.uint8))
    assert from_gray.keypoints[0].tolist() == [3.0, 2.0]


def test_iter_inputs_image_folder_and_video(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    (folder / "3.png").write_bytes(b"")  # bad: one error line, the others continue
    errors = []
    names = [name for name, _, _, _ in iter_inputs(folder, errors=errors)]
    assert names == ["0", "1", "2"] and len(errors) == 1 and "3.png" in errors[0]
    assert capsys.readouterr().err.count("error: ") == 1
    assert [name for name, _, _, _ in iter_inputs(folder, limit=2)] == ["0", "1"]
    assert [(p.name, f) for _, _, p, f in iter_inputs(folder / "1.png")] == [("1.png", None)]
    writer = VideoWriter(tmp_path / "clip.mp4", fps=12)
    for i in range(10):
        writer.write(np.full((32, 48, 3), 20 * i, np.uint8))
    writer.close()
    frames = list(iter_inputs(tmp_path / "clip.mp4", limit=2))     # a video is never cut short
    assert [f for _, _, _, f in frames] == list(range(10)) and frames[0][1].shape == (32, 48, 3)
    assert cv2.VideoCapture(str(tmp_path / "clip.mp4")).get(cv2.CAP_PROP_FPS) == 12.0


def test_run_inference_writes_drawings_and_one_json_schema(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((20, 30, 3), 100, np.uint8))
    (folder / "b.png").write_bytes(b"")
    writer = VideoWriter(tmp_path / "clip.mp4", fps=5)
    for _ in range(3):
        writer.write(np.zeros((16, 16, 3), np.uint8))
    writer.close()
    out = tmp_path / "out"
    def draw(image, people):
        return {"pose": draw_people(image, [p.as_array() for p in people], COCO17.skeleton)}

    status = run_inference(CenterPredictor(), [folder, tmp_path / "clip.mp4", tmp_path / "missing.jpg"], out, "c.pt",
                           draw)
    err = capsys.readouterr().err
    assert status == 0 and "missing.jpg: no such file" in err
    assert "clip.mp4:   0%|          | 0/3 [" in err      # progress per input, of a video's frame count
    assert sorted(p.name for p in out.iterdir()) == ["a_pose.jpg", "clip_pose.mp4", "predictions.json"]
    assert cv2.VideoCapture(str(out / "clip_pose.mp4")).get(cv2.CAP_PROP_FPS) == 5.0     # the input's frame rate
    document = json.loads((out / "predictions.json").read_text())
    assert (document["model"], document["checkpoint"]) == ("center", "c.pt")
    assert document["keypoint_names"] == list(COCO17.names) and len(document["skeleton"]) == len(COCO17.skeleton)
    files = [(r["file"].rsplit("/", 1)[-1], r["frame"], r["width"], r["height"]) for r in document["images"]]
    assert files == [("a.png", None, 30, 20)] + [("clip.mp4", i, 16, 16) for i in range(3)]
    [person] = document["images"][0]["people"]
    assert person["keypoints"][16] == [15.0, 10.0, 1.0] and person["box"] == [15.0, 10.0, 0.0, 0.0]
    assert run_inference(CenterPredictor(), [folder / "b.png"], tmp_path / "none", "c.pt", draw) == 1   # none read
    assert "no input could be read; nothing written" in capsys.readouterr().err and not (tmp_path / "none").exists()
    (tmp_path / "empty").mkdir()
    assert run_inference(CenterPredictor(), [tmp_path / "empty"], tmp_path / "none", "c.pt", draw) == 1
    assert f"no images found in {tmp_path / 'empty'}" in capsys.readouterr().err and not (tmp_path / "none").exists()
    # a second run never replaces the first one's results: it gets a folder of its own
    assert run_inference(CenterPredictor(), [folder / "a.png"], out, "c.pt", draw) == 0
    assert (out / "clip_pose.mp4").is_file() and len(json.loads((out / "predictions.json").read_text())["images"]) == 4
    assert [r["file"] for r in json.loads((tmp_path / "out-2" / "predictions.json").read_text())["images"]] == [
        str(folder / "a.png")]
