"""The high-res tower equals transformers' ConvNextModel, in its in-place inference path and with autograd, in
float32, under CPU bf16 autocast and in pure bf16."""

import pytest
import torch
from transformers import CLIPVisionConfig, ConvNextConfig, ConvNextModel

from mgllava.model.encoders import ConvNextBlock, HighResEncoder, LowResEncoder

CONFIG = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[2, 1, 3, 1], layer_norm_eps=1e-6, image_size=128,
                        layer_scale_init_value=0.5)  # fmt: skip


def towers():
    torch.manual_seed(0)
    ours = HighResEncoder(CONFIG).eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.2)
    theirs = ConvNextModel(CONFIG).eval()
    state = ours.state_dict()
    state |= {k: v for k, v in theirs.state_dict().items() if k.startswith("layernorm.")}  # pooling norm
    theirs.load_state_dict(state)
    return ours.requires_grad_(False), theirs.requires_grad_(False)


def test_inference_path_is_bit_identical_to_transformers_convnext():
    ours, theirs = towers()
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        expected = theirs(x, output_hidden_states=True).hidden_states[1:]
        got = ours(x)
    assert len(got) == 4
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


# bf16 runs of the two towers are compared bit for bit (same ops, same dtypes at the same points); each is also
# held to the float32 run: within BF16_SPREAD ulps of bf16 (2**-8) of the largest float32 value of the stage
# (measured: 2**-7.1 at most on this tower, so 4 ulps leaves a factor 2).
BF16_SPREAD = 4 * 2.0**-8


@pytest.mark.parametrize("mode", ["autocast", "bf16"])
def test_bf16_inference_path_is_bit_identical_to_transformers_convnext_run_the_same_way(mode):
    ours, theirs = towers()
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        fp32 = theirs(x, output_hidden_states=True).hidden_states[1:]
    if mode == "bf16":
        ours, theirs, x = ours.bfloat16(), theirs.bfloat16(), x.bfloat16()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        expected = theirs(x, output_hidden_states=True).hidden_states[1:]
        got = ours(x)
    for a, b, exact in zip(got, expected, fp32, strict=True):
        # under autocast the residual stream stays float32, as in ConvNextModel; pure bf16 is bf16 throughout
        assert a.dtype == b.dtype == (torch.float32 if mode == "autocast" else torch.bfloat16)
        assert torch.equal(a, b)
        assert (a.float() - exact).abs().max() <= BF16_SPREAD * exact.abs().max()


def test_in_place_block_leaves_its_input_alone():
    ours, _ = towers()
    block = next(m for m in ours.modules() if isinstance(m, ConvNextBlock))
    x = torch.randn(1, 8, 32, 32)
    before = x.clone()
    with torch.no_grad():
        out = block(x)
    assert torch.equal(x, before) and not torch.equal(out, x)


def test_trainable_tower_takes_the_autograd_path_and_gets_gradients():
    ours, theirs = towers()
    ours.requires_grad_(True)
    x = torch.randn(1, 3, 128, 128)
    got = ours(x)
    sum(s.sum() for s in got).backward()
    assert all(p.grad is not None for p in ours.parameters())
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True).hidden_states[1:]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.detach(), b)


@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_clip_runs_only_the_layers_its_feature_layer_needs(feature_layer):
    """The low-res forward equals CLIP's own hidden state at the feature layer, bit for bit, and the layers
    after it never run."""
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14)  # fmt: skip
    torch.manual_seed(0)
    encoder = LowResEncoder(config, feature_layer).eval()
    ran = []
    for k, layer in enumerate(encoder.clip.encoder.layers):
        layer.register_forward_hook(lambda *_, k=k: ran.append(k))
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        fast = encoder(pixels)
        assert ran == list(range(encoder.layers_used)) and encoder.layers_used == feature_layer % 4
        full = encoder.select(encoder.clip_outputs(pixels))
    assert fast.shape == (2, 16, 32) and torch.equal(fast, full)
