"""Projectors into the LLM's embedding space (docs/design.md section 1): Linear(in, H), GELU, Linear(H, H).

`projector`: fused image tokens (B, N, C_lo) -> (B, N, H); `box_projector`: pooled object features
(n, sum C_s) -> (n, H). Keys `<name>.0.*` and `<name>.2.*` correspond to the reference's
`<name>.model.0.*` / `.model.2.*` (its `bbox_projector` is our `box_projector`).
"""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN


def build_projector(in_dim: int, hidden: int, act: str = "gelu") -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), ACT2FN[act], nn.Linear(hidden, hidden))
