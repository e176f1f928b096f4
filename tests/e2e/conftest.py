"""End-to-end tests: keep torch to one thread on the shared 2-core machine."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
