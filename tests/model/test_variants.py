"""The paper's ablation variants as real options: each starts where it should, trains a step and generates."""

import pytest
import torch
from PIL import Image

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.model.configuration import FUSIONS, OBJECT_TOKENS
from mgllava.model.fusion import PatchInfoMining, build_fusion

VARIANTS = [(f, "concat") for f in FUSIONS] + [("conv_gate", o) for o in OBJECT_TOKENS if o != "concat"]


def stages(b=2, dims=(4, 6, 8, 12), grid=3):
    return [torch.randn(b, c, grid * 2 ** (3 - i), grid * 2 ** (3 - i)) for i, c in enumerate(dims)]


@pytest.mark.parametrize("kind", ["conv_gate", "patch_info_mining", "resampler", "none"])
def test_residual_fusions_start_as_the_identity(kind):
    low = torch.randn(2, 9, 64)
    assert torch.equal(build_fusion(kind, 64, [4, 6, 8, 12])(low, stages()), low)


def test_concat_fusion_appends_last_stage_channels():
    low, maps = torch.randn(2, 9, 16), stages()
    out = build_fusion("concat", 16, [4, 6, 8, 12])(low, maps)
    assert out.shape == (2, 9, 28)
    assert torch.equal(out[..., 16:], maps[-1].flatten(2).transpose(1, 2))


def test_patch_info_mining_attends_to_the_cells_under_each_token():
    torch.manual_seed(0)
    fusion = PatchInfoMining(8, 8)
    for p in fusion.parameters():
        torch.nn.init.normal_(p, std=0.5)
    low, maps = torch.randn(1, 9, 8), stages(b=1)
    fine = maps[-2][0]  # (8, 6, 6): a 2 x 2 block of cells under each of the 3 x 3 tokens
    att = fusion.attend
    expected = []
    for t in range(9):
        row, col = divmod(t, 3)
        cells = fine[:, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].reshape(8, 4).T  # (4, 8)
        weights = torch.softmax(att.q(low[0, t]) @ att.k(cells).T / 8**0.5, dim=-1)
        expected.append(low[0, t] + att.out(weights @ att.v(cells)))
    torch.testing.assert_close(fusion(low, maps)[0], torch.stack(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion, objects", VARIANTS)
def test_variant_trains_one_step_and_generates(fusion, objects):
    torch.manual_seed(0)
    config = MGLlavaConfig.from_preset("tiny", fusion=fusion, object_tokens=objects)
    model = MGLlavaForConditionalGeneration(config)
    tokenizer = MGLlavaProcessor.from_preset("tiny").tokenizer
    processor = MGLlavaProcessor.for_config(config, tokenizer, template="vicuna")
    image = Image.new("RGB", (70, 50), (200, 40, 40))
    boxes = [[[5, 5, 30, 30], [40, 10, 65, 45]]]
    conv = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A red box."},
    ]
    batch = processor.apply_chat_template(conv, tokenize=True, return_dict=True, images=[image], boxes=boxes)
    rows = int((batch["input_ids"] == config.image_token_id).sum())
    assert rows == 16 + (2 if objects in ("concat", "cross_attn_b2f") else 0)
    trainable = [
        p for n, p in model.named_parameters() if not n.startswith(("vision_tower", "high_res", "language"))
    ]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True))
    model.eval()
    prompt = processor.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=True, return_dict=True,
                                           images=[image], boxes=boxes)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 3


ALL_VARIANTS = [(f, o) for f in FUSIONS for o in OBJECT_TOKENS]


@pytest.mark.parametrize("fusion, objects", ALL_VARIANTS)
def test_every_new_module_can_be_named_in_a_stage_and_trains(fusion, objects):
    """The stage's module names come from the model: every parameterised module outside the two towers and
    the LLM is in `new_modules`, trains when named (alone or through the group) and nothing else does."""
    from mgllava.model.modeling import NEW_MODULES, PRETRAINED_MODULES
    from mgllava.train.config import StageConfig
    from mgllava.train.stages import apply_stage

    torch.manual_seed(0)
    config = MGLlavaConfig.from_preset("tiny", fusion=fusion, object_tokens=objects)
    model = MGLlavaForConditionalGeneration(config)
    own = [n for n, m in model.model.named_children() if n not in PRETRAINED_MODULES and list(m.parameters())]
    assert own and set(own) <= set(NEW_MODULES) and own == model.new_modules()
    processor = MGLlavaProcessor.for_config(config, MGLlavaProcessor.from_preset("tiny").tokenizer, "vicuna")
    image = Image.new("RGB", (70, 50), (200, 40, 40))
    conv = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Red."}]
    batch = processor.apply_chat_template(conv, tokenize=True, return_dict=True, images=[image],
                                          boxes=[[[5, 5, 30, 30], [40, 10, 65, 45]]])  # fmt: skip
    for names in [[n] for n in own] + [["new_modules"]]:
        stage = StageConfig("s", names, lr=1e-2, global_batch_size=1, per_device_batch_size=1)
        table = apply_stage(model, stage)
        expected = own if names == ["new_modules"] else names
        for name, modules in model.named_parts().items():
            params = [p for module in modules for p in module.parameters()]
            assert all(p.requires_grad == (name in expected) for p in params), (names, name)
            if name in expected:
                assert f"\n{name} " in table
        params = [p for p in model.parameters() if p.requires_grad]
        before = {n: [p.detach().clone() for p in getattr(model, n).parameters()] for n in expected}
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        for name in expected:
            after = list(getattr(model, name).parameters())
            assert any(not torch.equal(a, b) for a, b in zip(before[name], after, strict=True)), (names, name)


def test_a_stage_naming_a_module_the_variant_lacks_is_refused():
    from mgllava.train.config import StageConfig
    from mgllava.train.stages import apply_stage

    model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("tiny", object_tokens="off"))
    stage = StageConfig("s", ["box_projector"], lr=1e-3, global_batch_size=1, per_device_batch_size=1)
    with pytest.raises(
        ValueError, match=r"'box_projector' but this model \(fusion=conv_gate, object_tokens=off\)"
    ):
        apply_stage(model, stage)
