"""Regional compilation of the transformer's repeated blocks, with block streaming left intact.

diffusers' `compile_repeated_blocks` compiles each block's `__call__`, which would pull our streaming
hooks (tensor swaps, CUDA events, a side stream) into the graph. We compile each block's `forward`
instead: the hooks run eagerly around the compiled region, and a streamed block's weights are plain
graph inputs whose storage may change between calls without a recompile. All blocks share one code
object, so one compile serves every block, resident or streamed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Each new shape family may add a graph per block variant (with and without modulation); past this
# many the block runs eagerly instead of compiling again, so recompiles stay bounded.
RECOMPILE_LIMIT = 16
_COMPILED = "_nightrender_compiled"


def compile_blocks(blocks: Iterable[nn.Module], *, backend: str = "inductor") -> int:
    """Compile each block's forward once (idempotent); returns how many blocks were newly wrapped."""
    _bound_recompiles()
    wrapped = 0
    for block in blocks:
        if getattr(block, _COMPILED, False):
            continue
        block.forward = torch.compile(block.forward, fullgraph=True, backend=backend)  # type: ignore[method-assign]
        setattr(block, _COMPILED, True)
        wrapped += 1
    return wrapped


def is_compiled(block: nn.Module) -> bool:
    """Whether compile_blocks wrapped this block."""
    return bool(getattr(block, _COMPILED, False))


def _bound_recompiles() -> None:
    config: Any = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = RECOMPILE_LIMIT
    else:  # older torch names it cache_size_limit
        config.cache_size_limit = RECOMPILE_LIMIT


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (a job's delta is its recompiles)."""
    counters: Any = torch._dynamo.utils.counters
    return int(counters["stats"]["unique_graphs"])
