"""Conv-Gate fusion (docs/design.md section 4)."""

import torch

from mgllava.model.fusion import ConvGateFusion, IdentityFusion, build_fusion


def test_conv_gate_is_identity_at_init():
    fusion = ConvGateFusion(low_dim=16, high_dim=24)
    low, high = torch.randn(2, 36, 16), torch.randn(2, 24, 6, 6)
    assert torch.equal(fusion(low, [high]), low)


def test_parameter_names_match_the_reference():
    names = {n.rsplit(".", 1)[0] for n, _ in ConvGateFusion(8, 12).named_parameters()}
    assert names == {"slow_conv", "slow_proj", "fast_conv", "fast_proj", "gate.0", "gate.2"}


def test_forward_follows_the_formula():
    torch.manual_seed(1)
    fusion = ConvGateFusion(8, 12)
    for p in fusion.parameters():
        torch.nn.init.normal_(p, std=0.3)
    low, high = torch.randn(3, 16, 8), torch.randn(3, 12, 4, 4)
    h = fusion.slow_proj(torch.nn.functional.gelu(fusion.slow_conv(high))).flatten(2).transpose(1, 2)
    grid = low.transpose(1, 2).reshape(3, 8, 4, 4)
    lo = (
        (grid + fusion.fast_proj(torch.nn.functional.gelu(fusion.fast_conv(grid)))).flatten(2).transpose(1, 2)
    )
    gate = torch.stack(
        [fusion.gate(torch.cat([lo[b], h[b]], -1).mean(0)) for b in range(3)]
    )  # one scalar per image
    expected = lo + torch.tanh(gate)[:, None] * h
    torch.testing.assert_close(fusion(low, [high]), expected)
    assert gate.shape == (3, 1)


def test_build_fusion_kinds():
    assert isinstance(build_fusion("none", 8, [4, 12]), IdentityFusion)
    assert isinstance(build_fusion("conv_gate", 8, [4, 12]), ConvGateFusion)
