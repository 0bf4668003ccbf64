import pytest
import torch


@pytest.fixture
def float64():
    """Float64 by default for one test: the exactness tests compare meta-gradients with an
    independent computation or finite differences, which float32's rounding would swamp. The
    other tests run in float32, as the methods are trained."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
