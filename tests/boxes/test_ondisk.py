"""The box file indexed on disk answers every look-up exactly as the in-memory index does."""

import json

import numpy as np
import pytest
import torch

from mgllava.boxes.files import BoxIndex
from mgllava.boxes.lookup import BoxLookup, ImageKey
from mgllava.boxes.ondisk import DiskBoxIndex


def box_records():
    out = []
    for i in range(40):
        out.append({"id": f"s{i}", "image": f"dir{i % 3}/{i % 25}.jpg", "sha256": f"h{i}", "frame": [64, 48],
                    "boxes": [[i, 0, i + 5, 5]], "scores": [0.5], "labels": [f"obj{i}"]})  # fmt: skip
    out.append(
        {
            "id": "shared",
            "ids": ["shared", "s1"],
            "image": "dir1/1.jpg",
            "frame": [64, 48],
            "boxes": [[1, 0, 6, 5]],
            "scores": [0.5],
            "labels": ["obj1"],
        }
    )  # fmt: skip  same boxes as s1
    out.append({"id": "bad", "image": "bad.jpg", "error": "cannot decode"})
    out.append(
        {"video": "clips/v1.mp4", "frames": [{"boxes": [[0, 0, 1, 1]], "scores": [0.9], "labels": ["x"]}] * 3}
    )
    return out


@pytest.mark.parametrize("layout", ["ours.jsonl", "reference.json"])
def test_every_lookup_equals_the_in_memory_index(tmp_path, layout):
    path = tmp_path / layout
    rows = box_records()
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) if layout.endswith("l") else json.dumps(rows, indent=1)
    )
    memory, disk = BoxLookup(BoxIndex.load(path)), BoxLookup.on_disk(path)
    assert isinstance(disk.index, DiskBoxIndex) and len(disk.index) == len(rows)
    keys = [ImageKey((f"s{i}",), f"dir{i % 3}/{i % 25}.jpg") for i in range(45)]
    keys += [ImageKey((), f"other/{i}.jpg") for i in range(30)]  # by unique file name, or a miss
    keys += [ImageKey(("shared",)), ImageKey(("bad",), "bad.jpg"), ImageKey((), None)]
    for key in keys:
        for single in (True, False):
            a, b = memory.image(key, single), disk.image(key, single)
            assert (a is None) == (b is None), key
            if a is not None:
                assert torch.equal(a.xyxy, b.xyxy) and a.labels == b.labels and a.frame == b.frame
    for ids, video in [((), "clips/v1.mp4"), (("v1",), None), ((), "elsewhere/v1.mp4"), ((), "v2.mp4")]:
        a, b = memory.video(ids, video), disk.video(ids, video)
        assert (a is None) == (b is None) and (a is None or len(a) == len(b))
    assert memory.counts == disk.counts and memory.missed == disk.missed


def test_an_id_with_two_different_boxes_is_an_error(tmp_path):
    path = tmp_path / "dup.jsonl"
    rows = [
        {"id": "7", "boxes": [[0, 0, 1, 1]]},
        {"id": "8", "boxes": []},
        {"id": "7", "boxes": [[0, 0, 2, 2]]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="id '7' appears twice with different boxes"):
        DiskBoxIndex(path)


def test_a_malformed_record_is_named_at_lookup(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "1", "boxes": [[0, 0, 1]]}) + "\n")
    index = DiskBoxIndex(path)
    with pytest.raises(ValueError, match=r"bad\.jsonl record 1: bad boxes"):
        index.by_id["1"]


def test_a_kept_scan_answers_as_the_first(tmp_path):
    path = tmp_path / "boxes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in box_records()))
    first, kept = DiskBoxIndex(path, tmp_path / "cache"), DiskBoxIndex(path, tmp_path / "cache")
    assert isinstance(kept.by_id.hashes, np.memmap)
    for key in ["s3", "shared", "bad", "nope"]:
        a, b = first.by_id.get(key), kept.by_id.get(key)
        assert (a is None and b is None) or a.to_json() == b.to_json()
    assert (
        kept.by_name.get("24.jpg").id == first.by_name.get("24.jpg").id and kept.by_name.get("1.jpg") is None
    )
