"""One intra-op thread for these tests: the tiny model gains nothing from more, and a shared CPU loses a lot."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
