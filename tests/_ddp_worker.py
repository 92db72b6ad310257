"""A tiny model, data set and loss for the training-loop tests, and a script torchrun runs.

`torchrun --nproc_per_node=2 tests/_ddp_worker.py --out DIR --device cpu ...` trains through
common.engine.fit and writes each rank's final weights to DIR/rank<r>.pt for the test to compare; with --scenes N
it first renders built-in data as the train.py scripts do.
"""
import argparse
import sys

import numpy as np
import torch
from torch import nn

from common.engine import fit
from common.runs import add_common_args, local_main_first, output_root, setup_device_and_distributed
from higher_hrnet.scenes import ensure_scenes

ARCH = {"dim": 8}   # tiny_model(**ARCH)


class NoisyRegression(torch.utils.data.Dataset):
    """64 fixed inputs; every read adds random augmentation from np.random and torch (like real crops)."""

    def __init__(self, size=64, dim=8):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(size, dim, generator=g)
        self.y = self.x.sum(1, keepdim=True) * 0.5

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        jitter = torch.from_numpy(np.random.normal(0, 0.05, self.x.shape[1]).astype(np.float32))
        scale = 1.0 + 0.1 * torch.rand(1)
        return {"x": self.x[i] * scale + jitter, "y": self.y[i] * scale}


def tiny_model(dim=8):
    # BatchNorm exercises SyncBatchNorm under torchrun, Dropout the restored torch RNG on resume.
    return nn.Sequential(nn.Linear(dim, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def mse_loss(model, batch):
    loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
    return loss, {"mse": float(loss.detach())}


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser, epochs=2, batch_size=8, lr=0.05, workers=0, val_every="0", log_every=2)
    parser.add_argument("--scenes", type=int, default=0, help="first render this many built-in scenes, as train.py "
                                                              "scripts do (each machine's local rank 0 first)")
    return parser


def build(args):
    """Device/distributed setup first (it seeds), then model, optimizer and a per-step schedule."""
    setup_device_and_distributed(args)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    return model, optimizer, scheduler


def main(argv=None):
    args = make_parser().parse_args(argv)
    model, optimizer, scheduler = build(args)
    if args.scenes:
        with local_main_first(args):
            scenes = ensure_scenes(args.out, num_images=args.scenes, num_val=1, image_size=64)
        if len(list((scenes / "images" / "train").iterdir())) != args.scenes:
            raise SystemExit(f"rank {args.rank}: the built-in scenes are missing from {scenes}")
    model, summary = fit(args, model, NoisyRegression(), mse_loss, optimizer, scheduler=scheduler,
                         scheduler_interval="step", model_name="tiny", arch=ARCH, settings={})
    torch.save(model.state_dict(), output_root(args.out) / f"rank{args.rank}.pt")
    print(f"rank {args.rank}: {summary['steps']} steps")


if __name__ == "__main__":
    sys.exit(main())
