import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: Dynamo's per-code-object cache (shared by every
    transformers model's forward wrapper) would otherwise hit its recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
