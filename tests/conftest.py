"""Tests run offline: a hidden download from a model hub fails loudly instead of hanging or passing by luck."""
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat scripts at the top


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: a second thread gains nothing, and on busy cores OpenMP's spin-waiting threads
    slow every op many times over. (Scripts the tests launch as subprocesses keep torch's default.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
