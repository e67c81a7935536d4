import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile with Inductor (the benchmark's default) would start a pool of compile workers
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
torch.set_num_threads(1)
THREADS = torch.get_num_threads()

# Hypothesis profiles: "default" runs in CI (`make test`); select the long run with
# `pytest tests/test_properties.py --hypothesis-profile=thorough`.
settings.register_profile("default", max_examples=200, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=2000, deadline=None, derandomize=False, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _global_state():
    """Process-wide settings a test could change and leave behind for the next one."""
    import torch.distributed as dist

    return {
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "autocast cpu": torch.is_autocast_enabled("cpu"),
        "process group": dist.is_available() and dist.is_initialized(),
        "profile hook": sys.getprofile(),
    }


@pytest.fixture(autouse=True)
def _no_leaks():
    """Every test starts from the same process state and leaves it so (tests run in any order and
    distribution over xdist workers): compiled-code caches are cleared after each test, and a test
    that changes a global setting without restoring it fails.  (Warning filters need no check:
    pytest restores them around every test phase.)"""
    before = _global_state()
    yield
    if "torch._dynamo" in sys.modules:  # cache entries pile up per code object across tests
        torch._dynamo.reset()
    after = _global_state()
    leaked = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if leaked:
        torch.set_num_threads(THREADS)
        torch.set_default_dtype(before["default dtype"])
        torch.set_grad_enabled(before["grad mode"])
        pytest.fail(f"test left process state changed (before, after): {leaked}", pytrace=False)
