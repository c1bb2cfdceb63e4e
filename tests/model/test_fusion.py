"""Conv-Gate fusion (docs/design.md section 4)."""

import pytest
import torch

from mgllava.model.fusion import ConvGateFusion, IdentityFusion, build_fusion


def test_conv_gate_is_identity_at_init():
    fusion = ConvGateFusion(low_dim=16, high_dim=24)
    low, high = torch.randn(2, 36, 16), torch.randn(2, 24, 6, 6)
    assert torch.equal(fusion(low, [high]), low)


def test_parameter_names_match_the_reference():
    names = {n.rsplit(".", 1)[0] for n, _ in ConvGateFusion(8, 12).named_parameters()}
    assert names == {"slow_conv", "slow_proj", "fast_conv", "fast_proj", "gate.0", "gate.2"}


def formula(fusion, low, high):
    """docs/design.md section 4, op by op, one image at a time for the gate."""
    n, _, c = low.shape
    side = int(low.shape[1] ** 0.5)
    h = fusion.slow_proj(torch.nn.functional.gelu(fusion.slow_conv(high))).flatten(2).transpose(1, 2)
    grid = low.transpose(1, 2).reshape(n, c, side, side)
    lo = (
        (grid + fusion.fast_proj(torch.nn.functional.gelu(fusion.fast_conv(grid)))).flatten(2).transpose(1, 2)
    )
    gate = torch.stack([fusion.gate(torch.cat([lo[b], h[b]], -1).mean(0)) for b in range(n)])  # one per image
    return lo + torch.tanh(gate)[:, None] * h, gate


# bf16 (pure, and float32 weights under CPU bf16 autocast) against the formula in float32: within the float32
# run's difference plus BF16_SPREAD bf16 ulps (2**-8) of the largest output (measured: 1.0 ulp in pure bf16,
# 0.8 under autocast; the float32 difference is 0).
BF16_SPREAD = 4


@pytest.mark.parametrize("mode", ["float32", "bf16", "autocast"])
def test_forward_follows_the_formula(mode):
    torch.manual_seed(1)
    fusion = ConvGateFusion(8, 12)
    for p in fusion.parameters():
        torch.nn.init.normal_(p, std=0.3)
    low, high = torch.randn(3, 16, 8), torch.randn(3, 12, 4, 4)
    expected, gate = formula(fusion, low, high)
    assert gate.shape == (3, 1)
    if mode == "float32":
        torch.testing.assert_close(fusion(low, [high]), expected)
        return
    fp32_diff = (fusion(low, [high]) - expected).abs().max()
    if mode == "bf16":
        fusion, low, high = fusion.bfloat16(), low.bfloat16(), high.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        got = fusion(low, [high])
    assert got.dtype == torch.bfloat16 or mode == "autocast"
    assert (got.float() - expected).abs().max() <= fp32_diff + BF16_SPREAD * 2.0**-8 * expected.abs().max()


def test_build_fusion_kinds():
    assert isinstance(build_fusion("none", 8, [4, 12]), IdentityFusion)
    assert isinstance(build_fusion("conv_gate", 8, [4, 12]), ConvGateFusion)
