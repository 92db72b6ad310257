"""Checkpoints written before the checkpoint contract (tests/_old_checkpoints.py) still load: today's
Predictor.from_checkpoint rebuilds the same network, and gives the numbers the old code gave."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _old_checkpoints as old  # noqa: E402


def rebuilt(folder, tmp_path):
    fixture = old.load_fixture(folder)
    return fixture, old.rebuild(fixture, tmp_path / f"{folder}.pt")


def assert_close(actual, expected, atol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.allclose(actual, expected, atol=atol, rtol=1e-4), \
        np.abs(actual - expected).max()


def test_pose_spi(tmp_path):
    from pose_spi.infer import Predictor

    fixture, path = rebuilt("pose_spi", tmp_path)
    predictor = Predictor.from_checkpoint(path)
    with torch.no_grad():
        assert_close(predictor.model(old.stand_in_input((2, 1, 64, 64))), fixture["forward"][0])
    image = old.stand_in_image(80, 60)
    [person] = predictor(image[:, :, ::-1])     # BGR in, as cv2.imread gives it
    expected = fixture["prediction"]["keypoints"]
    assert_close(person.keypoints, expected[:, :2])
    assert_close(person.scores, expected[:, 2])
    assert predictor.layout.name == "pose_spi13"


def test_simple_baseline(tmp_path):
    from simple_baseline.infer import Predictor

    fixture, path = rebuilt("simple_baseline", tmp_path)
    predictor = Predictor.from_checkpoint(path)
    with torch.no_grad():
        assert_close(predictor.model(old.stand_in_input((1, 3, 128, 96))), fixture["forward"][0])
    image = old.stand_in_image(150, 100)
    for box, expected in ((None, fixture["prediction"]["keypoints"]),
                          ((10, 20, 60, 100), fixture["prediction"]["keypoints_box"])):
        [person] = Predictor.from_checkpoint(path, box=box)(image[:, :, ::-1])
        assert_close(person.keypoints, expected[:, :2])
        assert_close(person.scores, expected[:, 2])
    assert predictor.codec.sigma == 1.5 and predictor.codec.heatmap_size == (24, 32)


def test_cpm_animal(tmp_path):
    from cpm_animal.infer import Predictor

    fixture, path = rebuilt("cpm_animal", tmp_path)
    predictor = Predictor.from_checkpoint(path)
    with torch.no_grad():
        assert_close(predictor.model(old.stand_in_input((1, 3, 96, 96))), fixture["forward"][0])
    [animal] = predictor(old.stand_in_image(120, 160)[:, :, ::-1])
    expected = fixture["prediction"]
    assert_close(animal.keypoints, expected["keypoints"][:, :2])
    assert_close(animal.scores, expected["keypoints"][:, 2])
    assert np.array_equal(animal.extra["visible"], expected["visible"].numpy())
    assert predictor.layout.name == "cat16"


def test_higher_hrnet(tmp_path):
    from higher_hrnet.infer import Predictor

    fixture, path = rebuilt("higher_hrnet", tmp_path)
    predictor = Predictor.from_checkpoint(path)
    with torch.no_grad():
        for output, expected in zip(predictor.model(old.stand_in_input((1, 3, 64, 64))), fixture["forward"]):
            assert_close(output, expected, atol=1e-4)
    people = predictor(old.stand_in_image(64, 96)[:, :, ::-1])
    expected = fixture["prediction"]
    assert_close([p.score for p in people], expected["scores"], atol=1e-4)
    arrays = np.stack([np.concatenate([p.as_array(), p.extra["tags"]], 1) for p in people[:20]])
    assert_close(arrays, expected["people"], atol=1e-3)
    assert predictor.config.input_size == 256 and predictor.layout.name == "coco17"


def test_rtpe(tmp_path):
    from common.runs import model_from_checkpoint
    from rtpe.infer import Predictor
    from rtpe.model import MODEL_NAME, build_model, upgrade_checkpoint

    fixture, path = rebuilt("rtpe", tmp_path)
    assert any(k.startswith("colour_branch.") for k in fixture["shapes"])   # the old weight names
    model, _ = model_from_checkpoint(path, build_model, MODEL_NAME, upgrade_checkpoint)
    with torch.no_grad():
        for output, expected in zip(model(old.stand_in_input((1, 3, 64, 96))), fixture["forward"]):
            assert_close(output, expected)
    predictor = Predictor.from_checkpoint(path)
    keypoints, scores, segmentation = predictor.run(old.stand_in_image(128, 160))
    expected = fixture["prediction"]
    assert_close(keypoints, expected["keypoints"])
    assert_close(scores, expected["scores"])
    assert_close(segmentation, expected["segmentation"], atol=1e-4)
    assert predictor.model.size == "light" and predictor.model.color == "lab" and predictor.input_size == 256
