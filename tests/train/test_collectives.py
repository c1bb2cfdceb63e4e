"""Collectives on the training device: the step's counts and loss total are reduced where NCCL can reduce
them (tests/train/collectives.py explains the test mode); gradients are reduced once per step."""

import pytest
import torch
import torch.distributed as dist

from mgllava.config import load_config
from mgllava.train.config import TrainConfig
from mgllava.train.trainer import Trainer, gradient_sync

from .. import synth
from .collectives import WrongDeviceCollective, wrong_device_collectives


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("collectives")
    data = synth.write_dataset(root / "d", n=4, text_only=0)
    config = load_config(TrainConfig, "tiny-stage2", [synth.source_override(data), f"output_dir={root}/out",
                                                      "init_from=null", "stage.requires_init=false"])  # fmt: skip
    return Trainer(config)


def test_a_step_hands_collectives_only_training_device_tensors(trainer, monkeypatch):
    micro = [trainer.collate([trainer.dataset[0], trainer.dataset[1]])]
    with wrong_device_collectives(monkeypatch, trainer.device):
        stats = trainer.train_step(micro)
    assert stats["loss"] > 0 and stats["tokens"] == int(micro[0]["attention_mask"].sum())


def test_the_test_mode_refuses_a_tensor_made_without_a_device(monkeypatch):
    with (
        wrong_device_collectives(monkeypatch, torch.device("cpu")),
        pytest.raises(WrongDeviceCollective, match="meta"),
    ):
        torch.distributed.all_reduce(torch.zeros(2))


def test_ddp_reduces_gradients_on_the_last_micro_batch_only():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        reductions = []

        def hook(state, bucket):
            reductions.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        model.register_comm_hook(None, hook)
        for k in range(3):
            with gradient_sync(model, sync=k == 2):
                model(torch.randn(5, 4)).sum().backward()
        assert reductions == [0]
    finally:
        dist.destroy_process_group()


def test_a_bf16_autocast_step_trains(trainer):
    """The paper trains in bf16; the tiny presets run fp32, so this is the CPU suite's bf16 step (object
    pooling once failed here: a bf16 bmm result added into an fp32 buffer)."""
    micro = [trainer.collate([trainer.dataset[0], trainer.dataset[1]])]
    trainer.config.precision = "bf16"
    try:
        stats = trainer.train_step(micro)
    finally:
        trainer.config.precision = "fp32"
    assert stats["loss"] > 0 and torch.isfinite(torch.tensor(stats["grad_norm"]))
    trainer.optimizer.zero_grad(set_to_none=True)
