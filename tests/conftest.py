"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for small-tensor training tests.

    Measured on the 2-core CI machine: 1 s instead of 10-40 s per training test when
    other processes share the cores (a second thread only adds hand-off and contention).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
