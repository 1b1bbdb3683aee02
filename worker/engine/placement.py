"""Putting a plan into effect: which weights sit on the device, which stream, and how the VAE decodes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from diffusers import ZImagePipeline
from torch import nn

from worker.engine.compiled import compile_blocks
from worker.engine.costs import ModelSizes
from worker.engine.plan import TEXT_ENCODER_LOOKAHEAD, TRANSFORMER_LOOKAHEAD, Plan
from worker.engine.streaming import BlockStreamer, HostEmbedding

# Tiles small enough that a 1536-pixel decode fits beside a few resident blocks.
VAE_TILE_PIXELS = 512


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """Z-Image's transformer blocks in the order its forward runs them."""
    groups: list[Any] = [transformer.noise_refiner, transformer.context_refiner, transformer.layers]
    return [block for group in groups for block in group]


def text_encoder_blocks(text_encoder: nn.Module) -> list[nn.Module]:
    """The text encoder's decoder layers, in order."""
    layers: Any = text_encoder.layers
    return list(layers)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by these tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: nn.Module) -> int:
    """Weight and buffer bytes of a module."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def measure_sizes(pipeline: ZImagePipeline) -> ModelSizes:
    """Component sizes from the weights actually loaded (dtype included)."""
    transformer, encoder = pipeline.transformer, pipeline.text_encoder
    blocks = tuple(module_bytes(b) for b in transformer_blocks(transformer))
    layers = tuple(module_bytes(b) for b in text_encoder_blocks(encoder))
    embedding = module_bytes(encoder.embed_tokens)
    return ModelSizes(
        transformer_blocks=blocks,
        transformer_rest=module_bytes(transformer) - sum(blocks),
        text_encoder_blocks=layers,
        text_encoder_rest=module_bytes(encoder) - sum(layers) - embedding,
        text_encoder_embedding=embedding,
        vae=module_bytes(pipeline.vae),
    )


def move_all_but(module: nn.Module, blocks: Iterable[nn.Module], device: torch.device) -> None:
    """Move a module's weights to `device`, except those inside the streamed blocks."""
    skipped = {id(t) for block in blocks for t in [*block.parameters(), *block.buffers()]}
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in skipped:
            tensor.data = tensor.data.to(device)


class PlannedPlacement:
    """Streamers on the transformer and the text encoder, set per plan by moving only what changes."""

    def __init__(self, pipeline: ZImagePipeline, device: torch.device, *, compile: bool = False) -> None:
        self.pipeline = pipeline
        self.device = device
        t_blocks = transformer_blocks(pipeline.transformer)
        e_blocks = text_encoder_blocks(pipeline.text_encoder)
        embedding = pipeline.text_encoder.embed_tokens
        move_all_but(pipeline.transformer, t_blocks, device)
        move_all_but(pipeline.text_encoder, [*e_blocks, embedding], device)
        pipeline.vae.to(device)
        self.transformer = BlockStreamer(t_blocks, device, lookahead=TRANSFORMER_LOOKAHEAD)
        self.text_encoder = BlockStreamer(e_blocks, device, lookahead=TEXT_ENCODER_LOOKAHEAD, wrap=False)
        self.embedding = HostEmbedding(embedding, device)
        if compile:
            compile_blocks(t_blocks)

    def apply(self, plan: Plan) -> None:
        """Shrink whichever part gives memory back first, then grow the other."""
        encoder_all = set(range(len(self.text_encoder.blocks)))
        encoder_resident = set() if plan.text_encoder_streamed else encoder_all
        steps = [
            lambda: self.transformer.set_resident(plan.transformer_resident, pin=plan.pin_host),
            lambda: self.text_encoder.set_resident(encoder_resident, pin=plan.pin_host),
        ]
        if plan.text_encoder_streamed:
            steps.reverse()
            self.embedding.place(on_host=True)
        for step in steps:
            step()
        if not plan.text_encoder_streamed:
            self.embedding.place(on_host=False)
        set_vae_tiling(self.pipeline, plan.vae_tiled)

    def drop_prefetched(self) -> None:
        """Free copies prefetched for a next pass that will not come before the decode."""
        self.transformer.synchronize()

    def remove(self) -> None:
        """Take every hook off and bring all weights back to host memory."""
        self.transformer.remove()
        self.text_encoder.remove()
        self.embedding.remove()
        self.pipeline.to("cpu")


def set_vae_tiling(pipeline: ZImagePipeline, tiled: bool) -> None:
    """Tile the VAE decode only when the plan needs it (tiling is slower)."""
    vae = pipeline.vae
    if not tiled:
        vae.disable_tiling()
        return
    vae.enable_tiling()
    vae.tile_sample_min_size = VAE_TILE_PIXELS
    vae.tile_latent_min_size = VAE_TILE_PIXELS // 8
