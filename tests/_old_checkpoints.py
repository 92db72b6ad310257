"""Checkpoints written by the code before the checkpoint contract (issue 18), kept so that they keep loading.

tests/data/old_checkpoints/<folder>.pt holds what that code's `train.py --max-steps 2` wrote, minus the
weights and the optimizer state (too large for the repository): every other key as written, the weight
names with their shapes and dtypes, and what the old code computed from deterministic stand-in weights
(`stand_in_weights`): the network's output on `stand_in_input`, and its predictions on `stand_in_image`.
A test rebuilds the checkpoint with the same stand-in weights and checks that today's loader gives the
same numbers. higher_hrnet's predictions were recomputed by that same loader at commit 98ceba8, whose test
pipeline (issue 17: official float64 resize, munkres 1.1.4 tie-breaking) is today's.
"""
from pathlib import Path

import cv2
import numpy as np
import torch

FOLDER = Path(__file__).parent / "data" / "old_checkpoints"


def stand_in_weights(shapes, seed=0):
    """Deterministic weights for {name: (shape, dtype name)}: fan-in scaled uniform for kernels, norm
    weights near 1, positive running variances, zero counters."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        shape, dtype = shapes[name]
        dtype = getattr(torch, dtype.removeprefix("torch."))
        uniform = lambda low, high: low + (high - low) * torch.rand(shape, generator=generator)
        if not dtype.is_floating_point:
            weights[name] = torch.zeros(shape, dtype=dtype)
        elif name.endswith("running_var"):
            weights[name] = uniform(0.5, 1.5)
        elif name.endswith("running_mean"):
            weights[name] = uniform(-0.1, 0.1)
        elif len(shape) >= 2:
            bound = (int(np.prod(shape)) // shape[0]) ** -0.5
            weights[name] = uniform(-bound, bound)
        elif name.endswith("weight"):
            weights[name] = uniform(0.9, 1.1)
        else:
            weights[name] = uniform(-0.1, 0.1)
    return weights


def stand_in_input(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def stand_in_image(height, width, seed=2):
    """A smooth random RGB uint8 image (blurred noise, so decoders see blobs rather than pixel noise)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (max(height // 8, 2), max(width // 8, 2), 3)).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def rebuild(fixture, path):
    """Write the old checkpoint (stand-in weights) to `path`; returns path."""
    checkpoint = dict(fixture["checkpoint"])
    checkpoint["model"] = stand_in_weights(fixture["shapes"])
    torch.save(checkpoint, path)
    return path


def load_fixture(folder):
    return torch.load(FOLDER / f"{folder}.pt", weights_only=True)
