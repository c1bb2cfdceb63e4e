"""Video: PyAV decoding and uniform sampling, the reference's per-frame transforms, the token layout."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.data.image_processor import CLIP_MEAN, CLIP_STD
from mgllava.data.video import frame_pixels
from mgllava.media.video import VideoError, load_video_frames, sample_indices

from ..formats import write_video


def test_uniform_sampling_like_the_reference():
    assert sample_indices(20, 8) == [0, 2, 5, 8, 10, 13, 16, 19]
    assert sample_indices(3, 8) == [0, 0, 0, 0, 1, 1, 1, 2]
    with pytest.raises(VideoError, match="no frames"):
        sample_indices(0, 8)


def test_decoded_frames_are_the_sampled_ones(tmp_path):
    frames = load_video_frames(write_video(tmp_path / "v.mp4"), 8)
    levels = [round(float(np.asarray(f).mean()) / 10) for f in frames]
    assert levels == sample_indices(20, 8)


def test_frame_pixels_follow_the_reference_transform():
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)) for _ in range(3)]
    out = frame_pixels(frames, 16, list(CLIP_MEAN), list(CLIP_STD))
    # reference: (C,T,H,W) /255, NormalizeVideo, ShortSideScale(16) -> (16, floor(50/30*16)=26), centre crop 16
    clip = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).permute(3, 0, 1, 2).float() / 255
    clip = (clip - torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    clip = F.interpolate(clip, size=(16, math.floor(50 / 30 * 16)), mode="bilinear", align_corners=False)
    expected = clip[..., :, 5:21].permute(1, 0, 2, 3)
    torch.testing.assert_close(out, expected)


def test_video_tokens_laid_out_frame_after_frame(tmp_path):
    processor = MGLlavaProcessor.from_preset("tiny")
    video = write_video(tmp_path / "v.mp4")
    boxes = [[[0, 0, 10, 10]] if t % 2 else [[0, 0, 10, 10], [30, 20, 47, 31]] for t in range(8)]
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    inputs = processor.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=True, videos=[video], video_boxes=[boxes]
    )
    assert inputs["pixel_values"].shape == (8, 3, 56, 56)
    assert inputs["object_counts"].tolist() == [2, 1] * 4
    rows = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert rows == 8 * 16 + 12
    model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_frame_boxes_use_the_crop_offset(tmp_path):
    processor = MGLlavaProcessor.from_preset("tiny").image_processor
    frames = [Image.new("RGB", (200, 100))] * 8  # short side 100 -> 128, long 256, crop offset x = 64
    out = processor.video(frames, boxes=[[[80, 10, 120, 50]]] + [None] * 7)
    # scale 1.28: [102.4, 12.8, 153.6, 64] -> round -> [102, 13, 154, 64] -> shift x by -64
    assert out["object_boxes"][0].tolist() == [38, 13, 90, 64]
    assert out["object_counts"].tolist() == [1] * 8  # frames without boxes get the zero-box fallback


def test_bad_videos_fail_clearly(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        load_video_frames(tmp_path / "missing.mp4", 8)
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoError, match="cannot decode"):
        load_video_frames(tmp_path / "junk.mp4", 8)
    processor = MGLlavaProcessor.from_preset("tiny")
    with pytest.raises(ValueError, match="1 <video> tags but 0 videos"):
        processor(text="<video> what?", videos=[])
    with pytest.raises(ValueError, match="boxes for 2 frames but the video gives 8"):
        processor.image_processor.video([Image.new("RGB", (20, 20))] * 8, boxes=[None, None])


# -- video at the paper's sizes: 8 x (576 + n) rows, past the LLM's 4096 positions ---------------------------
def real_frames(n: int = 8, size: tuple[int, int] = (640, 360)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def grid_boxes(per_frame: int = 100) -> dict:
    """`per_frame` disjoint boxes with distinct labels inside the centre 360x360 crop of a 640x360 frame: NMS,
    the cap and the crop keep them all."""
    corners = [(140 + 36 * (k % 10), 36 * (k // 10)) for k in range(per_frame)]
    boxes = [[x, y, x + 30, y + 30] for x, y in corners]
    return {"boxes": boxes, "scores": [0.5] * per_frame, "labels": [f"thing {k}" for k in range(per_frame)]}


def preset_engine(name: str, **processor_overrides):
    """The preset's model at its real widths on the meta device (no weights) and its processor, with the
    packaged tokenizer in place of the LLM's (its `<image>` is id 4)."""
    from mgllava.inference import Engine
    from mgllava.model.configuration import load_preset

    config = MGLlavaConfig.from_preset(name, image_token_id=4)
    with torch.device("meta"):
        model = MGLlavaForConditionalGeneration(config)
    spec = load_preset(name)["processor"]
    settings = {k: spec[k] for k in ("template", "max_length", "video_max_length") if k in spec}
    tokenizer = MGLlavaProcessor.from_preset("tiny").tokenizer
    return Engine(
        model, MGLlavaProcessor.for_config(config, tokenizer, **{**settings, **processor_overrides})
    )


def video_question() -> list[dict]:
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]


def test_video_preset_takes_eight_real_frames_with_100_objects_each():
    from mgllava.inference import GenerationSettings

    engine = preset_engine("mgllava-vicuna-7b-video")
    config = engine.model.config
    assert config.text_config.max_position_embeddings == 4096  # Vicuna's, unchanged
    assert config.text_config.rope_parameters["rope_type"] == "default"  # no RoPE scaling, as the reference
    prepared = engine.prepare(
        video_question(),
        video=real_frames(),
        video_boxes=[grid_boxes()] * 8,
        settings=GenerationSettings(256),
    )
    rows = sum(1 for t in prepared.input_ids if t == config.image_token_id)
    assert rows == 8 * (576 + 100)
    assert 4096 < len(prepared.input_ids) + 256 <= config.context_length == engine.context_length == 8192
    assert [len(v.boxes) for v in prepared.video] == [100] * 8


def test_image_presets_refuse_real_videos_naming_the_setting():
    from mgllava.inference import EngineInputError, GenerationSettings

    settings = GenerationSettings(16)
    frames, boxes = real_frames(), [grid_boxes(4)] * 8
    with pytest.raises(
        EngineInputError, match=r"4,?6\d\d visual rows.* exceeds max_length 2048.*video_max_length"
    ):
        preset_engine("mgllava-vicuna-7b").prepare(
            video_question(), video=frames, video_boxes=boxes, settings=settings
        )
    engine = preset_engine("mgllava-vicuna-7b", video_max_length=8192)  # a budget, but a 4096-position model
    with pytest.raises(
        EngineInputError, match=r"context of 4096 tokens \(its LLM's max_position_embeddings\)"
    ):
        engine.prepare(video_question(), video=frames, video_boxes=boxes, settings=settings)


@pytest.fixture(scope="module")
def narrow_video_model(tmp_path_factory):
    """Real geometry (CLIP 336 px / 14 = 24x24 = 576 rows, ConvNeXt 768 px / 32 = 24) and Vicuna's 4096 positions
    with the video preset's context_length, every width tiny: real sequence lengths on a CPU."""
    from mgllava.convert import write_folder

    config = MGLlavaConfig.from_preset(
        "tiny",
        context_length=MGLlavaConfig.from_preset("mgllava-vicuna-7b-video").context_length,
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 14, "image_size": 336},
        high_res_config={"model_type": "convnext", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1],
                         "layer_norm_eps": 1e-6, "image_size": 768},
        text_config={**MGLlavaConfig.from_preset("tiny").text_config.to_dict(), "max_position_embeddings": 4096},
    )  # fmt: skip
    torch.manual_seed(0)
    model = MGLlavaForConditionalGeneration(config).eval()
    processor = MGLlavaProcessor.for_config(config, MGLlavaProcessor.from_preset("tiny").tokenizer, "vicuna")
    return write_folder(model, processor, tmp_path_factory.mktemp("narrow") / "model")


def test_chat_answers_about_a_real_size_video_past_4096_positions(narrow_video_model, tmp_path, capsys):
    from mgllava.cli import main

    video = write_video(tmp_path / "clip.mp4", size=(640, 360))
    args = ["chat", "--model", str(narrow_video_model), "--video", str(video), "--max-tokens", "2"]
    assert main([*args, "--prompt", "What happens?", "--show-boxes"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("video frame") == 8
    processor = MGLlavaProcessor.from_pretrained(narrow_video_model)
    assert (processor.max_length, processor.video_max_length) == (2048, 8192)  # saved with the folder
    inputs = processor.apply_chat_template(
        video_question(), add_generation_prompt=True, tokenize=True, return_dict=True, videos=[str(video)]
    )
    assert inputs["input_ids"].shape[1] > 8 * 577 > 4096  # no boxes: one zero-box fallback row per frame
