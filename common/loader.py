"""The DataLoader plumbing every training and evaluation loop shares.

The sampler hands every sample its own seed, derived from (seed, epoch, position in the epoch); the wrapper
seeds random/numpy/torch from it before calling the dataset. Augmentation then depends only on the sample,
not on which worker drew it, so a run resumed mid-epoch sees exactly the batches an uninterrupted run would
have seen. A sample whose image cannot be read becomes a warning and is dropped from its batch.
"""
from __future__ import annotations

import random
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from common.data import BadImageError


class ResumableSampler(DistributedSampler):
    """DistributedSampler that yields (index, sample_seed) and can start mid-epoch."""

    def __init__(self, dataset_len, shuffle=True, seed=0, num_replicas=None, rank=None, drop_last=False):
        if num_replicas is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if distributed else 1
            rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(range(dataset_len), num_replicas=num_replicas, rank=rank or 0,
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
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
    """Seeds the global RNGs per sample and turns unreadable images into skipped samples."""

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
    """Collate the good samples; `batch['num_skipped']` counts the dropped (None) ones.

    A batch in which every sample was bad holds only 'num_skipped'; the training loop skips it.
    """
    good = [s for s in samples if s is not None]
    batch = collate(good) if good else {}
    batch["num_skipped"] = len(samples) - len(good)
    return batch


def seed_worker(worker_id):
    """Give each worker distinct numpy/random streams (the per-sample seeds override them)."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(dataset, batch_size, shuffle, workers, seed=0, collate_fn=collate_skip_bad, drop_last=False,
                num_replicas=None, rank=None):
    """A DataLoader over `dataset` with a ResumableSampler (call `loader.sampler.set_epoch`)."""
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, num_replicas=num_replicas,
                               rank=rank, drop_last=drop_last)
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, worker_init_fn=seed_worker, drop_last=drop_last,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
