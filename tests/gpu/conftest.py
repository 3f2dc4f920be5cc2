import torch


def pytest_collection_modifyitems(config, items):
    """These tests need CUDA; on a CPU machine they are deselected (not reported as passing)."""
    if torch.cuda.is_available():
        return
    gpu = [i for i in items if "tests/gpu/" in str(i.fspath)]
    for item in gpu:
        items.remove(item)
    config.hook.pytest_deselected(items=gpu)
