"""GPU tests' shared fixture: a fresh TorchDynamo state, compiled regions off afterwards."""
import pytest

from slope_megatron.model import regions


@pytest.fixture
def inductor():
    """Compile state reset before the test and after it (the test turns compiling on)."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    regions.enable_compile(False)
    torch._dynamo.reset()
