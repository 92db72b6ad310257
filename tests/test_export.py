"""ONNX export of every folder (issue 20): `<folder>/export.py` on a small checkpoint of each, onnxruntime within
1e-4 of torch on random and real inputs, BatchNorm folded, and `infer.py --backend onnxruntime` giving the
people torch gives. Real images come from ../shared/data when present (a smooth random image otherwise).
Skips without the optional extra (pip install -e .[onnx]; CI installs it)."""
import importlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import _old_checkpoints as old
from common.export import export_parser, use_backend

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_IMAGES = {"pose_spi": ["pose_spi_toy/images/train2017/im001.png", "pose_spi_toy/images/train2017/im002.png"],
               "simple_baseline": ["coco_sample/000000000785.jpg"],
               "cpm_animal": ["cats_akd/train/images/train_00118.jpg", "cats_akd/train/images/train_00068.jpg"],
               "higher_hrnet": ["coco_sample/000000000785.jpg"], "rtpe": ["coco_sample/000000040083.jpg"]}
BOTTOM_UP = {"higher_hrnet", "rtpe"}
# every BatchNorm after a convolution is folded; CPM normalizes the image and each stage's input (a BatchNorm before
# a convolution, which zero padding keeps from folding exactly): this checkpoint has 3 of them
UNFOLDABLE_BATCHNORMS = {"cpm_animal": 3}


def real_images(folder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in REAL_IMAGES[folder]:
        if (SHARED / name).is_file():
            shutil.copy(SHARED / name, images / Path(name).name)
        else:
            cv2.imwrite(str(images / Path(name).name), old.stand_in_image(120, 96))
    return images


@pytest.mark.parametrize("folder", ["pose_spi", "simple_baseline", "cpm_animal", "higher_hrnet", "rtpe"])
def test_export_parity_and_onnxruntime_backend(folder, tmp_path):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    checkpoint = old.rebuild(old.load_fixture(folder), tmp_path / f"{folder}.pt")
    images = real_images(folder, tmp_path)
    export = importlib.import_module(f"{folder}.export")
    args = export_parser("").parse_args(["--checkpoint", str(checkpoint), "--input", str(images), "--frames", "0"])
    assert export.main(args) == 0
    report = json.loads(checkpoint.with_suffix(".export.json").read_text())
    assert report["batchnorm_left"] == UNFOLDABLE_BATCHNORMS.get(folder, 0)
    assert report["dynamic"] == (["batch", "height", "width"] if folder in BOTTOM_UP else ["batch"])
    assert report["real_inputs"] >= 1 and max(report["random_max_abs_diff"], report["real_max_abs_diff"]) <= 1e-4

    predictor_class = importlib.import_module(f"{folder}.infer").Predictor
    image = old.stand_in_image(128, 160)    # the image every folder's old-checkpoint test finds people on
    torch_predictor = predictor_class.from_checkpoint(checkpoint)
    onnx_predictor = use_backend(predictor_class.from_checkpoint(checkpoint), "onnxruntime", checkpoint)
    expected, got = torch_predictor(image), onnx_predictor(image)
    if folder in BOTTOM_UP:   # stand-in weights: no one (rtpe) or hundreds of tied noise people: compare the maps
        maps = lambda predictor: predictor.last_segmentation if folder == "rtpe" else predictor.last_maps[0]
        np.testing.assert_allclose(maps(onnx_predictor), maps(torch_predictor), atol=1e-4)
        return
    [a], [b] = got, expected
    np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-2)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_onnxruntime_backend_without_file_is_one_line(tmp_path):
    checkpoint = old.rebuild(old.load_fixture("simple_baseline"), tmp_path / "sb.pt")
    predictor = importlib.import_module("simple_baseline.infer").Predictor.from_checkpoint(checkpoint)
    with pytest.raises(SystemExit, match="python simple_baseline/export.py --checkpoint"):
        use_backend(predictor, "onnxruntime", checkpoint)
