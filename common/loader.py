"""The DataLoader every training loop shares: per-sample seeds, so a run resumed mid-epoch sees exactly the batches
an uninterrupted run would have seen (augmentation depends only on the sample, not on which worker drew it),
and samples whose image cannot be read become a warning and are dropped from their batch.
"""
from __future__ import annotations

import random
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from common.data import BadImageError


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that yields (index, sample seed) pairs and can start mid-epoch."""

    def __init__(self, dataset_len, shuffle=True, seed=0, num_replicas=1, rank=0, drop_last=False):
        super().__init__(range(dataset_len), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start_index = 0

    def set_epoch(self, epoch, start_index=0):
        """Choose the epoch's permutation; skip the first `start_index` samples of this rank."""
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        indices = list(super().__iter__())
        seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(len(indices))
        for position in range(self.start_index, len(indices)):
            yield indices[position], int(seeds[position])

    def __len__(self):
        return self.num_samples - self.start_index


class SeededSamples(Dataset):
    """Seeds random, numpy and torch from the sample's seed, then reads it; an unreadable image gives None."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, sample_seed = item if isinstance(item, tuple) else (item, item)
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        torch.manual_seed(sample_seed)
        try:
            return self.dataset[index]
        except BadImageError as error:
            warnings.warn(f"skipping sample {index}: {error}", stacklevel=1)
            return None


def collate_skip_bad(samples, collate=default_collate):
    """Collate the good samples; batch["num_skipped"] counts the dropped (None) ones (a batch of bad samples
    only holds nothing else, and the training loop skips it)."""
    good = [s for s in samples if s is not None]
    batch = collate(good) if good else {}
    batch["num_skipped"] = len(samples) - len(good)
    return batch


def make_loader(dataset, batch_size, shuffle, workers, seed=0, collate_fn=collate_skip_bad, drop_last=False,
                num_replicas=1, rank=0):
    """A DataLoader over `dataset` with a ResumableSampler (call `loader.sampler.set_epoch`)."""
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank,
                               drop_last=drop_last)
    # Every sample seeds the RNGs itself (SeededSamples), so the workers need no worker_init_fn.
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, drop_last=drop_last, pin_memory=torch.cuda.is_available())
