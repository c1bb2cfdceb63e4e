"""Setup of the vLLM plugin tests: vLLM's settings for a shared CPU machine (engine core in this process, no
usage stats, caches under the test's tmp folder) and the tiny model they serve. vLLM's CPU attention needs a
head size of at least 32, so the `tiny` preset's LLM gets 2 heads of 32 (hidden size 64) here."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core runs in the test process
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="mgllava-vllm-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from typing import Any

import pytest
import torch

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.convert.folder import configure_generation, write_folder

KV_CACHE_BYTES = 256 << 20  # 512 bytes a token for the tiny LLM in fp32: room for 500k tokens
VLLM_HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}


def write_tiny_vllm_folder(out: Path, shape: dict[str, str] | None = None, **text_overrides: Any) -> Path:
    """The `tiny` preset with LLM heads of 32 (`VLLM_HEADS`) and `text_overrides`, random weights (seed 0),
    saved as one folder; `shape` sets `fusion` and `object_tokens` (the processor then follows the config)."""
    torch.manual_seed(0)
    text = {**MGLlavaConfig.from_preset("tiny").text_config.to_dict(), **VLLM_HEADS, **text_overrides}
    config = MGLlavaConfig.from_preset("tiny", text_config=text, **(shape or {}))
    model = MGLlavaForConditionalGeneration(config).eval()
    processor = MGLlavaProcessor.from_preset("tiny")
    if shape:
        processor = MGLlavaProcessor.for_config(config, processor.tokenizer, template="vicuna")
    configure_generation(model, processor)
    return write_folder(model, processor, out)


@pytest.fixture(scope="session")
def vllm_folder(tmp_path_factory) -> Path:
    return write_tiny_vllm_folder(tmp_path_factory.mktemp("vllm") / "model")


@pytest.fixture(scope="session")
def vllm_phi3_folder(tmp_path_factory) -> Path:
    """The same with a Phi-3 LLM (fused qkv and gate/up projections): vLLM's Phi3ForCausalLM serves it."""
    return write_tiny_vllm_folder(tmp_path_factory.mktemp("vllm-phi3") / "model", model_type="phi3")


@pytest.fixture(scope="session")
def vllm_llava_folder(tmp_path_factory) -> Path:
    """The LLaVA-shaped ablation (no fusion, no object tokens): no ConvNeXt, so no high-res pixels either."""
    shape = {"fusion": "none", "object_tokens": "off"}
    return write_tiny_vllm_folder(tmp_path_factory.mktemp("vllm-llava") / "model", shape)


def llm_options(max_boxes: int | None = None) -> dict[str, Any]:
    """`LLM(...)` options for this machine: a small KV cache of a fixed size (vLLM-CPU otherwise reserves a
    fraction of host memory less what the process already holds, which the models built by earlier tests
    use up), eager mode (no compile: seconds, not minutes), a few images per prompt."""
    options: dict[str, Any] = {
        "max_model_len": 2048,
        "enforce_eager": True,
        "gpu_memory_utilization": 0.05,
        "kv_cache_memory_bytes": KV_CACHE_BYTES,
        "limit_mm_per_prompt": {"image": 4},
    }
    if max_boxes is not None:
        options["mm_processor_kwargs"] = {"max_boxes": max_boxes}
    return options


def collapse_placeholders(ids: list[int], token_id: int, rows: list[int]) -> list[int]:
    """Our processor's ids with each image's run of `rows[i]` placeholders back to the one `<image>` of the
    prompt (runs of adjacent images touch, so the runs are cut by their lengths)."""
    out: list[int] = []
    runs, pos = iter(rows), 0
    while pos < len(ids):
        out.append(ids[pos])
        pos += next(runs) if ids[pos] == token_id else 1
    return out
