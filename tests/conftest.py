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
