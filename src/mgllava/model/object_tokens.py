"""How object features enter the LLM (docs/design.md sections 1 and 5, and the paper's ablations).

Given one image's projected image rows V (N, H) and object rows O (n, H):

- "concat" (the paper): rows `[V; O]`, each object its own token, in box order.
- "cross_attn_b2f": box-to-fused, objects attend to the image rows, `[V; O + attn(O, V)]`.
- "cross_attn_f2b": fused-to-box, image rows attend to the objects, `[V + attn(V, O)]` - no object tokens.
- "off": rows `V`; no boxes are used.

The attention blocks start at zero (identity), so each variant starts as "concat" (b2f) or as "off"
(f2b), the way the Conv-Gate starts as "none".
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import CrossAttention, default_heads
from .configuration import OBJECT_TOKENS


class ObjectMixer(nn.Module):
    def __init__(self, mode: str, hidden: int) -> None:
        super().__init__()
        if mode not in OBJECT_TOKENS:
            raise ValueError(f"unknown object_tokens {mode!r}; expected one of: {', '.join(OBJECT_TOKENS)}")
        self.mode = mode
        self.attend = (
            CrossAttention(hidden, hidden, default_heads(hidden)) if mode.startswith("cross") else None
        )

    def forward(self, image_rows: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """One image: (N, H) image rows and (n, H) object rows -> its visual rows."""
        if self.mode == "off":
            return image_rows
        if self.mode == "concat":
            return torch.cat([image_rows, objects])
        if self.mode == "cross_attn_b2f":
            mixed = self.attend(objects[None], image_rows[None])[0] if len(objects) else objects
            return torch.cat([image_rows, mixed])
        return self.attend(image_rows[None], objects[None])[0] if len(objects) else image_rows
