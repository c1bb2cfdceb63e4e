"""`mgllava train --plan`: the memory plan from the real model on the meta device, sharded on fake ranks."""

import pytest

from mgllava.cli import main
from mgllava.config import load_config
from mgllava.train.config import TrainConfig
from mgllava.train.plan import plan

TINY = ["data.sources=[]", "init_from=null", "stage.requires_init=false"]


def tiny(stage: str, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, f"tiny-{stage}", [*TINY, *extra])


def test_fsdp_shards_what_trains_and_replicates_the_frozen_towers():
    one, two = plan(tiny("stage2"), 1, 80, "tiny"), plan(tiny("stage2"), 2, 80, "tiny")
    assert 0.5 <= two.optimizer / one.optimizer < 0.55  # dim-0 shards, rank 0 takes the rounding
    assert two.optimizer == 2 * two.gradients and two.gather > 0 and one.gather == 0
    stage1 = plan(tiny("stage1"), 2, 80, "tiny")
    assert stage1.parameters == pytest.approx(two.parameters) and stage1.optimizer < two.optimizer / 10
    assert two.activations_checkpointed < two.activations_full


def test_ddp_keeps_a_whole_copy_and_its_buckets():
    ddp = plan(tiny("stage2", "parallel=ddp"), 2, 80, "tiny")
    one = plan(tiny("stage2"), 1, 80, "tiny")
    assert ddp.parameters == one.parameters and ddp.gradients == 2 * one.gradients


def test_cli_prints_the_plan_and_exits_1_when_it_does_not_fit(capsys):
    args = ["train", "--plan", "tiny-stage2", *TINY, "--world-size", "2"]
    assert main([*args, "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "per-rank GPU memory on 2 x 80 GB" in out and "| tiny-stage2 |" in out and "fits" in out
    assert main([*args, "--gpu-memory", "0.001"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_a_chunked_loss_plans_one_chunk_of_logits():
    plain = plan(tiny("stage2", "max_length=512"), 1, 80, "tiny")
    chunked = plan(tiny("stage2", "max_length=512", "loss_chunk_tokens=100"), 1, 80, "tiny")
    config = tiny("stage2")
    tokens = config.stage.per_device_batch_size * 512
    vocab = 2048  # the tiny preset's; fp32 tiny configs: 4 + 8 bytes per logit
    saved = (tokens - 100) * vocab * 12  # bytes
    assert plain.activations_full - chunked.activations_full == pytest.approx(saved, rel=1e-6)


def test_cpu_offload_moves_the_shards_and_optimizer_state_to_the_host():
    kept = plan(tiny("stage2"), 2, 80, "tiny")
    offloaded = plan(tiny("stage2", "cpu_offload=true"), 2, 80, "tiny")
    assert offloaded.gradients == offloaded.optimizer == 0 and kept.offloaded == 0
    shards = kept.parameters - offloaded.parameters  # the GPU keeps the replicated frozen towers only
    assert offloaded.parameters > 0 and shards > 0
    assert offloaded.offloaded == pytest.approx(shards + kept.gradients + kept.optimizer)
    assert kept.gather < offloaded.gather < kept.gather * 1.5  # plus the running unit's shard, copied in
    assert offloaded.peak < kept.peak and "CPU offload" in offloaded.parallel


def test_the_34b_stage2_preset_fits_8_gpus_of_80_gb_with_its_cpu_offload(capsys):
    args = ["train", "--plan", "mgllava-yi1.5-34b-stage2", "model=mgllava-yi1.5-34b", "data.mixture=x.yaml"]
    assert main([*args, "--world-size", "8", "--gpu-memory", "80"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.endswith("| fits |")
    assert main([*args, "cpu_offload=false", "--world-size", "8", "--gpu-memory", "80"]) == 1


def test_cpu_offload_needs_fsdp_over_several_ranks():
    with pytest.raises(ValueError, match="cpu_offload needs parallel=fsdp"):
        tiny("stage2", "cpu_offload=true", "parallel=ddp")
    with pytest.raises(ValueError, match="2 or more processes"):
        plan(tiny("stage2", "cpu_offload=true"), 1, 80, "tiny")
