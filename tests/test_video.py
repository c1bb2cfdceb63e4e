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

from .formats import write_video


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
