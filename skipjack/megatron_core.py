"""megatron-core's modules, imported at first use and quietly.

Importing megatron-core takes about 3 s here (its package pulls in torch._inductor and wandb),
which every process would pay at each start even where it runs no tensor-parallel region and
reads no indexed dataset; and it warns that Apex/TE are absent (they are optional) and logs INFO
lines that would drown a run.
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from types import ModuleType


@functools.cache
def megatron_module(name: str) -> ModuleType:
    """The module `megatron.core.<name>`."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(f"megatron.core.{name}")
