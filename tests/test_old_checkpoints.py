"""Checkpoints written before the checkpoint contract (tests/_old_checkpoints.py) still load: today's
Predictor.from_checkpoint rebuilds the same network, and gives the numbers the old code gave."""
import sys
from pathlib import Path

import numpy as np
import torch

from common.runs import model_from_checkpoint
from cpm_animal import infer as cpm_animal_infer
from higher_hrnet import infer as higher_hrnet_infer
from pose_spi import infer as pose_spi_infer
from rtpe import infer as rtpe_infer
from rtpe import model as rtpe_model
from simple_baseline import infer as simple_baseline_infer

sys.path.insert(0, str(Path(__file__).parent))
import _old_checkpoints as old  # noqa: E402


def assert_close(actual, expected, atol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.allclose(actual, expected, atol=atol, rtol=1e-4), \
        np.abs(actual - expected).max()


def loaded(folder, infer_module, tmp_path, input_shape, atol=1e-5):
    """(fixture, checkpoint path, predictor) of a folder's old checkpoint, after checking that the rebuilt
    network computes what the old code computed on the same input."""
    fixture = old.load_fixture(folder)
    path = old.rebuild(fixture, tmp_path / f"{folder}.pt")
    predictor = infer_module.Predictor.from_checkpoint(path)
    with torch.no_grad():
        outputs = predictor.model(old.stand_in_input(input_shape))
    for output, expected in zip([outputs] if torch.is_tensor(outputs) else outputs, fixture["forward"]):
        assert_close(output, expected, atol)
    return fixture, path, predictor


def assert_keypoints(person, expected):
    """The person's keypoints and scores equal the old code's (K, 3) x, y, score."""
    assert_close(person.keypoints, expected[:, :2])
    assert_close(person.scores, expected[:, 2])


def test_pose_spi(tmp_path):
    fixture, _, predictor = loaded("pose_spi", pose_spi_infer, tmp_path, (2, 1, 64, 64))
    [person] = predictor(old.stand_in_image(80, 60)[:, :, ::-1])     # BGR in, as cv2.imread gives it
    assert_keypoints(person, fixture["prediction"]["keypoints"])
    assert predictor.layout.name == "pose_spi13"


def test_simple_baseline(tmp_path):
    fixture, path, predictor = loaded("simple_baseline", simple_baseline_infer, tmp_path, (1, 3, 128, 96))
    image = old.stand_in_image(150, 100)
    assert_keypoints(predictor(image[:, :, ::-1])[0], fixture["prediction"]["keypoints"])
    boxed = simple_baseline_infer.Predictor.from_checkpoint(path, box=(10, 20, 60, 100))
    assert_keypoints(boxed(image[:, :, ::-1])[0], fixture["prediction"]["keypoints_box"])
    assert predictor.codec.sigma == 1.5 and predictor.codec.heatmap_size == (24, 32)


def test_cpm_animal(tmp_path):
    fixture, _, predictor = loaded("cpm_animal", cpm_animal_infer, tmp_path, (1, 3, 96, 96))
    [animal] = predictor(old.stand_in_image(120, 160)[:, :, ::-1])
    assert_keypoints(animal, fixture["prediction"]["keypoints"])
    assert np.array_equal(animal.extra["visible"], fixture["prediction"]["visible"].numpy())
    assert predictor.layout.name == "cat16"


def test_higher_hrnet(tmp_path):
    fixture, _, predictor = loaded("higher_hrnet", higher_hrnet_infer, tmp_path, (1, 3, 64, 64), atol=1e-4)
    people = predictor(old.stand_in_image(64, 96)[:, :, ::-1])
    expected = fixture["prediction"]
    assert_close([p.score for p in people], expected["scores"], atol=1e-4)
    arrays = np.stack([np.concatenate([p.as_array(), p.extra["tags"]], 1) for p in people[:20]])
    assert_close(arrays, expected["people"], atol=1e-3)
    assert predictor.config.input_size == 256 and predictor.layout.name == "coco17"


def test_rtpe(tmp_path):
    fixture = old.load_fixture("rtpe")
    path = old.rebuild(fixture, tmp_path / "rtpe.pt")
    assert any(k.startswith("colour_branch.") for k in fixture["shapes"])   # the old weight names
    model, _ = model_from_checkpoint(path, rtpe_model.build_model, rtpe_model.MODEL_NAME, rtpe_model.upgrade_checkpoint)
    with torch.no_grad():   # unfolded: the Predictor folds BatchNorm into the convolutions
        for output, expected in zip(model(old.stand_in_input((1, 3, 64, 96))), fixture["forward"]):
            assert_close(output, expected)
    predictor = rtpe_infer.Predictor.from_checkpoint(path)
    keypoints, scores, segmentation = predictor.run(old.stand_in_image(128, 160))
    expected = fixture["prediction"]
    assert_close(keypoints, expected["keypoints"])
    assert_close(scores, expected["scores"])
    assert_close(segmentation, expected["segmentation"], atol=1e-4)
    assert predictor.model.size == "light" and predictor.model.color == "lab" and predictor.input_size == 256
