"""Block streaming: some blocks stay resident on the GPU, the rest live in pinned host memory and are
copied in just before they run, on a side CUDA stream, while earlier blocks compute.

Why our own and not diffusers group offloading: group offloading streams *every* block, so a 12 GB
card pays ~12 GB of copies per step. Here the planner keeps as many blocks resident as the budget
allows and streams only the rest, spread through the stack so each copy hides behind compute.
Like group offloading, it is attached as forward hooks and never edits the model's code.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# Streamed blocks whose compute may still be pending when a new copy starts (see _wait_for_room).
MAX_PENDING_COMPUTE = 1


@dataclass
class StreamedBlock:
    """One block's weights: on the device when resident or in flight, else in (pinned) host memory."""

    index: int
    module: nn.Module
    resident: bool = False
    host: list[torch.Tensor] = field(default_factory=list)
    pinned: bool = False
    device_copy: list[torch.Tensor] | None = None
    ready: torch.cuda.Event | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Parameters and buffers, in a fixed order."""
        return [p for p in self.module.parameters()] + [b for b in self.module.buffers()]

    def nbytes(self) -> int:
        """The block's weight bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class BlockStreamer:
    """Hooks on an ordered list of blocks that keep a chosen set resident and stream the others."""

    def __init__(
        self, blocks: Sequence[nn.Module], device: torch.device, *, lookahead: int = 2, wrap: bool = True
    ) -> None:
        self.device = device
        self.lookahead = max(1, lookahead)
        # Wrapping prefetches the next pass's first blocks: right for denoising steps, wrong for an
        # encoder that runs once per job (the copies would sit through the whole denoise).
        self.wrap = wrap
        # Blocks start where the loader left them (host memory); set_resident places them.
        self.blocks = [StreamedBlock(index=i, module=m) for i, m in enumerate(blocks)]
        for block in self.blocks:
            block.host = [t.data for t in block.tensors()]
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pin = device.type == "cuda"
        self.streamed_bytes_per_pass = 0
        # Compute-stream events, one per streamed block the CPU has already run past (see _wait_for_room).
        self._computed: deque[torch.cuda.Event] = deque()
        self._handles: list[RemovableHandle] = []
        for block in self.blocks:
            self._handles.append(block.module.register_forward_pre_hook(self._before(block)))
            self._handles.append(block.module.register_forward_hook(self._after(block)))

    # --- placement -------------------------------------------------------------------------------

    def set_resident(self, resident: set[int] | frozenset[int], *, pin: bool = True) -> None:
        """Make exactly these blocks resident and stream the rest, moving only blocks that change.

        Blocks leave the device before others arrive, so a shrinking budget is never overrun.
        """
        self.synchronize()
        for block in self.blocks:
            if block.index not in resident and (block.resident or block.pinned != (pin and self.pin)):
                self._make_streamed(block, pin=pin and self.pin)
        for block in self.blocks:
            if block.index in resident and not block.resident:
                self._make_resident(block)
        self.streamed_bytes_per_pass = sum(b.nbytes() for b in self.blocks if not b.resident)

    def _make_resident(self, block: StreamedBlock) -> None:
        for tensor, host in zip(block.tensors(), block.host, strict=True):
            tensor.data = host.to(self.device)
        if not block.pinned:
            block.host = []  # a pageable copy is cheap to make again; keeping it would double host RAM
        block.device_copy, block.ready, block.resident = None, None, True

    def _make_streamed(self, block: StreamedBlock, *, pin: bool) -> None:
        """Point the block at a host copy: the pinned one kept from before when there is one.

        Weights never change while rendering, so a pinned copy made once stays valid, and streaming
        a block again costs no device-to-host copy and no new pinned allocation (both slow).
        """
        reuse = bool(block.host) and block.pinned == pin
        host = block.host if reuse else [self._host_copy(t.data, pin=pin) for t in block.tensors()]
        for tensor, copy in zip(block.tensors(), host, strict=True):
            tensor.data = copy
        block.host, block.device_copy, block.ready, block.resident, block.pinned = (
            host,
            None,
            None,
            False,
            pin,
        )

    @staticmethod
    def _host_copy(tensor: torch.Tensor, *, pin: bool) -> torch.Tensor:
        copy = tensor.to("cpu")
        return copy.pin_memory() if pin else copy

    def resident_indices(self) -> set[int]:
        """Which blocks are resident now."""
        return {b.index for b in self.blocks if b.resident}

    # --- streaming -------------------------------------------------------------------------------

    def _before(self, block: StreamedBlock) -> Any:
        def hook(_module: nn.Module, _args: Any) -> None:
            if not block.resident:
                self._prefetch(block)
                self._swap_in(block)
            self._prefetch_ahead(block.index)

        return hook

    def _after(self, block: StreamedBlock) -> Any:
        def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            if not block.resident:
                self._swap_out(block)
                self._note_computed()

        return hook

    def _note_computed(self) -> None:
        if self.copy_stream is None:
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._computed.append(done)

    def _wait_for_room(self) -> None:
        """Keep copies from running far ahead of compute.

        The CPU queues kernels well ahead of the GPU. Unchecked, it would start copies for blocks many
        steps ahead, each in fresh memory, while the memory of blocks already run is still held for
        the compute stream. The allocator then reaches the budget's cap and must synchronise the whole
        device to free cached blocks, which empties the copy queue and leaves the copy engine idle.
        Waiting here until all but the latest streamed block has computed keeps the memory of a
        finished block free for the next copy, while `lookahead` copies stay queued.
        """
        while len(self._computed) > MAX_PENDING_COMPUTE:
            self._computed.popleft().synchronize()

    def _prefetch(self, block: StreamedBlock) -> None:
        """Start copying a streamed block to the device on the side stream (no-op if in flight)."""
        if block.resident or block.device_copy is not None:
            return
        if self.copy_stream is None:
            block.device_copy = [h.to(self.device) for h in block.host]
            return
        self._wait_for_room()
        with torch.cuda.stream(self.copy_stream):
            block.device_copy = [h.to(self.device, non_blocking=True) for h in block.host]
            block.ready = torch.cuda.Event()
            block.ready.record(self.copy_stream)

    def _prefetch_ahead(self, index: int) -> None:
        """Keep the next `lookahead` streamed blocks (wrapping to the next pass) in flight."""
        streamed = [b for b in self.blocks if not b.resident]
        if not streamed:
            return
        upcoming = [b for b in streamed if b.index > index]
        if self.wrap:
            upcoming += [b for b in streamed if b.index <= index]
        for block in upcoming[: self.lookahead]:
            self._prefetch(block)

    def _swap_in(self, block: StreamedBlock) -> None:
        if block.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(block.ready)
        assert block.device_copy is not None
        for tensor, copy in zip(block.tensors(), block.device_copy, strict=True):
            tensor.data = copy

    def _swap_out(self, block: StreamedBlock) -> None:
        if block.device_copy is not None and self.copy_stream is not None:
            # The copies were allocated on the side stream; tell the allocator the compute stream used them,
            # so their memory is not handed to the next prefetch before this block's kernels finish.
            current = torch.cuda.current_stream(self.device)
            for copy in block.device_copy:
                copy.record_stream(current)
        for tensor, host in zip(block.tensors(), block.host, strict=True):
            tensor.data = host
        block.device_copy, block.ready = None, None

    def synchronize(self) -> None:
        """Wait for copies in flight and drop prefetched copies (before re-planning)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self._computed.clear()
        for block in self.blocks:
            if not block.resident and block.device_copy is not None:
                block.device_copy, block.ready = None, None

    def remove(self) -> None:
        """Take the hooks off and leave every block's weights in pageable host memory."""
        self.synchronize()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in self.blocks:
            self._make_streamed(block, pin=False)


class HostEmbedding:
    """Keeps a token-embedding table in host memory and looks tokens up there.

    A 151,936-row table is 0.78 GB, yet a prompt reads only a few hundred rows: copying the rows is
    cheaper than streaming the table.
    """

    def __init__(self, embedding: nn.Embedding, device: torch.device) -> None:
        self.embedding = embedding
        self.device = device
        self._handles = [
            embedding.register_forward_pre_hook(self._ids_to_host),
            embedding.register_forward_hook(self._rows_to_device),
        ]

    def _ids_to_host(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if module.weight.device.type != "cpu":
            return None
        return (args[0].to("cpu"), *args[1:])

    def _rows_to_device(self, module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.to(self.device, non_blocking=True)

    def place(self, *, on_host: bool) -> None:
        """Move the table to the host (streamed encoder) or the device (resident encoder)."""
        self.embedding.to("cpu" if on_host else self.device)

    def remove(self) -> None:
        """Take the hooks off."""
        for handle in self._handles:
            handle.remove()
