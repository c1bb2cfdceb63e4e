"""FSDP2 as the trainer shards, on torch's fake process group (one process plays 2 ranks)."""

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration
from mgllava.config import load_config
from mgllava.train.config import TrainConfig
from mgllava.train.parallel import shard
from mgllava.train.stages import apply_stage


@pytest.fixture
def fake_two_ranks():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("precision, gathered", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_bf16_units_gather_and_compute_in_bf16_and_keep_fp32_shards(fake_two_ranks, precision, gathered):
    config = load_config(TrainConfig, "tiny-stage2", ["data.sources=[]", "init_from=null", "stage.requires_init=false",
                                                      f"precision={precision}"])  # fmt: skip
    model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("tiny"))
    apply_stage(model, config.stage)
    shard(model, config)
    up = model.language_model.layers[0].mlp.up_proj
    seen = []
    up.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    ids = torch.randint(0, 100, (1, 8))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert seen == [gathered]
    assert type(up.weight).__name__ == "DTensor" and up.weight.dtype == torch.float32  # the shard stays fp32
    assert up.weight.to_local().shape[0] == up.weight.shape[0] // 2


def test_sharded_build_gives_rank_0_the_one_process_weights_and_modes(fake_two_ranks, tmp_path):
    from mgllava.train.setup import build_model, build_sharded

    config = load_config(TrainConfig, "tiny-stage2", ["data.sources=[]", "init_from=null", "stage.requires_init=false",
                                                      f"output_dir={tmp_path}"])  # fmt: skip
    model, _ = build_sharded(config, torch.device("cpu"), lambda m: apply_stage(m, config.stage))
    reference = build_model(config)[0]
    for name, want in reference.state_dict().items():
        got = model.state_dict()[name]
        local = got.to_local() if hasattr(got, "to_local") else got
        assert torch.equal(local, want[: local.shape[0]] if local.dim() else want), (
            name
        )  # rank 0: the first rows
    assert all(not p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert {n: m.training for n, m in model.named_modules()} == {
        n: m.training for n, m in reference.named_modules()
    }
