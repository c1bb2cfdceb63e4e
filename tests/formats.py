"""Write tiny random checkpoints in exactly the formats of the real released files.

- CLIP: `CLIPModel.save_pretrained` (the openai/clip-vit-large-patch14-336 layout: text + vision towers).
- ConvNeXt: an OpenCLIP `CLIP` whose visual trunk is timm's `convnext_large` layout at tiny widths and
  depths, saved with `torch.save(state_dict)` as `open_clip_pytorch_model.bin` (or as safetensors).
- LLM: a Llama `save_pretrained` folder with its own small BPE tokenizer that, like a real LLM's, has no
  `<image>` token (assembly adds it and grows the vocabulary by one row).
- Boxes: a CLIP tagger folder and an OWLv2 detector folder (model + processor + a character-level CLIP
  tokenizer built offline), exactly as `save_pretrained` writes the real ones.
- Reference: the state dict of an XTuner-style `.pth` with `projector.model.*`, `bbox_projector.model.*`,
  `fuse_module.*`, `llm.*` and a `module.` prefix as DeepSpeed saves it (tests wrap it in `state_dict`);
  or, independent of our model code, a random one built from the reference's layer shapes
  (`reference_checkpoint`) and saved in any of its wrapper forms (`save_reference_pth`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    PreTrainedTokenizerFast,
)

CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=14,
    image_size=56,
)
TRUNK_DEPTHS = (1, 1, 2, 1)
TRUNK_DIMS = (8, 16, 24, 32)


def write_clip_folder(folder: Path) -> Path:
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=99,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=CLIP_VISION,
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    return folder


def open_clip_convnext_state() -> dict[str, torch.Tensor]:
    import timm
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(
            timm_model_name="convnext_atto",
            timm_model_pretrained=False,
            timm_pool="",
            timm_proj="mlp",
            image_size=128,
        ),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=64, width=32, heads=2, layers=1),
    )
    # the real checkpoint's trunk is timm convnext_large: same module layout, here at tiny sizes
    model.visual.trunk = timm.create_model(
        "convnext_large",
        pretrained=False,
        depths=TRUNK_DEPTHS,
        dims=TRUNK_DIMS,
        num_classes=0,
        global_pool="",
    )
    with torch.no_grad():  # random layer scales and norms so that every parameter matters
        for name, param in model.visual.trunk.named_parameters():
            if name.endswith("gamma") or ".norm." in name or "stem.1" in name or "downsample.0" in name:
                param.uniform_(0.5, 1.5)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_open_clip_convnext(path: Path, safetensors: bool = False) -> Path:
    state = open_clip_convnext_state()
    if safetensors:
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def llm_tokenizer(chat_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A Llama-like byte-level BPE (BOS <s>, EOS </s>, pad <pad>) without an <image> token; `chat_tokens`
    (a chat template's markers such as `<|user|>`) are added as special tokens, as real chat LLMs have them."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        ["USER: What is in the image? ASSISTANT: A red circle on a gray square."] * 50, trainer
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if chat_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(chat_tokens)})
    return tokenizer


def write_llm_folder(
    folder: Path, chat_tokens: tuple[str, ...] = (), hidden_size: int = 64, num_layers: int = 2
) -> Path:
    tokenizer = llm_tokenizer(chat_tokens)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_components(root: Path) -> dict[str, Path]:
    return {
        "clip": write_clip_folder(root / "clip-vit"),
        "convnext": write_open_clip_convnext(root / "open_clip_pytorch_model.bin"),
        "llm": write_llm_folder(root / "llm"),
    }


REFERENCE_NAMES = (
    ("projector.", "projector.model."),
    ("box_projector.", "bbox_projector.model."),
    ("fusion.", "fuse_module."),
    ("language_model.", "llm."),
)


def flat_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict under the keys its folders hold (`language_model.model.*`, `fusion.*`, ...):
    `save_pretrained`'s own renaming, reverting the key map."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, model.state_dict())


def reference_state(model) -> dict[str, torch.Tensor]:
    """The model's new modules and LLM under the reference's XTuner key names, with DeepSpeed's `module.`
    prefix; the LLM's vocabulary without our `<image>` row, as the reference's LLM has none."""
    placeholder = model.config.image_token_id
    state = {}
    for key, value in flat_state_dict(model).items():
        for ours, theirs in REFERENCE_NAMES:
            if key.startswith(ours):
                if (
                    key.endswith(("embed_tokens.weight", "lm_head.weight"))
                    and value.shape[0] == placeholder + 1
                ):
                    value = value[:-1]
                state["module." + theirs + key[len(ours) :]] = value.clone()
    return state


def reference_checkpoint(
    llm_folder: Path, low_dim: int, stage_dims: tuple[int, ...], seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random reference checkpoint under its own key names, built from its layer shapes with plain torch
    (nothing from mgllava): Conv-Gate `fuse_module.*` with non-zero projections (so it is not the identity),
    `projector.model.{0,2}` from `low_dim`, `bbox_projector.model.{0,2}` from the summed stage widths, and
    `llm.*`: the LLM folder's weights perturbed (so that using the folder's instead would show)."""
    from torch import nn

    torch.manual_seed(seed)
    llm = LlamaForCausalLM.from_pretrained(llm_folder)
    hidden, high = llm.config.hidden_size, stage_dims[-1]
    fuse = nn.ModuleDict(
        {
            "slow_conv": nn.Conv2d(high, high, 1),
            "slow_proj": nn.Conv2d(high, low_dim, 1),
            "fast_conv": nn.Conv2d(low_dim, low_dim, 7, padding=3, groups=low_dim),
            "fast_proj": nn.Conv2d(low_dim, low_dim, 1),
            "gate": nn.Sequential(
                nn.Linear(2 * low_dim, low_dim // 2), nn.GELU(), nn.Linear(low_dim // 2, 1)
            ),
        }
    )
    mlp = lambda d: nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden))  # noqa: E731
    parts = {
        "fuse_module.": fuse,
        "projector.model.": mlp(low_dim),
        "bbox_projector.model.": mlp(sum(stage_dims)),
    }
    state = {p + k: v.detach().clone() for p, m in parts.items() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for key, value in llm.state_dict().items():
            state["llm." + key] = value + 0.02 * torch.randn_like(value)
    return state


REFERENCE_FORMS = ("bare", "state_dict", "module_prefix", "module")


def save_reference_pth(state: dict[str, torch.Tensor], path: Path, form: str) -> Path:
    """`torch.save` the reference checkpoint the ways it is found: a bare state dict, `{"state_dict": ...}`,
    keys with DDP/DeepSpeed's `module.` prefix, or DeepSpeed's `{"module": ...}`."""
    wrapped = {
        "bare": lambda: state,
        "state_dict": lambda: {"state_dict": state},
        "module_prefix": lambda: {"module." + k: v for k, v in state.items()},
        "module": lambda: {"module": state},
    }[form]()
    torch.save(wrapped, path)
    return path


def clip_tokenizer(model_max_length: int = 32) -> CLIPTokenizer:
    """A character-level CLIP BPE (no merges): every byte-level character and its end-of-word form, then
    <|startoftext|> and <|endoftext|> last, so that EOS has the highest id as in the real vocabulary (OWLv2
    pools the text at the argmax id) and BOS is not 0 (OWLv2 treats a query starting with id 0 as padding)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _text_config(tokenizer: CLIPTokenizer) -> dict:
    vocab = len(tokenizer)
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab,
                max_position_embeddings=tokenizer.model_max_length, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                pad_token_id=vocab - 1)  # fmt: skip


def write_clip_tagger_folder(folder: Path) -> Path:
    """`CLIPModel` + `CLIPProcessor` (image processor and tokenizer) as `save_pretrained` writes them."""
    tokenizer = clip_tokenizer()
    config = CLIPConfig(text_config=_text_config(tokenizer), vision_config=CLIP_VISION, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_owlv2_folder(folder: Path, image_size: int = 64) -> Path:
    """`Owlv2ForObjectDetection` + `Owlv2Processor` as `save_pretrained` writes them (16 patches of 16 px)."""
    tokenizer = clip_tokenizer()
    config = Owlv2Config(
        text_config=_text_config(tokenizer),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=16),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_video(path: Path, n_frames: int = 20, size: tuple[int, int] = (48, 32), step: int = 10) -> Path:
    """An mp4 whose frame i is filled with gray level `step * i` (so sampled indices can be read back)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(
                np.full((size[1], size[0], 3), step * i, np.uint8), format="rgb24"
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
