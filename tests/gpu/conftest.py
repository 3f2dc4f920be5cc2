import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """These tests need CUDA; on a CPU machine they are deselected (not reported as passing)."""
    if torch.cuda.is_available():
        return
    gpu = [i for i in items if "tests/gpu/" in str(i.fspath)]
    for item in gpu:
        items.remove(item)
    config.hook.pytest_deselected(items=gpu)


@pytest.fixture(autouse=True)
def restore_matmul_precision():
    """Tests that switch TF32 off (fp32 comparisons) get the process's settings back afterwards, so
    no test's precision depends on which tests ran before it in the same process."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
