"""Linear layers with oneDNN-packed weights, for CPU inference.

    nn.Linear (weight (out, in), fp32 or bf16, on the CPU) --pack_linears--> PackedLinear: the weight
        reordered once into oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, an opaque
        tensor), each call one `torch.ops.mkldnn._linear_pointwise(x (..., in), packed, bias)` -> (..., out)

Why: `F.linear` on the CPU goes to MKL for fp32, and on this project's bench machine (AMD EPYC, AVX-512)
MKL runs fp32 matmuls at less than half the rate oneDNN reaches (167 against 376 GFLOP/s at 2048^3, and 47
against 166 GFLOP/s at the 16 rows of a decode step; bench/bench_linear.py measures it on any machine).
The packed weight also skips the per-call reorder that an unpacked oneDNN call pays, which matters at the
few rows of a decode step in bf16 as well. vLLM's CPU backend packs its linear layers the same way
(`create_onednn_mm`); transformers' models call `F.linear`.

What it changes: the weight is no longer a parameter (PackedLinear keeps the bias, and a 0-element buffer
in the weight's dtype so that `next(module.parameters() or buffers())` still tells dtype and device);
reading `weight` is refused with an error that says how to get it back (a copy would let in-place edits
vanish silently). The results are fp32 (or bf16) matmuls summed in another order: they differ from
`F.linear` by rounding (about 1e-6 relative in fp32), as MKL's own results differ between batch sizes. The
packed layer is for inference only (no autograd) and on the CPU only; `unpack_linears` gives the model its
nn.Linear layers back (before training it, saving it or moving it).

Threads: in a model thread (the serving batcher's), the speed holds only if no other thread of the process
ever ran a parallel region with more than one OpenMP thread; otherwise small calls run about 2x slower
(docs/server.md, "Threads"; `mgllava serve` sets every other thread to one before it loads the model).

`pack_linears` packs only plain `nn.Linear` modules (not subclasses: quantised or adapter layers keep
their own forward; not layers with hooks, accelerate's offload hooks included) with fp32 or bf16 weights on
the CPU, and only when this torch has the oneDNN ops and the
first packed layer agrees with `F.linear` on a probe input; otherwise it packs nothing and says why.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PackedLinear", "pack_linears", "packing_unavailable", "unpack_linears"]

logger = logging.getLogger(__name__)
DTYPES = (torch.float32, torch.bfloat16)
ROWS_HINT = 64  # the batch size oneDNN packs for; measured: the same speed from 1 to 256 rows
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # relative, on a probe of unit-scale values


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight oneDNN packed once; the same call, inference only, CPU only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _reorder(linear.weight)  # opaque (mkldnn layout): an attribute, not state
        self.trainable = linear.weight.requires_grad  # given back by `unpacked`
        self.bias = linear.bias
        self.register_buffer("anchor", torch.empty(0, dtype=linear.weight.dtype), persistent=False)

    def __getattr__(self, name: str) -> object:
        if name == "weight":  # refused: a copy would let in-place edits of it vanish silently
            raise AttributeError(
                f"PackedLinear({self.in_features}, {self.out_features}) keeps its weight packed for oneDNN, not "
                "as a parameter; mgllava.inference.linear.unpack_linears(model) gives the nn.Linear layers back"
            )
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != self.packed.dtype:
            raise RuntimeError(
                f"PackedLinear({self.in_features}, {self.out_features}) holds a {self.packed.dtype} weight "
                f"packed for the CPU but got a {x.dtype} input on {x.device}; call "
                "mgllava.inference.linear.unpack_linears(model) before moving or casting the model"
            )
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def unpacked(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.packed.dtype, device="meta")  # fmt: skip
        linear.weight = nn.Parameter(self.packed.to_dense(), requires_grad=self.trainable)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed=oneDNN"


def packing_unavailable() -> str | None:
    """Why this torch cannot pack (None: it can)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN (torch.backends.mkldnn)"
    ops = torch.ops.mkldnn
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(ops, name):
            return f"this torch has no torch.ops.mkldnn.{name}"
    return None


def _packable(module: nn.Module, dtypes: tuple[torch.dtype, ...]) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not hasattr(module, "_hf_hook")  # accelerate's offload hook wraps forward to place the weight
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype in dtypes
        and (module.bias is None or module.bias.dtype == weight.dtype)
    )


def _probe(linear: nn.Linear) -> str | None:
    """Why the packed call disagrees with F.linear on this layer (None: it agrees)."""
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight.dtype)
    with torch.no_grad():
        try:
            got = PackedLinear(linear)(x).float()
        except RuntimeError as err:
            return f"the packed call failed ({str(err)[:200]})"
        want = F.linear(x, linear.weight, linear.bias).float()
    scale = want.abs().max().clamp_min(1.0)
    error = float((got - want).abs().max() / scale)
    limit = PROBE_TOLERANCE[linear.weight.dtype]
    return None if error <= limit else f"the packed call differs from F.linear by {error:.2e} (> {limit:g})"


def pack_linears(model: nn.Module, dtypes: tuple[torch.dtype, ...] = DTYPES) -> int:
    """Replace the plain CPU `nn.Linear` modules of `model` whose weights are in `dtypes` (fp32, bf16) by
    `PackedLinear`, in place; returns how many were packed (0, with the reason logged, when this torch cannot)."""
    if not set(dtypes) <= set(DTYPES):
        raise ValueError(f"pack_linears packs {DTYPES}, got {dtypes}")
    targets = [(name, m) for name, m in model.named_modules() if name and _packable(m, dtypes)]
    if not targets:
        return 0
    why = packing_unavailable() or _probe(targets[0][1])
    if why is not None:
        logger.warning("linear layers are not packed for oneDNN: %s; they use F.linear", why)
        return 0
    for name, module in targets:
        _replace(model, name, PackedLinear(module))
    return len(targets)


def unpack_linears(model: nn.Module) -> int:
    """Give `model` back its `nn.Linear` layers (the inverse of `pack_linears`); returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, PackedLinear)]
    for name, module in targets:
        _replace(model, name, module.unpacked())
    return len(targets)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
