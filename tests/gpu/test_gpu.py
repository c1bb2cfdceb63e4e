"""GPU smoke suite (`make test-gpu`, marker `gpu`): what the CPU suite cannot see, in minutes on 1+ GPUs.

bf16 forward and generate against fp32 on the GPU; one bf16 training step on one GPU; one NCCL training step
on every visible GPU with FSDP2 and with DDP (needs 2+ GPUs: NCCL refuses two ranks on one GPU); a process
group that reduces both CUDA and CPU tensors; the server answering from a model on the GPU; the memory plan
(`mgllava train --plan`) within 20% of `torch.cuda.max_memory_allocated` over two steps of the 7B width cut
to 2 LLM layers. Without a CUDA GPU every test skips, saying so.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgllava.cli import main
from mgllava.utils.io import read_jsonl

from .. import synth
from ..serving import ask, data_url, scene, tiny_parts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU visible: the GPU smoke suite skips"
    ),
]
ROOT = Path(__file__).resolve().parents[2]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_inputs(processor, device: str = "cuda"):
    messages = [{"role": "user", "content": "<image>\nWhat shape is in the image?"}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, images=[scene(3)])  # fmt: skip
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def test_bf16_forward_and_generate_match_fp32_on_the_gpu():
    model, processor = tiny_parts()
    fp32 = model.to("cuda").eval()
    inputs = gpu_inputs(processor)
    with torch.no_grad():
        reference = fp32(**inputs).logits.float()
        bf16 = model.to(torch.bfloat16)  # the same weights, rounded
        logits = bf16(**inputs).logits.float()
    assert torch.isfinite(logits).all()
    scale = reference.abs().max()
    assert (logits - reference).abs().max() < 0.05 * scale
    last = reference[0, -1]
    top2 = last.topk(2).values
    generated = bf16.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 8
    if top2[0] - top2[1] > 0.05 * scale:  # a clear first choice: bf16 rounding must not change it
        assert int(generated[0, inputs["input_ids"].shape[1]]) == int(last.argmax())


def test_a_process_group_on_the_gpu_reduces_cuda_and_cpu_tensors():
    from mgllava.utils import dist as mdist

    store = torch.distributed.HashStore()
    torch.distributed.init_process_group(mdist.backend(), store=store, rank=0, world_size=1)
    try:
        on_gpu, on_cpu = torch.ones(3, device="cuda"), torch.ones(3)
        torch.distributed.all_reduce(on_gpu)
        torch.distributed.all_reduce(on_cpu)
        assert on_gpu.sum().item() == on_cpu.sum().item() == 3
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data, out: Path, world: int, *extra: str) -> list[str]:
    return ["train", "tiny-stage2", synth.source_override(data), f"output_dir={out}", "init_from=null",
            "stage.requires_init=false", "max_steps=2", "precision=bf16", "gradient_checkpointing=true",
            "stage.per_device_batch_size=2", f"stage.global_batch_size={4 * world}", *extra]  # fmt: skip


def assert_trained(out: Path) -> None:
    records = list(read_jsonl(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in records)
    assert (out / "final/model.safetensors").is_file()


def test_one_bf16_training_step_on_one_gpu(tmp_path):
    data = synth.write_dataset(tmp_path / "d", n=8, text_only=2)
    assert main(train_args(data, tmp_path / "one", 1)) == 0
    assert_trained(tmp_path / "one")


@pytest.mark.skipif(GPUS < 2, reason="NCCL training needs 2+ GPUs (one rank per GPU)")
@pytest.mark.parametrize("parallel", ["fsdp", "ddp", "fsdp-offload"])
def test_one_nccl_training_step_on_every_gpu(tmp_path, parallel):
    """FSDP2, DDP, and FSDP2 with its shards and AdamW in host memory (`cpu_offload`: the grad-norm
    reduction then runs over CPU tensors, through the group's gloo half)."""
    data = synth.write_dataset(tmp_path / "d", n=8 * GPUS, text_only=2 * GPUS)
    settings = (
        ["parallel=fsdp", "cpu_offload=true"] if parallel == "fsdp-offload" else [f"parallel={parallel}"]
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(GPUS), "--master_port",
               str(free_port()), "-m", "mgllava.cli", *train_args(data, tmp_path / parallel, GPUS,
                                                                   *settings)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert_trained(tmp_path / parallel)


def test_the_server_answers_from_the_gpu():
    import httpx

    from mgllava.inference import Engine, GenerationSettings
    from mgllava.serve import ServerSettings, create_app
    from mgllava.serve.background import serve_in_thread

    model, processor = tiny_parts()
    engine = Engine(model.to("cuda", torch.bfloat16), processor)
    messages = ask("What shape is in the image?", data_url(scene(1)))
    expected = engine.chat(messages, settings=GenerationSettings(max_new_tokens=8))
    with serve_in_thread(create_app(engine, ServerSettings(model_name="tiny", max_tokens=16))) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                           json={"model": "tiny", "messages": messages, "max_tokens": 8})  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected.text
    assert next(engine.model.parameters()).is_cuda


def test_the_memory_plan_is_within_20_percent_of_a_measured_step():
    """Two bf16 AdamW steps of the 7B width cut to 2 LLM layers (full towers) on one GPU, every sequence
    `max_length` tokens, against `mgllava train --plan`'s one-process peak for the same config."""
    from mgllava.config import load_config
    from mgllava.train.config import TrainConfig
    from mgllava.train.plan import plan

    text = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 4096, "intermediate_size": 11008,
            "num_attention_heads": 32, "vocab_size": 32001, "max_position_embeddings": 4096}  # fmt: skip
    config = load_config(TrainConfig, "tiny-stage2", ["data.sources=[]", "init_from=null", "stage.requires_init=false",
                                                      "model=mgllava-vicuna-7b", f"model_overrides={{text_config: {text}}}",
                                                      "precision=bf16", "gradient_checkpointing=true", "max_length=2048",
                                                      "stage.per_device_batch_size=2"])  # fmt: skip
    predicted = plan(config, 1, torch.cuda.get_device_properties(0).total_memory / 1e9, "7b-width-2-layers")
    from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration
    from mgllava.train.stages import apply_stage, store_frozen_towers

    model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("mgllava-vicuna-7b", text_config=text))
    apply_stage(model, config.stage)
    store_frozen_towers(model, config.precision)  # as the trainer (and the plan) keep them: bf16
    model.language_model.activation_checkpointing_enable({"use_reentrant": False})
    model.to("cuda").train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, 32000, (2, 2048), device="cuda")
    for _ in range(2):  # the second step runs with the optimizer state allocated, as every later step
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    measured = torch.cuda.max_memory_allocated()
    assert abs(predicted.peak - measured) <= 0.2 * measured, (predicted.row(), measured / 1e9)
