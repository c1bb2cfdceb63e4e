"""Assemble MG-LLaVA from the real released formats, accounting for every key (docs/design.md sections 3 and 10).

- Low-res tower: an HF CLIP folder (`openai/clip-vit-large-patch14-336`: a full `CLIPModel`; its text tower,
  projections and `logit_scale` are known-unused and reported, anything else unexpected is an error).
- High-res tower: an OpenCLIP checkpoint (`open_clip_pytorch_model.bin` or `open_clip_model.safetensors`
  of `laion/CLIP-convnext_large_d_320...`); `visual.trunk.{stem,stages}.*` are renamed onto transformers'
  ConvNeXt modules (docs/design.md section 3), the sizes are read from the tensors; the trunk head, `norm_pre`, the
  projection head and the text tower are known-unused.
- LLM: an HF causal-LM folder (weights, config, tokenizer).
- Optionally a reference `.pth` (XTuner) holding `projector.*`, `bbox_projector.*`, `fuse_module.*` and
  `llm.*`: it replaces the new modules and the LLM weights (a stage-1 file without `llm.*` keeps the LLM
  folder's weights, with a warning). It is unpickled once and each tensor is handed to the model as it is
  consumed, so the peak memory is about one copy of the file (a 26 GB Vicuna-13B file needs ~26 GB, not 52).

Everything is checked before anything is written: a template whose chat markers are not tokens of the LLM's
tokenizer, a reference for another LLM size (hidden size, layer count), a truncated or corrupt file, missing
keys, unexpected keys and shape mismatches each raise an error naming the file and what is wrong - the
reference loads with `strict=False` and silently ignores mismatches. Pickled checkpoints are opened with
`weights_only=True`; one that needs arbitrary classes is refused with the classes named, unless the caller
passes `trust_pickle=True` for a file they trust.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    ConvNextConfig,
)

from ..data.processor import MGLlavaProcessor, ensure_image_token
from ..data.templates import check_tokenizer, get_template
from ..model.configuration import MGLlavaConfig
from ..model.encoders import HighResEncoder
from ..model.fusion import build_fusion
from ..model.generation import configure_generation
from ..model.modeling import MGLlavaForConditionalGeneration
from ..model.object_tokens import ObjectMixer
from ..model.projector import build_projector

logger = logging.getLogger(__name__)

CLIP_UNUSED = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")
OPEN_CLIP_UNUSED = re.compile(
    r"^(visual\.trunk\.(head|norm_pre)\.|visual\.head\.|visual\.proj$|transformer\.|token_embedding\.|"
    r"positional_embedding$|ln_final\.|text_projection|logit_scale$|logit_bias$|attn_mask$|text\.)"
)
OPEN_CLIP_RENAMES = [
    (r"^visual\.trunk\.stem\.0\.", "embeddings.patch_embeddings."),
    (r"^visual\.trunk\.stem\.1\.", "embeddings.layernorm."),
    (r"^visual\.trunk\.stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
    (r"^visual\.trunk\.stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2."),
    (r"\.conv_dw\.", ".dwconv."),
    (r"\.norm\.", ".layernorm."),
    (r"\.mlp\.fc1\.", ".pwconv1."),
    (r"\.mlp\.fc2\.", ".pwconv2."),
    (r"\.gamma$", ".layer_scale_parameter"),
]
REFERENCE_RENAMES = [
    (r"^projector\.model\.", "projector."),
    (r"^bbox_projector\.model\.", "box_projector."),
    (r"^fuse_module\.", "fusion."),
    (r"^llm\.", "language_model."),
]


class CheckpointError(ValueError):
    """A checkpoint that does not fit: names the file and lists the keys that did not match."""


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    """The error for a file torch or safetensors cannot open, saying when it looks cut short."""
    size = path.stat().st_size
    with path.open("rb") as f:
        zip_header = f.read(4) == b"PK\x03\x04"
    if zip_header and not zipfile.is_zipfile(path):
        reason = f"truncated: a torch.save archive of {size:,} bytes whose end (its zip directory) is missing"
    else:
        reason = f"corrupt, truncated or not a checkpoint ({size:,} bytes)"
    return CheckpointError(
        f"{path}: cannot read checkpoint, {reason}; download or save it again "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    )


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a pickled `.bin`/`.pth`/`.pt` state dict (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise _unreadable(path, err) from err
    if not trust_pickle:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # not a torch.save file at all, or cut short
            raise _unreadable(path, err) from err
        if unsafe:
            raise CheckpointError(
                f"{path}: the pickle needs these classes to load: {', '.join(unsafe)}. Unpickling them can run "
                "arbitrary code; pass trust_pickle=True (--trust-pickle) only for a file you trust"
            )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # torch raises several types for corrupt files
        raise _unreadable(path, err) from err


def unwrap_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """Peel `state_dict` / `module` / `model` wrappers and a `module.` prefix (DDP/DeepSpeed saves)."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "module", "model") if k in obj), None)
        if inner is None:
            raise CheckpointError(f"{name}: no tensors found; top-level keys: {_listing(obj)}")
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name}: expected a state dict, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _check_keys(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], name: str) -> None:
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k]
    ]
    problems = [
        f"{label} ({len(keys)}): {_listing(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{name}: " + "; ".join(problems))


def _load_strict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], name: str, skip: set[str] = frozenset()
) -> None:
    """Load `state` into `module` after checking keys and shapes (`skip`: tied keys the module derives)."""
    expected = {k: v.shape for k, v in module.state_dict().items() if k not in skip}
    _check_keys(expected, state, name)
    module.load_state_dict(state, strict=not skip, assign=True)


@contextmanager
def _quiet_transformers():
    """We report key accounting ourselves; silence transformers' own load report meanwhile."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


# -- towers ----------------------------------------------------------------------------------------------
def load_clip_vision(folder: str | Path, dtype: torch.dtype = torch.float32) -> CLIPVisionModel:
    """`CLIPVisionModel` from an HF CLIP folder (full `CLIPModel` or vision-only), every key accounted for."""
    with _quiet_transformers():
        model, info = CLIPVisionModel.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    unexpected = {k for k in info["unexpected_keys"] if not CLIP_UNUSED.match(k)}
    problems = [
        f"{k} ({len(v)}): {_listing(v)}"
        for k, v in (
            ("missing", info["missing_keys"]),
            ("unexpected", unexpected),
            ("mismatched", info["mismatched_keys"]),
        )
        if v
    ]
    if problems:
        raise CheckpointError(f"CLIP folder {folder}: " + "; ".join(problems))
    logger.info("CLIP %s: loaded, %d text-tower keys unused", folder, len(info["unexpected_keys"]))
    return model


def _open_clip_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no open_clip_model.safetensors or open_clip_pytorch_model.bin inside")
    return path


def convnext_config_from_trunk(state: dict[str, torch.Tensor], image_size: int) -> ConvNextConfig:
    """Read widths, depths and patch size of an OpenCLIP/timm ConvNeXt trunk from its tensors."""
    stem = state.get("visual.trunk.stem.0.weight")
    if stem is None:
        raise CheckpointError("not an OpenCLIP ConvNeXt checkpoint: no visual.trunk.stem.0.weight")
    widths, depths = [], []
    stage = 0
    while f"visual.trunk.stages.{stage}.blocks.0.conv_dw.weight" in state:
        widths.append(state[f"visual.trunk.stages.{stage}.blocks.0.conv_dw.weight"].shape[0])
        depths.append(
            len({k.split(".")[5] for k in state if k.startswith(f"visual.trunk.stages.{stage}.blocks.")})
        )
        stage += 1
    return ConvNextConfig(
        hidden_sizes=widths,
        depths=depths,
        num_stages=len(widths),
        patch_size=stem.shape[-1],
        layer_norm_eps=1e-6,
        image_size=image_size,
    )


def load_open_clip_convnext(
    path: str | Path, image_size: int = 768, trust_pickle: bool = False
) -> tuple[ConvNextConfig, HighResEncoder]:
    """`HighResEncoder` from an OpenCLIP ConvNeXt checkpoint (file or HF repo folder)."""
    file = _open_clip_file(path)
    state = unwrap_state_dict(read_state_dict(file, trust_pickle), str(file))
    config = convnext_config_from_trunk(state, image_size)
    trunk = {k: v for k, v in state.items() if k.startswith(("visual.trunk.stem.", "visual.trunk.stages."))}
    unknown = set(state) - set(trunk) - {k for k in state if OPEN_CLIP_UNUSED.match(k)}
    if unknown:
        raise CheckpointError(f"{file}: unexpected keys ({len(unknown)}): {_listing(unknown)}")
    encoder = HighResEncoder(config)
    _load_strict(encoder, {_rename(k, OPEN_CLIP_RENAMES): v for k, v in trunk.items()}, str(file))
    logger.info("ConvNeXt %s: %d trunk tensors loaded, %d unused", file, len(trunk), len(state) - len(trunk))
    return config, encoder


# -- the reference's XTuner checkpoint ---------------------------------------------------------------------
def reference_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The reference `.pth` renamed to our keys (fusion, projector, box_projector, language_model)."""
    state = unwrap_state_dict(read_state_dict(path, trust_pickle), str(path))
    lora = [k for k in state if "lora_" in k]
    if lora:
        raise CheckpointError(
            f"{path}: a LoRA checkpoint ({len(lora)} adapter tensors, e.g. {lora[0]}); merge the adapter into the "
            "LLM first"
        )
    renamed, unknown = {}, []
    for key, value in state.items():
        new = _rename(key, REFERENCE_RENAMES)
        (unknown.append(key) if new == key else renamed.__setitem__(new, value))
    if unknown:
        raise CheckpointError(
            f"{path}: keys outside projector/bbox_projector/fuse_module/llm ({len(unknown)}): {_listing(unknown)}"
        )
    return renamed


def _grow_vocab(llm: torch.nn.Module, size: int) -> None:
    """Add rows (zero-initialised) so that the placeholder id exists; never shrink."""
    old = llm.get_input_embeddings().weight.shape[0]
    if size <= old:
        return
    llm.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[old:] = 0
        out = llm.get_output_embeddings()
        if out is not None and out.weight.shape[0] == size:
            out.weight[old:] = 0


def _new_module(module: torch.nn.Module, model: MGLlavaForConditionalGeneration) -> torch.nn.Module:
    module.apply(model._init_weights)
    return module


def assemble(
    clip: str | Path,
    convnext: str | Path,
    llm: str | Path,
    template: str,
    reference: str | Path | None = None,
    fusion: str = "conv_gate",
    object_tokens: str = "concat",
    high_res_image_size: int = 768,
    dtype: torch.dtype = torch.float32,
    trust_pickle: bool = False,
    context_length: int | None = None,
):
    """Build (model, processor) from the real formats; see the module docstring. Nothing is downloaded.
    `context_length`: the longest sequence the model runs (default: the LLM's `max_position_embeddings`);
    video models set it longer (see `MGLlavaConfig`)."""
    for label, path in (("CLIP folder", clip), ("LLM folder", llm)):
        if not Path(path).is_dir():
            raise CheckpointError(f"{label} {path}: not a directory")
    if not Path(convnext).exists():
        raise CheckpointError(f"OpenCLIP ConvNeXt checkpoint {convnext}: no such file or folder")
    tokenizer = AutoTokenizer.from_pretrained(str(llm))
    try:
        check_tokenizer(tokenizer, get_template(template))
    except ValueError as err:
        raise ValueError(f"LLM folder {llm}: {err}") from err
    image_token_id = _placeholder_id(tokenizer)
    text_config = AutoConfig.from_pretrained(str(llm))
    folder_vocab = text_config.vocab_size
    text_config.vocab_size = max(text_config.vocab_size, image_token_id + 1)
    ref_state = None
    if reference is not None:  # unpickled once; each part below takes (pops) its tensors from it
        ref_state = reference_state_dict(reference, trust_pickle)
        _check_llm_size(ref_state, text_config, folder_vocab, reference, llm)
    vision = load_clip_vision(clip, dtype)
    high_config, high_res = load_open_clip_convnext(convnext, high_res_image_size, trust_pickle)
    config = MGLlavaConfig(
        vision_config=vision.config,
        high_res_config=high_config,
        text_config=text_config,
        image_token_id=image_token_id,
        fusion=fusion,
        object_tokens=object_tokens,
        context_length=context_length,
        dtype=dtype,
    )
    with torch.device("meta"):
        model = MGLlavaForConditionalGeneration(config)
    model.vision_tower.clip = vision
    if model.high_res_tower is not None:
        model.high_res_tower = high_res.to(dtype)
    llm_state = _take(ref_state, "language_model.") if ref_state is not None else None
    if llm_state is not None and not llm_state:
        logger.warning(
            "%s has no llm.* weights (a stage-1 checkpoint): the LLM is the folder's %s", reference, llm
        )
        llm_state = None
    model.set_causal_lm(_load_llm(llm, text_config, llm_state, reference, dtype))
    del llm_state
    _fresh_new_modules(model, config, dtype)
    if ref_state is not None:
        _load_reference_modules(model, ref_state, reference)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise CheckpointError(f"parameters left without weights: {_listing(meta)}")
    ensure_image_token(tokenizer, image_token_id)
    processor = MGLlavaProcessor.for_config(config, tokenizer, template=template)
    configure_generation(model, processor)
    return model.eval(), processor


def _placeholder_id(tokenizer: Any) -> int:
    token_id = tokenizer.convert_tokens_to_ids("<image>")
    if token_id is not None and token_id != tokenizer.unk_token_id:
        return token_id
    return len(tokenizer)  # `ensure_image_token` adds it right there


def _take(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the entries under `prefix` (prefix stripped): each tensor keeps a single owner, so
    the reference's tensors are freed as the model takes them over."""
    return {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast in place, one tensor at a time (a cast copy replaces its original before the next is made)."""
    for key in list(state):
        state[key] = state[key].to(dtype)
    return state


def _check_llm_size(
    state: dict[str, torch.Tensor],
    text_config: Any,
    folder_vocab: int,
    reference: str | Path,
    llm: str | Path,
) -> None:
    """Refuse a reference whose LLM (`llm.*`) is another size or vocabulary than the LLM folder's."""
    llm_keys = [k for k in state if k.startswith("language_model.")]
    embed = next((state[k] for k in llm_keys if k.endswith("embed_tokens.weight")), None)
    if embed is None:  # no LLM in the file (stage 1), or an odd layout that the strict load will list
        return
    layers = len({m.group(1) for k in llm_keys if (m := re.search(r"\.layers\.(\d+)\.", k))})
    theirs = (embed.shape[1], layers)
    ours = (text_config.hidden_size, text_config.num_hidden_layers)
    if theirs != ours:
        raise CheckpointError(
            f"{reference}: its LLM (llm.*) has hidden size {theirs[0]} and {theirs[1]} layers but the LLM folder "
            f"{llm} has hidden size {ours[0]} and {ours[1]} layers: the checkpoint is for another LLM; pass the "
            "LLM folder it was trained from"
        )
    if embed.shape[0] not in (folder_vocab, text_config.vocab_size):
        raise CheckpointError(
            f"{reference}: its LLM has {embed.shape[0]} vocabulary rows but the LLM folder {llm} has "
            f"{folder_vocab}: the checkpoint was trained with another tokenizer; pass the LLM folder it was "
            "trained from"
        )


def _load_llm(
    llm: str | Path,
    text_config: Any,
    state: dict[str, torch.Tensor] | None,
    reference: str | Path | None,
    dtype: torch.dtype,
):
    """The LLM from its folder, or (`state`: the reference's `llm.*` tensors) built from the folder's config
    and filled from the reference."""
    if state is None:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(llm), dtype=dtype, output_loading_info=True
            )
        problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
        if problems:
            raise CheckpointError(
                f"LLM folder {llm}: " + "; ".join(f"{k}: {_listing(v)}" for k, v in problems.items())
            )
        _grow_vocab(model, text_config.vocab_size)
        return model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    embed_key = next((k for k in state if k.endswith("embed_tokens.weight")), None)
    if embed_key is not None:  # reference vocab lacks the placeholder row: pad embeddings and head with zeros
        for key in [embed_key, "lm_head.weight"]:
            if key in state and state[key].shape[0] < text_config.vocab_size:
                pad = text_config.vocab_size - state[key].shape[0]
                state[key] = torch.cat([state[key], state[key].new_zeros(pad, state[key].shape[1])])
    if text_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tied = {"lm_head.weight"} if text_config.tie_word_embeddings else set()
    _load_strict(model, _cast(state, dtype), f"{reference} (llm.*)", skip=tied)
    model.tie_weights()
    return model


def _fresh_new_modules(
    model: MGLlavaForConditionalGeneration, config: MGLlavaConfig, dtype: torch.dtype
) -> None:
    """The modules no released file provides, built for real (the rest of `model` was built on meta)."""
    hidden = config.text_config.hidden_size
    fusion = build_fusion(
        config.fusion, model.vision_tower.hidden_size, list(config.high_res_config.hidden_sizes)
    )
    model.fusion = _new_module(fusion, model).to(dtype)
    model.projector = _new_module(
        build_projector(fusion.out_dim, hidden, config.projector_hidden_act), model
    ).to(dtype)
    model.object_mixer = _new_module(ObjectMixer(config.object_tokens, hidden), model).to(dtype)
    if model.box_projector is not None:
        box = build_projector(config.object_feature_dim, hidden, config.projector_hidden_act)
        model.box_projector = _new_module(box, model).to(dtype)


def _load_reference_modules(
    model: MGLlavaForConditionalGeneration, state: dict[str, torch.Tensor], reference: str | Path
) -> None:
    """Fill the new modules from the reference's remaining tensors (`state`, emptied on the way)."""
    for name in ("fusion", "projector", "box_projector", "object_mixer"):
        module = getattr(model, name)
        part = _take(state, name + ".")
        if module is None:
            if part:
                raise CheckpointError(
                    f"{reference}: has {name} weights but this model's config disables {name}"
                )
            continue
        if not part and not any(True for _ in module.parameters()):
            continue
        _load_strict(module, _cast(part, next(module.parameters()).dtype), f"{reference} ({name})")
    if state:  # every key was renamed into one of the parts above; anything else is a bug here
        raise CheckpointError(f"{reference}: keys no module took ({len(state)}): {_listing(state)}")
