"""An LLM folder as Vicuna-1.5 ships it: `tokenizer.model` (SentencePiece) and no `tokenizer.json`.

The SentencePiece model is trained here (Llama's settings: BPE, byte fallback, split digits, identity
normalisation, no whitespace collapsing; `<unk>`, `<s>`, `</s>` at 0, 1, 2) on a tiny corpus, saved beside a
tiny Llama and a Vicuna-style `tokenizer_config.json`, and assembled through `mgllava assemble`. transformers
converts such a folder with the `sentencepiece` package, whose generated model_pb2 needs protobuf 7 (the
`convert` extra pins both); under protobuf 6 it fell back to tiktoken and failed with "Error parsing line".
The assembled folder's tokenizer must cut text exactly as the SentencePiece model does. One known difference
is left out of the texts: for text that starts with a space, transformers' Llama tokenizer (Metaspace,
prepend_scheme "first") adds no dummy-prefix piece where SentencePiece adds one; that is transformers'
behaviour for every Llama folder (the reference's too) and no template piece starts with a space.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaConfig, LlamaForCausalLM

from mgllava.cli import main

CORPUS = [
    "USER: What is in the image? ASSISTANT: A red circle on a gray square.",
    "The quick brown fox jumps over the lazy dog 1234 times.",
    "Describe the picture briefly, please: colours, shapes and numbers like 42.",
]
TEXTS = [
    "What is in the image?",
    "A red circle, 3 squares\nand 1024 dogs.",
    "USER: café ☃ naïve ASSISTANT:",  # characters outside the corpus: byte fallback pieces
    "double  spaces,   triple and a trailing one ",
    "\n",  # the vicuna template's SEP, tokenised on its own
]


def train_sentencepiece(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(CORPUS * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "corpus.txt").unlink()
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


def write_vicuna_like_folder(folder: Path) -> spm.SentencePieceProcessor:
    """A tiny Llama with Vicuna-1.5's tokenizer files: tokenizer.model, tokenizer_config.json and
    special_tokens_map.json, and no tokenizer.json."""
    sp = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(folder)))
    config = LlamaConfig(vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens))
    settings = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                "legacy": False, "model_max_length": 4096, "padding_side": "right", "sp_model_kwargs": {},
                "clean_up_tokenization_spaces": False, **tokens}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    assert not (folder / "tokenizer.json").exists()
    return sp


@pytest.fixture(scope="module")
def assembled(tiny_components, tmp_path_factory) -> tuple[Path, spm.SentencePieceProcessor]:
    root = tmp_path_factory.mktemp("vicuna_like")
    sp = write_vicuna_like_folder(root / "llm")
    args = ["assemble", "--clip", str(tiny_components["clip"]), "--convnext", str(tiny_components["convnext"]),
            "--llm", str(root / "llm"), "--template", "vicuna", "--high-res-size", "128", "--dtype", "float32",
            "--out", str(root / "out")]  # fmt: skip
    assert main(args) == 0
    return root / "out", sp


def test_tokenizer_model_only_folder_assembles_and_tokenises_as_sentencepiece(assembled):
    out, sp = assembled
    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tokenizer.encode(text) == [sp.bos_id(), *sp.encode(text)]
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert any(p.startswith("<0x") for p in sp.encode(TEXTS[2], out_type=str))  # the byte-fallback case ran


def test_the_placeholder_is_appended_after_the_sentencepiece_vocabulary(assembled):
    out, sp = assembled
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert processor.image_token_id == model.config.image_token_id == sp.vocab_size()
    assert model.get_input_embeddings().weight.shape[0] == sp.vocab_size() + 1
    assert processor.tokenizer.encode("<image>", add_special_tokens=False) == [sp.vocab_size()]
    assert len(processor.tokenizer) == sp.vocab_size() + 1
    assert torch.equal(
        model.get_input_embeddings().weight[-1], torch.zeros(model.config.text_config.hidden_size)
    )
