"""Loading the real formats (CLIP folder, OpenCLIP ConvNeXt, LLM folder, reference .pth), every key accounted."""

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel

from mgllava.cli import main
from mgllava.convert.assemble import (
    CheckpointError,
    assemble,
    load_clip_vision,
    load_open_clip_convnext,
    read_state_dict,
)
from mgllava.convert.folder import write_folder

from .. import formats


def test_clip_folder_loads_with_text_tower_accounted(tiny_components):
    vision = load_clip_vision(tiny_components["clip"])
    reference = CLIPVisionModel.from_pretrained(tiny_components["clip"])
    for (name, a), (_, b) in zip(vision.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_clip_folder_with_foreign_keys_is_refused(tmp_path):
    folder = formats.write_clip_folder(tmp_path / "clip")
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    state["vision_model.extra_adapter.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): (vision_model\.)?extra_adapter.weight"):
        load_clip_vision(folder)


@pytest.mark.parametrize("use_safetensors", [False, True])
def test_open_clip_convnext_stage_outputs_are_bit_identical_to_timm(tmp_path, use_safetensors):
    name = "open_clip_model.safetensors" if use_safetensors else "open_clip_pytorch_model.bin"
    path = formats.write_open_clip_convnext(tmp_path / name, safetensors=use_safetensors)
    config, encoder = load_open_clip_convnext(tmp_path if use_safetensors else path, image_size=128)
    assert list(config.hidden_sizes) == list(formats.TRUNK_DIMS) and list(config.depths) == list(
        formats.TRUNK_DEPTHS
    )
    trunk = timm.create_model(
        "convnext_large",
        pretrained=False,
        depths=formats.TRUNK_DEPTHS,
        dims=formats.TRUNK_DIMS,
        num_classes=0,
        global_pool="",
    )
    state = read_state_dict(path)
    trunk.load_state_dict(
        {k[len("visual.trunk.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    )
    trunk.eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ours = encoder(x)
        _, theirs = trunk.forward_intermediates(x, intermediates_only=False)
    assert [tuple(o.shape) for o in ours] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 24, 8, 8), (2, 32, 4, 4)]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_open_clip_missing_and_unknown_keys_are_listed(tmp_path):
    state = formats.open_clip_convnext_state()
    del state["visual.trunk.stages.1.blocks.0.gamma"]
    state["visual.trunk.stages.0.blocks.0.mystery"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match="mystery"):
        load_open_clip_convnext(tmp_path / "bad.bin", image_size=128)
    del state["visual.trunk.stages.0.blocks.0.mystery"]
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(
        CheckpointError, match=r"missing \(1\): encoder.stages.1.layers.0.layer_scale_parameter"
    ):
        load_open_clip_convnext(tmp_path / "bad.bin", image_size=128)


class Payload:  # a class the weights-only unpickler does not allow
    pass


def test_pickles_needing_arbitrary_classes_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"Payload.*trust_pickle"):
        read_state_dict(tmp_path / "evil.pth")
    assert "state_dict" in read_state_dict(tmp_path / "evil.pth", trust_pickle=True)
    (tmp_path / "junk.bin").write_bytes(pickle.dumps("x")[:3])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(tmp_path / "junk.bin")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_state_dict(tmp_path / "missing.bin")


def test_assemble_from_components_then_auto_load_and_generate(tiny_components, tmp_path):
    model, processor = assemble(**tiny_components, template="vicuna", high_res_image_size=128)
    n_vocab = len(formats.llm_tokenizer())
    assert model.config.image_token_id == n_vocab  # <image> appended to a vocabulary that lacked it
    assert model.get_input_embeddings().weight.shape[0] == n_vocab + 1
    assert model.get_input_embeddings().weight[-1].abs().sum() == 0
    folder = write_folder(model, processor, tmp_path / "out")
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    from PIL import Image

    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "<image>What is in the image?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        images=[Image.new("RGB", (70, 40), (0, 90, 200))],
        boxes=[[[5, 5, 30, 30]]],
    )
    with torch.no_grad():
        a = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        b = loaded.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    assert model.config.image_token_id not in a[0, inputs["input_ids"].shape[1] :].tolist()


def test_reference_checkpoint_round_trip(tiny_components, tmp_path):
    source, _ = assemble(**tiny_components, template="vicuna", high_res_image_size=128)
    with torch.no_grad():
        for p in source.parameters():  # make the new modules distinct from any fresh init
            p.add_(torch.randn_like(p) * 0.01)
        source.language_model.get_input_embeddings().weight[-1] = 0
        source.lm_head.weight[-1] = 0
    pth = tmp_path / "mg_llava.pth"
    state = formats.reference_state(source)
    torch.save({"state_dict": state}, pth)
    loaded, _ = assemble(**tiny_components, template="vicuna", high_res_image_size=128, reference=pth)
    for name, value in source.state_dict().items():
        if not name.startswith(("model.vision_tower.", "model.high_res_tower.")):
            assert torch.equal(loaded.state_dict()[name], value), name
    state["module.llm.model.norm.extra"] = torch.zeros(1)
    del state["module.fuse_module.gate.0.bias"]
    torch.save({"state_dict": state}, pth)
    with pytest.raises(CheckpointError, match=r"missing.*gate\.0\.bias|unexpected.*norm\.extra"):
        assemble(**tiny_components, template="vicuna", high_res_image_size=128, reference=pth)


def test_reference_keys_outside_the_known_modules_are_listed(tiny_components, tmp_path):
    torch.save(
        {"projector.model.0.weight": torch.zeros(1), "llm.base_model.lora_A.weight": torch.zeros(1)},
        tmp_path / "lora.pth",
    )
    with pytest.raises(CheckpointError, match="a LoRA checkpoint"):
        assemble(
            **tiny_components, template="vicuna", high_res_image_size=128, reference=tmp_path / "lora.pth"
        )


def _assemble(tiny_components, clip, out, *extra):
    return main(["assemble", "--clip", str(clip), "--convnext", str(tiny_components["convnext"]),
                 "--llm", str(tiny_components["llm"]), "--template", "vicuna", *extra, "--out", str(out)])  # fmt: skip


def test_cli_assemble_writes_a_loadable_folder(tiny_components, tmp_path, capsys):
    out = tmp_path / "cli"
    code = _assemble(
        tiny_components, tiny_components["clip"], out, "--high-res-size", "128", "--dtype", "float32"
    )
    assert code == 0 and "wrote" in capsys.readouterr().out
    assert AutoModelForImageTextToText.from_pretrained(out).config.model_type == "mg_llava"
    code = _assemble(tiny_components, tmp_path / "nope", out)
    assert code == 2
