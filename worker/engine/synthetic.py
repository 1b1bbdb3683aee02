"""Synthetic Z-Image pipelines: the real diffusers/transformers classes with random weights.

No machine here can download weights, so tests and benchmarks build these, save them with
`save_pretrained` and load them back through the same `from_pretrained` path as a real model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

log = logging.getLogger(__name__)

PREFIX = "synthetic:"
COMPLETE_MARKER = ".nightrender-complete"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template, reduced to what ZImagePipeline asks of it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)
CORPUS = (
    "a photo of a cat sitting on a red sofa in warm evening light, a watercolor painting of mountains, "
    "portrait of an astronaut, neon city street at night in the rain, bowl of fruit on a wooden table, "
    "lighthouse on a cliff above a stormy sea, macro shot of a dew drop on a green leaf, "
    "the quick brown fox jumps over the lazy dog 0123456789"
)


@dataclass(frozen=True)
class SyntheticSpec:
    """Configs of one synthetic pipeline's components."""

    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    tokenizer_vocab: int = 600
    extra: dict[str, Any] = field(default_factory=dict)


FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

SPECS: dict[str, SyntheticSpec] = {
    # Seconds on a CPU; the VAE keeps Flux's 8x downsampling so sizes behave like the real model.
    "tiny": SyntheticSpec(
        transformer={
            "dim": 64,
            "n_layers": 2,
            "n_refiner_layers": 1,
            "n_heads": 2,
            "n_kv_heads": 2,
            "cap_feat_dim": 32,
            "axes_dims": [8, 12, 12],
            "axes_lens": [1024, 256, 256],
        },
        text_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 600,
            "max_position_embeddings": 1024,
        },
        vae={
            **FLUX_VAE,
            "block_out_channels": [32, 32, 32, 32],
            "layers_per_block": 1,
            "norm_num_groups": 32,
        },
    ),
    # Z-Image-Turbo's exact architecture: 6.155B transformer, Qwen3-4B encoder, Flux VAE.
    "full": SyntheticSpec(
        transformer={},
        text_encoder={
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "rope_theta": 1_000_000.0,
            "tie_word_embeddings": True,
        },
        vae={**FLUX_VAE, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2},
    ),
}


def is_synthetic(model: str) -> bool:
    """Whether a model name asks for a synthetic pipeline."""
    return model.startswith(PREFIX)


def spec_for(model: str) -> SyntheticSpec:
    """The spec a `synthetic:NAME` model names."""
    name = model.removeprefix(PREFIX)
    if name not in SPECS:
        raise ValueError(f"unknown synthetic model {model!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on a fixed corpus, with a Qwen-style chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


@contextmanager
def _seeded_default_dtype(dtype: torch.dtype, seed: int) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_components(spec: SyntheticSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Instantiate each component with seeded random weights, on the current default device."""
    with _seeded_default_dtype(dtype, 0):
        transformer = ZImageTransformer2DModel(**spec.transformer)
        # These pads start as torch.empty; uninitialised memory can hold NaN.
        with torch.no_grad():
            transformer.x_pad_token.fill_(1.0)
            transformer.cap_pad_token.fill_(1.0)
    with _seeded_default_dtype(dtype, 1):
        text_encoder = Qwen3Model(Qwen3Config(**spec.text_encoder))
    with _seeded_default_dtype(dtype, 2):
        vae = AutoencoderKL(**spec.vae)
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "vae": vae,
        "tokenizer": build_tokenizer(spec.tokenizer_vocab),
        "scheduler": FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=3.0),
    }


def ensure_saved(model: str, cache_dir: Path, build_device: str = "cpu") -> Path:
    """The folder of a saved synthetic pipeline, building it once (atomically) if missing.

    Workers sharing MODEL_CACHE_DIR (one per GPU) start together: a file lock lets the first build it
    while the others wait, then find it complete and load it, instead of each building its own copy.
    """
    folder = cache_dir / model.replace(":", "-")
    if (folder / COMPLETE_MARKER).exists():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_dir / f".{folder.name}.lock"):
        if not (folder / COMPLETE_MARKER).exists():
            _build_and_save(model, cache_dir, folder, build_device)
    return folder


def _build_and_save(model: str, cache_dir: Path, folder: Path, build_device: str) -> None:
    spec = spec_for(model)
    dtype = torch.float32 if model == "synthetic:tiny" else torch.bfloat16
    with torch.device(build_device):
        pipeline = ZImagePipeline(**build_components(spec, dtype))
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    staging.chmod(0o755)  # mkdtemp makes it private; the API and worker may run as different users
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / COMPLETE_MARKER).write_text(model)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    del pipeline
    if build_device == "cuda":
        torch.cuda.empty_cache()  # hand the build's 20 GB back before anything measures free memory
    _publish_folder(staging, folder)
    log.info("built %s in %s", model, folder)


def _publish_folder(staging: Path, folder: Path) -> None:
    # A concurrent builder may have won the race; its folder is as good as ours.
    try:
        os.replace(staging, folder)
    except OSError:
        if not (folder / COMPLETE_MARKER).exists():
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
        else:
            shutil.rmtree(staging, ignore_errors=True)


def parameter_counts(model: str) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        components = build_components(spec_for(model), torch.bfloat16)
    return {
        name: sum(p.numel() for p in components[name].parameters())
        for name in ("transformer", "text_encoder", "vae")
    }
