"""Build the tiny byte-level BPE tokenizer that ships in `mgllava/assets/tiny_tokenizer`.

Run once; the output is committed so that the `tiny` preset never touches the network. The corpus is
English prose taken from the docstrings of Python's standard library plus the words our demo and chat
templates use, so common words are single tokens. Special tokens cover all four chat templates of
docs/design.md section 6, so every template can be exercised with the tiny model.

    python scripts/build_tiny_tokenizer.py src/mgllava/assets/tiny_tokenizer
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = [
    "<unk>", "<s>", "</s>", "<pad>", "<image>",
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
]  # fmt: skip
DEMO_WORDS = """
What shape is in the image? What color is the shape? Is there a circle? Is there a rectangle? Is there a
triangle? red green blue yellow black gray teal brown white orange purple circle rectangle triangle square
yes no top left right bottom middle center corner panel which the a an of in on is are there this that
USER: ASSISTANT: Answer the question using a single word or phrase. Answer with the option's letter from
the given choices directly. A. B. C. D. Describe the image briefly. object objects box boxes
"""


def corpus() -> list[str]:
    texts = [DEMO_WORDS] * 500
    for mod in sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names):
        if mod.startswith("_") or mod in {"antigravity", "this", "idlelib", "tkinter", "turtledemo"}:
            continue
        try:
            module = importlib.import_module(mod)
        except Exception:
            continue
        texts.extend(
            obj.__doc__ for obj in vars(module).values() if isinstance(getattr(obj, "__doc__", None), str)
        )
    return texts


def main(out_dir: str) -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # like Llama/Vicuna: BOS is added when special tokens are requested
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL[4:],
        model_max_length=2048,
    )
    fast.save_pretrained(out_dir)
    print(f"wrote {out_dir}: vocab {len(fast)}")


if __name__ == "__main__":
    main(sys.argv[1])
