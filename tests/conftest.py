import pytest
import torch

import sparsa


@pytest.fixture(autouse=True)
def _eager_and_seeded():
    """Tests run the eager kernels (compiled ones have their own tests) with a fixed seed."""
    torch.manual_seed(0)
    with sparsa.normalize.compile_mode("never"):
        yield
