"""Torch dtypes by the names the command line and configs use (`auto`: as the checkpoint was saved)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """A dtype given by name (`DTYPES`) or as a torch dtype; None means as saved."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
