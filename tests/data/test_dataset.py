"""LLaVA-format datasets: mixtures with sampling rules, video samples with per-frame boxes."""

import json

import pytest

from mgllava import MGLlavaProcessor
from mgllava.data.config import DataConfig, DataSource
from mgllava.data.dataset import LlavaDataset, load_samples

from .. import synth
from ..formats import write_video


def test_mixture_with_sampling_rules(tmp_path):
    a = synth.write_dataset(tmp_path / "a", n=6)
    b = synth.write_dataset(tmp_path / "b", n=8)
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(
        f"sources:\n  - {{path: {a['data']}, image_root: {a['images']}, sample: 'first:3'}}\n"
        f"  - {{path: {b['data']}, image_root: {b['images']}, sample: 'random:2'}}\n"
    )
    config = DataConfig(
        sources=[DataSource(path=str(a["data"]), image_root=str(a["images"]))], mixture=str(mixture)
    )
    samples = load_samples(config, seed=3)
    assert [s.id for s in samples[:9]] == [f"s{i:03d}" for i in range(6)] + ["s000", "s001", "s002"]
    assert len(samples) == 11 and samples[-1].source.path == str(b["data"])
    assert [s.id for s in load_samples(config, seed=3)] == [s.id for s in samples]  # deterministic
    with pytest.raises(ValueError, match="sample rule 'half'"):
        DataSource(path="x", sample="half")


def test_video_sample_with_per_frame_boxes(tmp_path):
    write_video(tmp_path / "clip.mp4")
    data = tmp_path / "videos.json"
    data.write_text(json.dumps([{"id": "v1", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "It gets brighter."}]}]))  # fmt: skip
    boxes = tmp_path / "video_boxes.json"  # the reference's video box format
    frames = [{"boxes": [[0, 0, 10, 10]] * (t % 3 + 1), "scores": [0.5] * (t % 3 + 1),
               "labels": [f"obj{k}" for k in range(t % 3 + 1)]} for t in range(8)]  # fmt: skip
    boxes.write_text(json.dumps([{"video": "clip.mp4", "frames": frames}]))
    source = DataSource(path=str(data), video_root=str(tmp_path), boxes=str(boxes))
    dataset = LlavaDataset(load_samples(DataConfig(sources=[source])), MGLlavaProcessor.from_preset("tiny"))
    item = dataset[0]
    assert item["pixel_values"].shape == (8, 3, 56, 56)
    assert item["object_counts"].tolist() == [t % 3 + 1 for t in range(8)]
    rows = sum(1 for t in item["input_ids"] if t == dataset.processor.image_token_id)
    assert rows == 8 * 16 + sum(t % 3 + 1 for t in range(8))


def test_sample_index_reads_records_on_access_and_skips_ids(tmp_path):
    files = synth.write_dataset(tmp_path, n=6, text_only=3)
    samples = load_samples(
        DataConfig(sources=[DataSource(path=str(files["data"]), boxes=str(files["boxes"]))])
    )
    records = json.loads(files["data"].read_text())
    assert [s.record for s in samples] == records and [s.record for s in samples[2:4]] == records[2:4]
    assert samples.lengths.tolist() == [s.length() for s in samples]
    assert samples.multimodal.tolist() == [True] * 6 + [False] * 3
    kept = samples.without({"s001", "t002", "nope"})
    assert [s.id for s in kept] == [r["id"] for r in records if r["id"] not in {"s001", "t002"}]
    assert kept.lengths.tolist() == [s.length() for s in kept]


def test_ranks_scan_their_share_of_the_files_and_map_all_of_them(tmp_path):
    from mgllava.data.dataset import scan_share

    files = synth.write_dataset(tmp_path, n=6, text_only=1)
    config = DataConfig(sources=[DataSource(path=str(files["data"]), boxes=str(files["boxes"]))])
    cache = tmp_path / "cache"
    scan_share(config, cache, rank=0, world=2)
    first = {p.name for p in cache.iterdir()}
    scan_share(config, cache, rank=1, world=2)
    both = {p.name for p in cache.iterdir()}
    assert len(first) == 1 and len(both) == 2  # one file each: the data file's scan and the box file's
    samples = load_samples(config, cache=cache)
    assert {p.name for p in cache.iterdir()} == both and [s.id for s in samples][:2] == ["s000", "s001"]
    assert samples[0].boxes.index.by_id["s000"].boxes.labels == ["circle"]
