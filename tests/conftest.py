import os

import pytest
import torch

# Triton reads this when it is first imported, and other test modules import it
# (transformers does), so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sparsa


@pytest.fixture(autouse=True)
def _eager_and_seeded():
    """Tests run the eager kernels (compiled ones have their own tests) with a fixed seed."""
    torch.manual_seed(0)
    with sparsa.normalize.compile_mode("never"):
        yield
