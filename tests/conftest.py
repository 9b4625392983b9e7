import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/skipjack; the session shares one cache."""
    if "SKIPJACK_TEST_CACHE" in os.environ:  # reuse a warm cache across local runs
        os.environ["SKIPJACK_CACHE"] = os.environ["SKIPJACK_TEST_CACHE"]
    else:
        os.environ["SKIPJACK_CACHE"] = str(tmp_path_factory.mktemp("skipjack-cache"))
    os.environ.setdefault("WANDB_SILENT", "true")
    yield


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is; elsewhere they are skipped, not failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (bench/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
