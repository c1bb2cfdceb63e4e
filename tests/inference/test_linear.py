"""oneDNN-packed linear layers: the same results as F.linear (fp32 and bf16, any input shape), what is packed
and what is left alone, the way back, clear errors, and the engine packing its model with unchanged answers."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mgllava.inference import GenerationSettings
from mgllava.inference import linear as packing
from mgllava.inference.linear import PackedLinear, pack_linears, unpack_linears

from ..serving import ShapesProposer, ask, data_url, scene, tiny_engine, tiny_parts

pytestmark = pytest.mark.skipif(packing.packing_unavailable() is not None, reason="no oneDNN in this torch")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_f_linear_on_every_input_shape(dtype, bias):
    layer = nn.Linear(48, 80, bias=bias, dtype=dtype)
    packed = PackedLinear(layer)
    inputs = [
        torch.randn(1, 48),  # a decode step's row
        torch.randn(3, 7, 48),  # (B, N, C)
        torch.randn(2, 5, 6, 48),  # (B, H, W, C): ConvNeXt's pointwise layers
        torch.randn(48, 9).t(),  # not contiguous
        torch.randn(9, 96)[:, ::2],  # strided
        torch.randn(0, 48),  # no rows
    ]
    with torch.no_grad():
        for x in inputs:
            x = x.to(dtype)
            got, want = packed(x), F.linear(x, layer.weight, layer.bias)
            assert got.shape == want.shape and got.dtype == dtype
            torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_packing_keeps_the_module_contract_and_unpacking_restores_the_weights():
    model, _ = tiny_parts()
    model.model.language_model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a frozen layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert pack_linears(model) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    head = model.get_output_embeddings()
    assert isinstance(head, PackedLinear) and head.out_features == model.config.text_config.vocab_size
    assert "weight" not in dict(head.named_parameters())  # no second copy of the matrix
    with pytest.raises(AttributeError, match="unpack_linears"):
        head.weight  # noqa: B018 - an in-place edit of a copy would vanish silently
    assert pack_linears(model) == 0  # already packed
    assert unpack_linears(model) == linears
    assert not model.model.language_model.layers[0].mlp.up_proj.weight.requires_grad  # as it was
    assert model.model.language_model.layers[0].mlp.down_proj.weight.requires_grad
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_model_gives_the_same_logits(dtype):
    model, processor = tiny_parts()
    model = model.to(dtype).eval()
    inputs = processor.apply_chat_template(
        ask("What is in the image?", data_url(scene(1))), add_generation_prompt=True, tokenize=True,
        return_dict=True, boxes=[[[2, 3, 30, 40]]],
    )  # fmt: skip
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        want = model(**inputs).logits.float()
        assert pack_linears(model, (dtype,)) > 0
        got = model(**inputs).logits.float()
    scale = want.abs().max()
    assert float((got - want).abs().max() / scale) < (1e-5 if dtype == torch.float32 else 3e-2)


def test_what_is_left_alone():
    class Adapter(nn.Linear):  # a subclass keeps its own forward (quantised or adapter layers)
        pass

    hooked = nn.Linear(8, 8)
    hooked.register_forward_hook(lambda *_: None)
    offloaded = nn.Linear(8, 8)
    offloaded._hf_hook = object()  # accelerate's hooks wrap forward instead of registering
    model = nn.Sequential(
        nn.Linear(8, 8, dtype=torch.float16),
        Adapter(8, 8),
        hooked,
        offloaded,
        nn.Linear(8, 8, device="meta"),
        nn.Linear(8, 8),
    )
    assert pack_linears(model) == 1
    names = ["Linear", "Adapter", "Linear", "Linear", "Linear", "PackedLinear"]
    assert [type(m).__name__ for m in model] == names
    bf16 = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16))
    assert pack_linears(bf16, (torch.float32,)) == 0 and pack_linears(bf16) == 1
    with pytest.raises(ValueError, match="float16"):
        pack_linears(bf16, (torch.float16,))


def test_an_unusable_torch_packs_nothing_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(packing, "packing_unavailable", lambda: "this torch has no oneDNN (test)")
    model = nn.Sequential(nn.Linear(8, 8))
    with caplog.at_level(logging.WARNING, logger=packing.__name__):
        assert pack_linears(model) == 0
    assert type(model[0]) is nn.Linear and "this torch has no oneDNN (test)" in caplog.text


def test_a_packed_call_that_disagrees_packs_nothing(monkeypatch, caplog):
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: torch.zeros(x.shape[0], self.out_features))
    model = nn.Sequential(nn.Linear(8, 8))
    with caplog.at_level(logging.WARNING, logger=packing.__name__):
        assert pack_linears(model) == 0
    assert type(model[0]) is nn.Linear and "differs from F.linear" in caplog.text


def test_a_wrong_input_is_refused_by_name():
    packed = PackedLinear(nn.Linear(8, 4))
    with pytest.raises(
        RuntimeError, match=r"PackedLinear\(8, 4\) holds a torch.float32 weight .* torch.bfloat16"
    ):
        packed(torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="on meta"):
        packed(torch.randn(2, 8, device="meta"))


def test_the_engine_packs_its_model_and_answers_as_before():
    plain = tiny_engine(ShapesProposer(), pack_linear=False)
    packed = tiny_engine(ShapesProposer())
    assert plain.packed_linears == 0 and packed.packed_linears > 0
    assert isinstance(packed.model.get_output_embeddings(), PackedLinear)
    settings = GenerationSettings(max_new_tokens=12)
    for messages in (ask("What shape is in the image?", data_url(scene(1))), ask("Is there a circle?")):
        want = plain.chat(messages, settings=settings)
        got = packed.chat(messages, settings=settings)
        assert got.token_ids == want.token_ids and got.text == want.text
