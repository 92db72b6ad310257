"""Shared pytest setup: every test runs torch on one intra-op thread.

The test models are tiny, so a second thread buys nothing, and on a busy 2-core machine OpenMP threads
that wait on each other made single steps tens of times slower.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
