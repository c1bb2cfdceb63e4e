"""Training: configs, data order, stages, a full single-process stage 1 -> stage 2 run, LoRA, NaN stop."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from mgllava.cli import main
from mgllava.config import ConfigError, load_config
from mgllava.train.config import TrainConfig
from mgllava.train.sampler import balanced_micro_batches, epoch_order, micro_batches, padding_fraction

from .. import formats, synth


def test_paper_presets_load_with_overrides():
    config = load_config(TrainConfig, "mgllava-llama3-8b-stage2", ["model=/m", "data.mixture=/x.yaml"])
    assert config.stage.lr == 1e-5 and config.stage.global_batch_size == 128 and config.stage.length_grouped
    assert config.stage.trainable == ["new_modules", "language_model"]
    assert config.init_from == "runs/mgllava-llama3-8b/stage1/final"
    yi = load_config(
        TrainConfig, "mgllava-yi1.5-34b-stage1", ["model=/m", "data.mixture=/x.yaml", "stage.lr=3e-4"]
    )
    assert yi.stage.lr == 3e-4 and yi.stage.global_batch_size == 512 and yi.stage.warmup_ratio == 0.03


@pytest.mark.parametrize(
    "overrides, match",
    [
        ([], r"model must be set"),
        (["model=/m", "data.mixture=/x", "stage.lrr=1"], r"unknown key\(s\) stage\.lrr"),
        (["model=/m", "data.mixture=/x", "stage.lr=fast"], r"stage\.lr: expected float"),
        (
            ["model=/m", "data.mixture=/x", "stage.trainable=[decoder]"],
            r"unknown trainable modules \['decoder'\]",
        ),
        (
            ["model=/m", "data.mixture=/x", "precision=fp8"],
            r"precision: 'fp8' is not one of bf16, fp16, fp32",
        ),
        (
            ["model=/m", "data.mixture=/x", "stage.global_batch_size=10", "stage.per_device_batch_size=4"],
            "not a multiple",
        ),
        (["oops"], "expected dotted.key=value"),
        (["model=/m", "data.mixture=/x", "precision=fp16"], "fp16 needs a gradient scaler"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, "mgllava-vicuna-7b-stage1", overrides)


def test_order_does_not_depend_on_world_size():
    lengths, mm = list(range(20)), [True] * 20
    order = epoch_order(lengths, mm, global_batch=4, seed=1, epoch=0, length_grouped=False)
    one = [i for m in micro_batches(order, 2, world=1, rank=0, per_device=2, accumulation=2) for i in m]
    two = [
        i for r in range(2) for i in micro_batches(order, 2, world=2, rank=r, per_device=2, accumulation=1)[0]
    ]
    assert sorted(one) == sorted(two) == sorted(order[8:12])
    assert epoch_order(lengths, mm, 4, 1, 1, False) != order  # reshuffled per epoch


def test_length_grouping_pads_less_and_keeps_modalities_apart():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 1000, (400,), generator=g).tolist()
    mm = [i % 3 != 0 for i in range(400)]

    def pad(grouped):
        order = epoch_order(lengths, mm, 16, 0, 0, grouped)
        mbs = [order[i : i + 4] for i in range(0, len(order), 4)]
        return padding_fraction([[lengths[i] for i in mb] for mb in mbs]), mbs

    plain, _ = pad(False)
    grouped, mbs = pad(True)
    assert grouped < plain / 2
    assert sum(len({mm[i] for i in mb}) > 1 for mb in mbs) <= 1  # at most the last, partial megabatch mixes


def test_length_grouped_rounds_are_balanced_across_ranks():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 2000, (512,), generator=g).tolist()
    order = epoch_order(lengths, [True] * 512, 64, 0, 0, length_grouped=True)
    world, per_device, accumulation = 4, 4, 4

    def rounds(split):
        """per step and accumulation round: each rank's total length, and the rank holding the longest."""
        out = []
        for step in range(len(order) // 64):
            per_rank = [split(order, step, r) for r in range(world)]
            assert sorted(i for mbs in per_rank for mb in mbs for i in mb) == sorted(
                order[step * 64 : (step + 1) * 64]
            )
            for m in range(accumulation):
                totals = [sum(lengths[i] for i in per_rank[r][m]) for r in range(world)]
                longest = max(range(world), key=lambda r: max(lengths[i] for i in per_rank[r][m]))
                out.append((max(totals) / min(totals), longest))
        return out

    contiguous = rounds(lambda o, s, r: micro_batches(o, s, world, r, per_device, accumulation))
    balanced = rounds(
        lambda o, s, r: balanced_micro_batches(o, lengths, s, world, r, per_device, accumulation)
    )
    assert all(longest == 0 for _, longest in contiguous)  # the old slicing: rank 0 always holds the longest
    assert len({longest for _, longest in balanced}) == world
    spread = sum(ratio for ratio, _ in balanced) / len(balanced)
    assert (
        spread < 1.1 and sum(ratio for ratio, _ in contiguous) / len(contiguous) > 2
    )  # 1.03 and 2.4 measured


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth.write_dataset(tmp_path_factory.mktemp("data"), n=8, text_only=2)


def weights(folder):
    return load_file(folder / "model.safetensors")


def test_stage1_then_stage2_single_process(data, tmp_path):
    src = synth.source_override(data)
    assert main(["train", "tiny-stage1", src, f"output_dir={tmp_path}/s1", "max_steps=2"]) == 0
    stage1 = weights(tmp_path / "s1/final")
    torch.manual_seed(0)  # the tiny preset's initial weights, as the trainer built them (seed 0)
    from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration

    initial = formats.flat_state_dict(MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("tiny")))
    changed = {k for k in stage1 if not torch.equal(stage1[k], initial[k])}
    assert changed and all(k.startswith(("fusion.", "projector.", "box_projector.")) for k in changed)
    assert main(["train", "tiny-stage2", src, f"output_dir={tmp_path}/s2", f"init_from={tmp_path}/s1/final",
                 "max_steps=2"]) == 0  # fmt: skip
    stage2 = weights(tmp_path / "s2/final")
    assert any(not torch.equal(stage2[k], stage1[k]) for k in stage2 if k.startswith("language_model."))
    assert all(
        torch.equal(stage2[k], stage1[k])
        for k in stage2
        if k.startswith(("vision_tower.", "high_res_tower."))
    )
    records = [json.loads(line) for line in (tmp_path / "s2/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(
        r["loss"] > 0 and r["tokens_per_s"] > 0 for r in records
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "s2/tensorboard"))
    board.Reload()
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records])
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/memory_mb"} <= set(
        board.Tags()["scalars"]
    )
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "s2/final").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "s2/final")
    inputs = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat shape is in the image?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True,
                                           images=[data["images"] / "000.png"])  # fmt: skip
    assert (
        model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1]
        == inputs["input_ids"].shape[1] + 3
    )


def test_stage2_needs_an_explicit_stage1(data, tmp_path):
    assert main(["train", "tiny-stage2", synth.source_override(data), f"output_dir={tmp_path}/x",
                 "init_from=null"]) == 2  # fmt: skip


def test_lora_trains_adapters_and_merges_on_export(data, tmp_path):
    src = synth.source_override(data)
    assert main(["train", "tiny-stage1", src, f"output_dir={tmp_path}/s1", "max_steps=1"]) == 0
    assert main(["train", "tiny-stage2", src, f"output_dir={tmp_path}/lora", f"init_from={tmp_path}/s1/final",
                 "max_steps=2", "stage.lora.r=4", "stage.lr=1e-2"]) == 0  # fmt: skip
    merged = weights(tmp_path / "lora/final")
    base = weights(tmp_path / "s1/final")
    assert not any("lora" in k for k in merged) and merged.keys() == base.keys()
    assert any(not torch.equal(merged[k], base[k]) for k in merged if k.startswith("language_model."))
    assert all(torch.equal(merged[k], base[k]) for k in merged if "embed_tokens" in k or "norm" in k)


def test_non_finite_loss_stops_with_step_and_ids(data, tmp_path, capsys):
    code = main(["train", "tiny-stage1", synth.source_override(data), f"output_dir={tmp_path}/nan",
                 "stage.lr=1e30", "stage.max_grad_norm=1e30", "max_steps=4"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "loss is nan" in err.lower() and "samples of this step" in err and "'s0" in err


def test_yaml_reads_off_and_exponents_as_meant():
    config = load_config(TrainConfig, "tiny-stage1", ["data.mixture=/x", "model_overrides={object_tokens: off}",
                                                      "stage={lr: 1e-4}"])  # fmt: skip
    assert config.model_overrides == {"object_tokens": "off"} and config.stage.lr == 1e-4


def test_resume_refuses_a_checkpoint_of_another_run(data, tmp_path):
    src = synth.source_override(data)
    args = ["train", "tiny-stage1", src, f"output_dir={tmp_path}/run", "save_every=1", "max_steps=1"]
    assert main(args) == 0
    assert main([*args[:-1], "max_steps=2"]) == 0  # more steps: the same run, resumed
    assert main([*args, "stage.lr=5e-4"]) == 2  # a different optimisation: refused, nothing overwritten


def test_qlora_trains_4bit_llm_adapters_and_exports_merged_full_precision(data, tmp_path):
    src = synth.source_override(data)
    assert main(["train", "tiny-stage1", src, f"output_dir={tmp_path}/s1", "max_steps=1"]) == 0
    from mgllava.config import load_config
    from mgllava.train.trainer import Trainer

    config = load_config(TrainConfig, "tiny-stage2", [src, f"output_dir={tmp_path}/q", f"init_from={tmp_path}/s1/final",
                                                      "max_steps=2", "stage.lora.r=4", "stage.lora.quantize_4bit=true",
                                                      "stage.lr=1e-2"])  # fmt: skip
    trainer = Trainer(config)
    layers = trainer.plain_model.language_model.base_model.model.layers
    assert type(layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    assert type(trainer.plain_model.projector[0]).__name__ == "Linear"  # new modules stay full precision
    trainer.run()
    merged, base = weights(tmp_path / "q/final"), weights(tmp_path / "s1/final")
    assert merged.keys() == base.keys() and all(v.dtype == torch.float32 for v in merged.values())
    changed = [k for k in merged if k.startswith("language_model.") and not torch.equal(merged[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # the adapted linears, merged in full precision
    assert (
        main(
            [
                "train",
                "tiny-stage1",
                src,
                f"output_dir={tmp_path}/bad",
                "stage.lora.r=4",
                "stage.lora.quantize_4bit=true",
            ]
        )
        == 2
    )  # fmt: skip  (QLoRA needs a saved folder)


def test_training_the_vision_tower_leaves_its_unused_clip_parameters_frozen():
    from mgllava import MGLlavaForConditionalGeneration
    from mgllava.train.config import StageConfig
    from mgllava.train.stages import apply_stage

    from ..model.test_hf_common import MGLlavaModelTester

    tester = MGLlavaModelTester()
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = MGLlavaForConditionalGeneration(config)
    stage = StageConfig(name="all", trainable=["vision_tower", "high_res_tower", "new_modules", "language_model"], lr=1e-3,
                        global_batch_size=2, per_device_batch_size=2)  # fmt: skip
    apply_stage(model, stage)
    clip = model.vision_tower.clip
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    last = len(clip.encoder.layers) - 1  # unused at the paper's feature layer -2, as post_layernorm
    assert frozen == {
        n for n, _ in model.named_parameters() if f"encoder.layers.{last}." in n or "post_layernorm" in n
    }
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == config.image_token_id, -100)
    model(**inputs, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # so DDP finds no unused


def test_chunked_loss_trains_as_the_plain_loss(data, tmp_path):
    src = synth.source_override(data)
    for name, extra in (("plain", []), ("chunked", ["loss_chunk_tokens=3"])):
        assert (
            main(["train", "tiny-stage1", src, f"output_dir={tmp_path}/{name}", "max_steps=2", *extra]) == 0
        )
    plain, chunked = weights(tmp_path / "plain/final"), weights(tmp_path / "chunked/final")
    assert plain.keys() == chunked.keys()
    for key, value in plain.items():  # the same updates, float32 summation order apart
        torch.testing.assert_close(
            chunked[key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}"
        )
    with pytest.raises((ValueError, ConfigError), match="loss_chunk_tokens must be >= 1"):
        load_config(TrainConfig, "tiny-stage1", [src, "loss_chunk_tokens=0"])


def test_bf16_runs_store_frozen_towers_in_bf16_and_export_fp32(data, tmp_path):
    from mgllava.train.plan import plan

    src = synth.source_override(data)
    overrides = [src, "precision=bf16", "max_steps=1"]
    assert main(["train", "tiny-stage1", *overrides, f"output_dir={tmp_path}/bf16"]) == 0
    exported = weights(tmp_path / "bf16/final")
    towers = [v for k, v in exported.items() if k.startswith(("vision_tower.", "high_res_tower."))]
    assert towers and all(v.dtype == torch.float32 for v in exported.values())
    assert all(torch.equal(v, v.bfloat16().float()) for v in towers)  # the bf16 values they trained with
    new = [v for k, v in exported.items() if k.startswith("projector.")]
    assert not all(torch.equal(v, v.bfloat16().float()) for v in new)  # what trains stays fp32
    args = ["data.sources=[]", "init_from=null", "stage.requires_init=false"]
    fp32 = plan(load_config(TrainConfig, "tiny-stage1", [*args, "precision=fp32"]), 1, 80, "t")
    bf16 = plan(load_config(TrainConfig, "tiny-stage1", [*args, "precision=bf16"]), 1, 80, "t")
    tower_elements = sum(v.numel() for v in towers)
    assert fp32.parameters - bf16.parameters == 2 * tower_elements  # 4 -> 2 bytes each, nothing else


def test_a_stage_started_from_a_folder_trains_in_training_mode_with_checkpointing(data, tmp_path):
    """`from_pretrained` returns a model in eval mode, where transformers skips gradient checkpointing: a stage
    from a folder must still recompute each decoder layer in the backward (each layer's forward runs twice)."""
    from mgllava.config import load_config
    from mgllava.train.trainer import Trainer

    src = synth.source_override(data)
    assert main(["train", "tiny-stage1", src, f"output_dir={tmp_path}/s1", "max_steps=1"]) == 0
    config = load_config(TrainConfig, "tiny-stage2", [src, f"output_dir={tmp_path}/s2", f"init_from={tmp_path}/s1/final",
                                                      "max_steps=1", "gradient_checkpointing=true"])  # fmt: skip
    trainer = Trainer(config)
    assert all(module.training for module in trainer.model.modules())
    layers = trainer.plain_model.language_model.layers
    calls = []
    # a submodule's hooks: transformers checkpoints the layer's `forward`, so the layer's own hooks run once
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a: calls.append(m)) for layer in layers]
    trainer.train_step([next(iter(trainer.loader()))])
    for handle in handles:
        handle.remove()
    assert len(calls) == 2 * len(layers)  # the forward, then the recompute in the backward
