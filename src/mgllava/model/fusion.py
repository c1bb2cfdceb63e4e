"""Fusion of the high-res ConvNeXt maps into the low-res CLIP tokens (docs/design.md section 4), and its ablations.

Every fusion maps low-res tokens L (B, N = g*g, C_lo) and the ConvNeXt stage maps [(B, C_s, H_s, W_s)] to
tokens (B, N, out_dim) that the projector reads.

`ConvGateFusion` (the paper's module, `fusion="conv_gate"`), on the last stage H (B, C_hi, g, g):

    h   = slow_proj(gelu(slow_conv(H)))                      -> (B, N, C_lo)
    l   = grid(L) + fast_proj(gelu(fast_conv(grid(L))))     -> (B, N, C_lo)
    g   = gate(mean_over_tokens(cat([l, h], -1)))            one scalar per image
    out = l + tanh(g) * h

Its parameter names match the reference's `fuse_module.*` keys one to one; both `*_proj` layers start at
zero, so it is exactly the identity at initialisation.

The paper's ablation alternatives (docs/design.md section 12), each a real option:
- "none": the LLaVA-1.5 baseline, L unchanged (the high-res branch is not used for image tokens).
- "concat": channel concatenation `cat([L, tokens(H)], -1)`, out_dim C_lo + C_hi.
- "patch_info_mining" (Mini-Gemini): each low-res token attends to the r x r cells of the finer stage
  (grid r*g) that lie under it; residual, zero-initialised output.
- "resampler": the low-res tokens, as queries, attend to every last-stage high-res token; residual,
  zero-initialised output (a resampler whose queries start from the low-res tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, default_heads
from .configuration import FUSIONS
from .init import init_leaf, tagged


def _tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


class IdentityFusion(nn.Module):
    """Fusion "none": returns the low-res tokens unchanged."""

    def __init__(self, low_dim: int) -> None:
        super().__init__()
        self.out_dim = low_dim

    def forward(self, low: torch.Tensor, stages: list[torch.Tensor] | None) -> torch.Tensor:
        return low


class ConvGateFusion(nn.Module):
    def __init__(self, low_dim: int, high_dim: int) -> None:
        super().__init__()
        self.out_dim = low_dim
        self.slow_conv = tagged(nn.Conv2d(high_dim, high_dim, 1), "xavier")
        self.slow_proj = tagged(nn.Conv2d(high_dim, low_dim, 1), "zeros")
        self.fast_conv = tagged(nn.Conv2d(low_dim, low_dim, 7, padding=3, groups=low_dim), "xavier")
        self.fast_proj = tagged(nn.Conv2d(low_dim, low_dim, 1), "zeros")
        self.gate = nn.Sequential(
            tagged(nn.Linear(2 * low_dim, low_dim // 2), "torch"),
            nn.GELU(),
            tagged(nn.Linear(low_dim // 2, 1), "torch"),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """docs/design.md section 4 init: xavier convs, zero projections, zero biases; the gate keeps PyTorch's."""
        for layer in self.modules():
            if hasattr(layer, "init_rule"):
                init_leaf(layer)

    def forward(self, low: torch.Tensor, stages: list[torch.Tensor]) -> torch.Tensor:
        high = stages[-1]
        b, n, c = low.shape
        side = high.shape[-1]
        if high.shape[-2] * side != n:
            raise ValueError(f"high-res grid {tuple(high.shape[-2:])} does not match {n} low-res tokens")
        h = _tokens(self.slow_proj(F.gelu(self.slow_conv(high))))  # (B, N, C_lo)
        grid = low.transpose(1, 2).reshape(b, c, high.shape[-2], side)  # (B, C_lo, g, g)
        grid = grid + self.fast_proj(F.gelu(self.fast_conv(grid)))
        low_tokens = _tokens(grid)  # (B, N, C_lo)
        gate = self.gate(torch.cat([low_tokens, h], dim=-1).mean(dim=1)).unsqueeze(1)  # (B, 1, 1)
        return low_tokens + torch.tanh(gate) * h


class ConcatFusion(nn.Module):
    """Fusion "concat": the last stage's tokens appended on the channel axis."""

    def __init__(self, low_dim: int, high_dim: int) -> None:
        super().__init__()
        self.out_dim = low_dim + high_dim

    def forward(self, low: torch.Tensor, stages: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([low, _tokens(stages[-1]).to(low.dtype)], dim=-1)  # (B, N, C_lo + C_hi)


class PatchInfoMining(nn.Module):
    """Fusion "patch_info_mining" (Mini-Gemini): attention of each low-res token over its r x r sub-cells of
    the stage at `stage_index` (grid r * g)."""

    def __init__(self, low_dim: int, high_dim: int, stage_index: int = -2) -> None:
        super().__init__()
        self.out_dim = low_dim
        self.stage_index = stage_index
        self.attend = CrossAttention(low_dim, high_dim, default_heads(low_dim))

    def forward(self, low: torch.Tensor, stages: list[torch.Tensor]) -> torch.Tensor:
        fine = stages[self.stage_index]  # (B, C, r*g, r*g)
        b, n, c = low.shape
        g = round(n**0.5)
        r = fine.shape[-1] // g
        if r * g != fine.shape[-1]:
            raise ValueError(f"stage grid {fine.shape[-1]} is not a multiple of the low-res grid {g}")
        cells = fine.unfold(2, r, r).unfold(3, r, r)  # (B, C, g, g, r, r)
        cells = cells.permute(0, 2, 3, 4, 5, 1).reshape(b * n, r * r, fine.shape[1])  # (B*N, r*r, C)
        mined = self.attend(low.reshape(b * n, 1, c), cells.to(low.dtype))  # (B*N, 1, C_lo)
        return mined.view(b, n, c)


class ResamplerFusion(nn.Module):
    """Fusion "resampler": low-res tokens attend to all last-stage high-res tokens."""

    def __init__(self, low_dim: int, high_dim: int) -> None:
        super().__init__()
        self.out_dim = low_dim
        self.attend = CrossAttention(low_dim, high_dim, default_heads(low_dim))

    def forward(self, low: torch.Tensor, stages: list[torch.Tensor]) -> torch.Tensor:
        return self.attend(low, _tokens(stages[-1]).to(low.dtype))


def build_fusion(kind: str, low_dim: int, stage_dims: list[int]) -> nn.Module:
    """The fusion named `kind` for low-res width `low_dim` and ConvNeXt stage widths `stage_dims`."""
    builders = {
        "none": lambda: IdentityFusion(low_dim),
        "conv_gate": lambda: ConvGateFusion(low_dim, stage_dims[-1]),
        "concat": lambda: ConcatFusion(low_dim, stage_dims[-1]),
        "patch_info_mining": lambda: PatchInfoMining(low_dim, stage_dims[-2]),
        "resampler": lambda: ResamplerFusion(low_dim, stage_dims[-1]),
    }
    if kind not in builders:
        raise ValueError(f"unknown fusion {kind!r}; expected one of: {', '.join(FUSIONS)}")
    return builders[kind]()
