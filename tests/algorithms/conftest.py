import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """The algorithms' exactness tests compare against independent computations in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
