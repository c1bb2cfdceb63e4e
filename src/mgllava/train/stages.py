"""A training stage applied to a model: which modules train, and a table saying so (STYLE habit 4).

A stage names parts of the model (`mgllava.model.modeling.MODULES`, as `named_parts` gives them:
`language_model` is the decoder and the LM head together) or the group
`new_modules`: every module of MG-LLaVA's own that the variant has and that has parameters (fusion,
projector, box projector, object mixer), so a new module or variant trains without editing any list.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import NEW_MODULES_GROUP, StageConfig


def trainable_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The stage's names expanded (`new_modules`) and checked against this model's modules.

    A pretrained or new module that this variant does not build (a baseline has no box projector) is an
    error naming the variant, not a silent skip."""
    children = model.named_parts()
    out: list[str] = []
    for name in names:
        if name == NEW_MODULES_GROUP:
            out += [n for n in model.new_modules() if n not in out]
        elif name not in children:
            variant = f"fusion={model.config.fusion}, object_tokens={model.config.object_tokens}"
            raise ValueError(f"the stage trains {name!r} but this model ({variant}) has no such module")
        elif name not in out:
            out.append(name)
    return out


def apply_stage(model: nn.Module, stage: StageConfig) -> str:
    """Freeze everything, unfreeze the stage's modules; return the table of parameter counts per module.

    With LoRA on the LLM, "language_model" trains only its adapters (PEFT marks them trainable)."""
    names = trainable_modules(model, stage.trainable)
    for param in model.parameters():
        param.requires_grad = False
    lora = stage.lora.r > 0
    parts = model.named_parts()
    for name in names:
        for pname, param in _named_parameters(parts[name]):
            param.requires_grad = not (lora and name == "language_model") or "lora_" in pname
    for param in model.vision_tower.unused_parameters():
        param.requires_grad = False  # never reached by the loss: no gradient, which DDP would refuse
    return parameter_table(model)


def store_frozen_towers(model: nn.Module, precision: str) -> list[str]:
    """With `precision: bf16`, a tower that does not train is stored in bf16 (half the memory of each rank's
    whole copy): the reference trained in bf16 throughout (DeepSpeed), so these are its numbers; the towers
    then also run in bf16 under autocast (LayerNorms still in float32). Returns the towers cast."""
    if precision != "bf16":
        return []
    cast = []
    for name in ("vision_tower", "high_res_tower"):
        tower = getattr(model, name)
        if tower is not None and not any(p.requires_grad for p in tower.parameters()):
            tower.to(torch.bfloat16)
            cast.append(name)
    return cast


def _named_parameters(modules: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    return [item for module in modules for item in module.named_parameters()]


def parameter_table(model: nn.Module) -> str:
    rows = [("module", "trainable", "frozen")]
    totals = [0, 0]
    for name, modules in model.named_parts().items():
        params = [p for _, p in _named_parameters(modules)]
        if not params:
            continue
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        totals[0] += trainable
        totals[1] += frozen
        rows.append((name, f"{trainable:,}", f"{frozen:,}"))
    rows.append(("total", f"{totals[0]:,}", f"{totals[1]:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])
