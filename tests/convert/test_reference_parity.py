"""Whole-model parity through the converter (docs/design.md sections 1-6, 8, 10).

A tiny checkpoint in the reference's exact layout (an XTuner `.pth` in each of its wrapper forms, an OpenCLIP
ConvNeXt file, an HF CLIP folder, an HF LLM folder whose tokenizer has no `<image>`) is converted with
`mgllava assemble --reference` as a user would, and our logits are compared with the reference forward
written below from docs/design.md with plain torch / torchvision / transformers / timm - nothing from mgllava:

    square pad (mean colour) -> PIL bicubic to S_hi -> /255, CLIP-normalise -> bilinear to S_lo
    CLIP hidden_states[-2][:, 1:] ; timm ConvNeXt stem + stages ; Conv-Gate on stage 3 ; projector MLP
    boxes: pad shift, class-wise NMS 0.2, scale to S_hi, round, clip, drop, zero-box fallback
    all stages upsampled to stage 0 and concatenated -> roi_align(56, aligned=False) -> mean -> box MLP
    XTuner encoding (BOS, instruction split at <image>, output + suffix, EOS when the template has none, SEP),
    `[image rows][object rows]` spliced at each <image>, frame after frame at <video>

for a multi-turn conversation with two images and their boxes, a text-only conversation and an 8-frame video,
in each of the four chat templates; fp32 logits agree within 1e-4, the labels are XTuner's, and the loss (the
reference's is over the LLM's own vocabulary; ours masks the `<image>` column out) within 1e-6. Then the converter's bad inputs: a
reference for another LLM size, a truncated file, a template that does not match the tokenizer.

Sizes are the tiny formats' (CLIP 56 px / patch 14, ConvNeXt 128 px / stride 32: a 4x4 grid, 16 image rows).
Where the reference differs from the document by a bug (section 11: its 767-px crop offset for some image
sides, 13.13; `(L - S) // 2` vs `round((L - S) / 2)` for video boxes, 13.14), the inputs avoid the cases that
differ; two images in one sample follow the document (each its own objects, 13.30).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import batched_nms, roi_align
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
)

from mgllava.cli import main
from mgllava.convert import assemble

from .. import formats

HIGH_RES = 128
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
ROI_SIZE = 56
NMS_IOU = 0.2
MARK = -1  # an <image> / <video> position in the reference's token list
IGNORE = -100  # XTuner's IGNORE_INDEX: no loss at this position
LOSS_TOL = 1e-6  # fp32 loss against the reference's

# Section 6, as the reference's vendored XTuner `templates.py` has them (phi3_chat: no newline after <|user|>,
# 13.22). `eos`: the answer ends with EOS and the next turn starts with BOS; else the suffix ends it, no BOS.
TEMPLATES = {
    "vicuna": dict(instruction="USER: {input} ASSISTANT:", suffix="", eos=True, sep="\n", markers=()),
    "phi3_chat": dict(
        instruction="<|user|>{input}<|end|>\n<|assistant|>\n",
        suffix="<|end|>",
        eos=False,
        sep="\n",
        markers=("<|user|>", "<|end|>", "<|assistant|>", "<|system|>"),
    ),
    "llama3_chat": dict(
        instruction="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        suffix="<|eot_id|>",
        eos=False,
        sep="",
        markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "qwen_chat": dict(
        instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        suffix="<|im_end|>",
        eos=False,
        sep="\n",
        markers=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    ),
}
FORMS = dict(zip(TEMPLATES, formats.REFERENCE_FORMS, strict=True))  # each template its own wrapper form


# -- the reference, from docs/design.md -----------------------------------------------------------------------
def mlp(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    hidden = F.gelu(F.linear(x, w[prefix + "0.weight"], w[prefix + "0.bias"]))
    return F.linear(hidden, w[prefix + "2.weight"], w[prefix + "2.bias"])


def conv_gate(low: torch.Tensor, high: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """Section 4: low (B, N, C_lo), high = stage 3 (B, C_hi, g, g) -> (B, N, C_lo)."""
    p = "fuse_module."
    b, _, c = low.shape
    g = high.shape[-1]
    h = F.conv2d(high, w[p + "slow_conv.weight"], w[p + "slow_conv.bias"])
    h = F.conv2d(F.gelu(h), w[p + "slow_proj.weight"], w[p + "slow_proj.bias"])
    h = h.flatten(2).transpose(1, 2)
    grid = low.transpose(1, 2).reshape(b, c, g, g)
    fast = F.conv2d(grid, w[p + "fast_conv.weight"], w[p + "fast_conv.bias"], padding=3, groups=c)
    grid = grid + F.conv2d(F.gelu(fast), w[p + "fast_proj.weight"], w[p + "fast_proj.bias"])
    l_tokens = grid.flatten(2).transpose(1, 2)
    gate = mlp(torch.cat([l_tokens, h], -1).mean(1), w, p + "gate.")  # (B, 1): one scalar per image
    return l_tokens + torch.tanh(gate)[:, :, None] * h


def nms(record: dict, shift: tuple[int, int]) -> torch.Tensor:
    """Boxes in original pixels shifted into the padded frame, then class-wise NMS (kept in score order)."""
    if not record["boxes"]:
        return torch.zeros(0, 4)
    boxes = torch.tensor(record["boxes"], dtype=torch.float32) + torch.tensor([*shift, *shift])
    names = {label: i for i, label in enumerate(dict.fromkeys(record["labels"]))}
    labels = torch.tensor([names[label] for label in record["labels"]])
    keep = batched_nms(boxes, torch.tensor(record["scores"]), labels, NMS_IOU)
    return boxes[keep]


def crop_boxes(boxes: torch.Tensor, start: tuple[int, int], side: int) -> torch.Tensor:
    """Shift by the crop start, clip to [0, side], drop boxes outside; one zero box when none is left."""
    kept = []
    for x1, y1, x2, y2 in boxes.tolist():
        x1, y1, x2, y2 = (
            max(x1 - start[0], 0),
            max(y1 - start[1], 0),
            min(x2 - start[0], side),
            min(y2 - start[1], side),
        )
        if not (x2 < 0 or y2 < 0 or x1 > side or y1 > side):
            kept.append([x1, y1, x2, y2])
    return torch.tensor(kept, dtype=torch.float32) if kept else torch.zeros(1, 4)  # fmt: skip


class Reference:
    """MG-LLaVA's forward from docs/design.md, on the files the converter read."""

    def __init__(self, clip: Path, convnext: Path, llm: Path, state: dict[str, torch.Tensor], template: str):
        self.clip = CLIPVisionModel.from_pretrained(clip).eval()
        self.low = self.clip.config.image_size
        self.trunk = timm.create_model("convnext_large", pretrained=False, depths=formats.TRUNK_DEPTHS,
                                       dims=formats.TRUNK_DIMS, num_classes=0, global_pool="")  # fmt: skip
        open_clip = torch.load(convnext, weights_only=True)
        prefix = "visual.trunk."
        self.trunk.load_state_dict(
            {k[len(prefix) :]: v for k, v in open_clip.items() if k.startswith(prefix)}
        )
        self.trunk.eval()
        self.w = {k: v for k, v in state.items() if not k.startswith("llm.")}
        self.llm = AutoModelForCausalLM.from_pretrained(llm).eval()
        self.llm.load_state_dict({k[len("llm.") :]: v for k, v in state.items() if k.startswith("llm.")})
        self.tok = AutoTokenizer.from_pretrained(llm)
        self.template = TEMPLATES[template]

    # pixels
    def normalise(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((arr / 255.0 - MEAN) / STD).astype(np.float32))

    def image_pixels(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        w, h = image.size
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in MEAN))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        resized = np.asarray(square.resize((HIGH_RES, HIGH_RES), Image.BICUBIC), dtype=np.float64)
        high = self.normalise(resized).permute(2, 0, 1)[None]
        low = F.interpolate(high, size=(self.low, self.low), mode="bilinear", align_corners=False)
        return low, high

    def video_pixels(self, frames: list[Image.Image], size: int) -> torch.Tensor:
        """pytorchvideo's order: normalise, ShortSideScale (bilinear), CenterCropVideo -> (T, 3, size, size)."""
        clip = self.normalise(np.stack([np.asarray(f, dtype=np.float64) for f in frames])).permute(3, 0, 1, 2)
        h, w = clip.shape[-2:]
        new_h, new_w = (math.floor(h / w * size), size) if w < h else (size, math.floor(w / h * size))
        clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
        return clip[..., top : top + size, left : left + size].permute(1, 0, 2, 3)

    # boxes
    def image_boxes(self, record: dict, w: int, h: int) -> torch.Tensor:
        side = max(w, h)
        boxes = nms(record, ((side - w) // 2, (side - h) // 2))
        return crop_boxes(torch.round(boxes * (HIGH_RES / side)), (0, 0), HIGH_RES)

    def frame_boxes(self, record: dict, w: int, h: int) -> torch.Tensor:
        scale = HIGH_RES / min(w, h)
        start = ((int(w * scale) - HIGH_RES) // 2, (int(h * scale) - HIGH_RES) // 2)
        return crop_boxes(torch.round(nms(record, (0, 0)) * scale), start, HIGH_RES)

    # the model
    def visual_rows(
        self, low: torch.Tensor, high: torch.Tensor, boxes: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """One (N + n_i, H) tensor per image or frame: projected fused tokens, then its object tokens."""
        tokens = self.clip(low, output_hidden_states=True).hidden_states[-2][:, 1:]
        stages, x = [], self.trunk.stem(high)
        for stage in self.trunk.stages:
            x = stage(x)
            stages.append(x)
        image_rows = mlp(conv_gate(tokens, stages[-1], self.w), self.w, "projector.model.")
        size = stages[0].shape[-2:]
        fmap = torch.cat(
            [stages[0]]
            + [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in stages[1:]],
            1,
        )
        out = []
        for i, b in enumerate(boxes):
            pooled = roi_align(fmap[i : i + 1], [b], output_size=ROI_SIZE, spatial_scale=size[0] / HIGH_RES,
                               sampling_ratio=-1, aligned=False).mean((2, 3))  # fmt: skip
            out.append(torch.cat([image_rows[i], mlp(pooled, self.w, "bbox_projector.model.")]))
        return out

    def encode(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """XTuner's (ids, labels): labels IGNORE on BOS, the instruction and SEP, the ids on output, suffix, EOS."""
        t, tok = self.template, self.tok
        ids, labels, bos = [], [], True
        for question, answer in turns:
            prompt = [tok.bos_token_id] if bos else []
            for k, piece in enumerate(re.split("<image>|<video>", t["instruction"].format(input=question))):
                prompt += ([MARK] if k else []) + tok.encode(piece, add_special_tokens=False)
            output = tok.encode(answer + t["suffix"], add_special_tokens=False)
            output += [tok.eos_token_id] if t["eos"] else []
            sep = tok.encode(t["sep"], add_special_tokens=False) if t["sep"] else []
            ids += prompt + output + sep
            labels += [IGNORE] * len(prompt) + output + [IGNORE] * len(sep)
            bos = t["eos"]
        return ids, labels

    def forward(self, turns: list[tuple[str, str]], visuals: list[list[torch.Tensor]]):
        """(token ids with each visual row as None, labels, logits (T, V), loss); `visuals[k]`: the rows at the
        k-th tag. The loss is the LLM's shifted cross-entropy, the mean over supervised tokens (visual rows are
        IGNORE), over the LLM's own vocabulary: the reference has no placeholder column."""
        embed = self.llm.get_input_embeddings()
        ids, labels, pieces, rows = [], [], [], iter(visuals)
        for token, label in zip(*self.encode(turns), strict=True):
            if token == MARK:
                visual = torch.cat(next(rows))
                ids += [None] * visual.shape[0]
                labels += [IGNORE] * visual.shape[0]
                pieces.append(visual)
            else:
                ids.append(token)
                labels.append(label)
                pieces.append(embed(torch.tensor([token])))
        logits = self.llm(inputs_embeds=torch.cat(pieces)[None]).logits[0]
        loss = F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=IGNORE)
        return ids, labels, logits, loss


# -- inputs -------------------------------------------------------------------------------------------------
def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [noise(90, 60, 1), noise(50, 80, 2)]  # wide and tall: padded on y, then on x
IMAGE_BOXES = [  # original pixels; the second "cat" falls to NMS, "dog" (another label) stays, "ball" is clipped
    {"boxes": [[10, 5, 50, 40], [12, 6, 52, 41], [12, 6, 52, 41], [60, 30, 95, 70]],
     "scores": [0.9, 0.6, 0.7, 0.8], "labels": ["cat", "cat", "dog", "ball"]},
    {"boxes": [[0, 0, 50, 80], [20, 30, 30, 45]], "scores": [0.5, 0.95], "labels": ["table", "cup"]},
]  # fmt: skip
IMAGE_TURNS = [
    ("<image>\nWhat is in the first picture?", "A red circle on a gray square."),
    ("<image>\nAnd in the second one?", "A gray square."),
    ("Which is larger?", "The circle."),
]
TEXT_TURNS = [("What is a circle?", "A round shape."), ("And a square?", "Four equal sides.")]
FRAMES = [
    noise(80, 48, 10 + t) for t in range(8)
]  # short side 48: x crop start 42 in both of the ref's rules
FRAME_BOXES = [  # frame 3's box lies left of the crop (dropped: zero-box fallback), odd frames have none
    {"boxes": [[5 + t, 4, 40 + t, 30], [30, 10, 70, 44]], "scores": [0.9, 0.8], "labels": ["person", "ball"]}
    if t % 2 == 0 else {"boxes": [[0, 0, 10, 20]] if t == 3 else [], "scores": [0.5] if t == 3 else [],
                        "labels": ["cup"] if t == 3 else []}
    for t in range(8)
]  # fmt: skip
VIDEO_TURNS = [("<video>\nWhat happens in the video?", "A ball rolls past a person.")]


def messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


# -- conversion ---------------------------------------------------------------------------------------------
def assemble_args(
    components: dict[str, Path], llm: Path, template: str, out: Path, reference: Path
) -> list[str]:
    return ["assemble", "--clip", str(components["clip"]), "--convnext", str(components["convnext"]),
            "--llm", str(llm), "--template", template, "--reference", str(reference),
            "--high-res-size", str(HIGH_RES), "--dtype", "float32", "--out", str(out)]  # fmt: skip


def reference_files(root: Path, template: str, form: str, **llm_size) -> tuple[Path, dict, Path]:
    llm = formats.write_llm_folder(root / "llm", TEMPLATES[template]["markers"], **llm_size)
    state = formats.reference_checkpoint(llm, formats.CLIP_VISION["hidden_size"], formats.TRUNK_DIMS)
    return llm, state, formats.save_reference_pth(state, root / "mg_llava.pth", form)


@pytest.fixture(scope="module")
def converted(tiny_components, tmp_path_factory):
    """template -> (our model and processor from the assembled folder, the reference over the same files)."""
    cache = {}

    def get(template: str):
        if template not in cache:
            root = tmp_path_factory.mktemp(template)
            llm, state, pth = reference_files(root, template, FORMS[template])
            assert main(assemble_args(tiny_components, llm, template, root / "out", pth)) == 0
            model = AutoModelForImageTextToText.from_pretrained(root / "out").eval()
            processor = AutoProcessor.from_pretrained(root / "out")
            reference = Reference(tiny_components["clip"], tiny_components["convnext"], llm, state, template)
            cache[template] = model, processor, reference
        return cache[template]

    return get


def compare(model, processor, ref: tuple, **visuals) -> None:
    """Our ids, labels, logits and loss against the reference's `ref` = (ids, labels, logits, loss)."""
    ref_ids, ref_labels, ref_logits, ref_loss = ref
    inputs, turns = visuals.pop("inputs"), visuals.pop("turns")
    batch = processor.apply_chat_template(
        messages(turns), tokenize=True, return_dict=True, **visuals, **inputs
    )
    with torch.no_grad():
        out = model(**batch)
    expected_ids = [processor.image_token_id if t is None else t for t in ref_ids]
    assert batch["input_ids"][0].tolist() == expected_ids
    assert batch["labels"][0].tolist() == ref_labels
    vocab = ref_logits.shape[-1]
    torch.testing.assert_close(out.logits[0, :, :vocab], ref_logits, atol=1e-4, rtol=0)
    assert not out.logits[
        0, :, vocab:
    ].any()  # the <image> row the converter added (zero, suppressed in generation)
    assert abs(out.loss.item() - ref_loss.item()) < LOSS_TOL  # its column is not in the loss


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_two_images_multi_turn_logits_match_the_reference(converted, template):
    model, processor, ref = converted(template)
    with torch.no_grad():
        visuals = []
        for image, record in zip(IMAGES, IMAGE_BOXES, strict=True):
            low, high = ref.image_pixels(image)
            visuals.append(ref.visual_rows(low, high, [ref.image_boxes(record, *image.size)]))
        expected = ref.forward(IMAGE_TURNS, visuals)
    assert [v[0].shape[0] for v in visuals] == [16 + 3, 16 + 2]  # NMS dropped one box, the clipped one stayed
    compare(model, processor, expected, turns=IMAGE_TURNS, inputs=dict(images=IMAGES, boxes=IMAGE_BOXES))


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_text_only_logits_match_the_reference(converted, template):
    model, processor, ref = converted(template)
    with torch.no_grad():
        expected = ref.forward(TEXT_TURNS, [])
    compare(model, processor, expected, turns=TEXT_TURNS, inputs={})


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_video_logits_match_the_reference(converted, template):
    model, processor, ref = converted(template)
    w, h = FRAMES[0].size
    with torch.no_grad():
        low, high = ref.video_pixels(FRAMES, ref.low), ref.video_pixels(FRAMES, HIGH_RES)
        boxes = [ref.frame_boxes(record, w, h) for record in FRAME_BOXES]
        rows = ref.visual_rows(low, high, boxes)
        expected = ref.forward(VIDEO_TURNS, [rows])
    assert [len(b) for b in boxes] == [2, 1, 2, 1, 2, 1, 2, 1]  # frame 3's box dropped: the zero-box fallback
    inputs = dict(videos=[FRAMES], video_boxes=[FRAME_BOXES])
    compare(model, processor, expected, turns=VIDEO_TURNS, inputs=inputs)


# -- the converter's bad inputs -----------------------------------------------------------------------------
def refused(args: list[str], capsys, out: Path) -> str:
    assert main(args) == 2
    assert not out.exists()  # nothing written
    return capsys.readouterr().err


def test_reference_for_another_llm_size_is_refused(tiny_components, tmp_path, capsys):
    llm, _, _ = reference_files(tmp_path / "small", "vicuna", "bare")
    _, _, pth = reference_files(tmp_path / "large", "vicuna", "state_dict", hidden_size=96, num_layers=3)
    err = refused(
        assemble_args(tiny_components, llm, "vicuna", tmp_path / "out", pth), capsys, tmp_path / "out"
    )
    assert (
        "has hidden size 96 and 3 layers but the LLM folder" in err and "hidden size 64 and 2 layers" in err
    )


def test_truncated_reference_is_refused(tiny_components, tmp_path, capsys):
    llm, _, pth = reference_files(tmp_path, "vicuna", "module_prefix")
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) * 2 // 3])
    err = refused(
        assemble_args(tiny_components, llm, "vicuna", tmp_path / "out", pth), capsys, tmp_path / "out"
    )
    assert f"{pth}: cannot read checkpoint, truncated" in err


def test_template_that_does_not_match_the_tokenizer_is_refused(tiny_components, tmp_path, capsys):
    llm, _, pth = reference_files(tmp_path, "vicuna", "bare")  # a Llama-2-like tokenizer: no chat markers
    args = assemble_args(tiny_components, llm, "llama3_chat", tmp_path / "out", pth)
    err = refused(args, capsys, tmp_path / "out")
    assert "chat template 'llama3_chat' does not match this tokenizer" in err
    assert "<|start_header_id|>, <|end_header_id|>, <|eot_id|> are not tokens of it" in err


def test_reference_is_unpickled_once(tiny_components, tmp_path):
    llm, state, pth = reference_files(tmp_path, "vicuna", "state_dict")
    with mock.patch("torch.load", wraps=torch.load) as load:
        model, _ = assemble(tiny_components["clip"], tiny_components["convnext"], llm, "vicuna", reference=pth,
                            high_res_image_size=HIGH_RES)  # fmt: skip
    assert [Path(c.args[0]) for c in load.call_args_list].count(pth) == 1
    assert torch.equal(model.fusion.slow_proj.weight, state["fuse_module.slow_proj.weight"])
    assert torch.equal(model.language_model.norm.weight, state["llm.model.norm.weight"])


def test_stage1_reference_without_llm_keeps_the_folders_llm(tiny_components, tmp_path, caplog):
    llm, state, _ = reference_files(tmp_path, "vicuna", "bare")
    pth = formats.save_reference_pth(
        {k: v for k, v in state.items() if not k.startswith("llm.")}, tmp_path / "stage1.pth", "bare"
    )
    with caplog.at_level(logging.WARNING):
        model, _ = assemble(tiny_components["clip"], tiny_components["convnext"], llm, "vicuna", reference=pth,
                            high_res_image_size=HIGH_RES)  # fmt: skip
    assert "has no llm.* weights" in caplog.text
    folder = AutoModelForCausalLM.from_pretrained(llm)
    assert torch.equal(model.language_model.norm.weight, folder.model.norm.weight)
    assert torch.equal(model.projector[0].weight, state["projector.model.0.weight"])


# -- bf16 ----------------------------------------------------------------------------------------------------
# Under CPU bf16 autocast (how training and bf16 serving run) both implementations round at their own points,
# so they agree only to bf16 precision: the logits may differ by the float32 run's difference plus
# BF16_LOGITS bf16 ulps (2**-8) of the largest float32 logit (measured: 1.2 ulps, 0.0042 on logits up to
# 0.87, against 5e-7 in float32), and the greedy choice (argmax) must agree at GREEDY_AGREEMENT of the
# positions at least (measured: all; argmax may flip where two logits are within bf16 rounding).
BF16_LOGITS = 4
GREEDY_AGREEMENT = 0.9


def test_two_images_logits_match_the_reference_under_bf16_autocast(converted):
    model, processor, ref = converted("vicuna")
    batch = processor.apply_chat_template(
        messages(IMAGE_TURNS), tokenize=True, return_dict=True, images=IMAGES, boxes=IMAGE_BOXES
    )
    runs = {}
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            visuals = []
            for image, record in zip(IMAGES, IMAGE_BOXES, strict=True):
                low, high = ref.image_pixels(image)
                visuals.append(ref.visual_rows(low, high, [ref.image_boxes(record, *image.size)]))
            expected = ref.forward(IMAGE_TURNS, visuals)[2].float()
            got = model(**batch).logits[0, :, : expected.shape[-1]].float()
        runs[autocast] = got, expected
    (fp32, fp32_ref), (bf16, bf16_ref) = runs[False], runs[True]
    tolerance = (fp32 - fp32_ref).abs().max() + BF16_LOGITS * 2.0**-8 * fp32_ref.abs().max()
    assert (bf16 - bf16_ref).abs().max() <= tolerance
    assert (bf16.argmax(-1) == bf16_ref.argmax(-1)).float().mean() >= GREEDY_AGREEMENT
    assert not torch.equal(bf16, fp32)  # autocast did run in bf16
