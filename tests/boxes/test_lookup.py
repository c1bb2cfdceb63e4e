"""The one box look-up rule (boxes.lookup): ids, then path, then content hash, then a unique file name;
videos by id, path, stem; every look-up counted; too many misses refused."""

import json

import pytest
from PIL import Image

from mgllava.boxes import BoxLookup, ImageKey, MissingBoxes
from mgllava.utils.hashing import sha256_file


def box_file(tmp_path, records):
    path = tmp_path / "boxes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return BoxLookup.load(path)


def test_the_rule_order_and_its_counts(tmp_path):
    image = tmp_path / "pics" / "cat.png"
    image.parent.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(image)
    lookup = box_file(tmp_path, [
        {"id": "7", "boxes": [[0, 0, 1, 1]], "labels": ["by-id"]},
        {"id": "a", "image": "train/dog.png", "boxes": [[0, 0, 2, 2]], "labels": ["by-path"]},
        {"id": "b", "sha256": sha256_file(image), "boxes": [[0, 0, 3, 3]], "labels": ["by-hash"]},
        {"id": "c", "image": "elsewhere/bird.png", "boxes": [[0, 0, 4, 4]], "labels": ["by-name"]},
        {"id": "d", "image": "x/twin.png", "boxes": [[0, 0, 5, 5]]},
        {"id": "e", "image": "y/twin.png", "boxes": [[0, 0, 6, 6]]},
        {"id": "broken", "image": "bad.png", "error": "cannot decode"},
    ])  # fmt: skip
    assert lookup.image(ImageKey(("nope", "7"), "train/dog.png")).labels == ["by-id"]  # ids first, in order
    assert lookup.image(ImageKey(("7",), "train/dog.png"), single=False).labels == ["by-path"]  # multi-image
    assert lookup.image(ImageKey.of(image, ["zzz"], "pics/cat.png")).labels == ["by-hash"]
    assert lookup.image(ImageKey(path="mine/bird.png")).labels == ["by-name"]
    assert lookup.image(ImageKey(path="z/twin.png")) is None  # two records named twin.png: ambiguous
    assert lookup.image(ImageKey(("broken",))) is None  # a recorded error is a miss
    summary = lookup.summary()
    assert summary["found"] == {"id": 1, "path": 1, "sha256": 1, "name": 1}
    assert summary["missing"] == 2 and summary["missing_examples"] == ["path 'z/twin.png'", "id 'broken'"]


def test_videos_by_id_path_or_stem(tmp_path):
    frames = [{"boxes": [[0, 0, 1, 1]]}] * 8
    lookup = box_file(tmp_path, [{"id": "v1", "video": "clips/v1.mp4", "frames": frames},
                                 {"video": "v2.avi", "frames": frames}])  # fmt: skip
    assert len(lookup.video(["v1"])) == 8
    assert len(lookup.video([], "clips/v1.mp4")) == 8
    assert len(lookup.video([], "/data/msvd/v2.mp4")) == 8  # the reference keys videos by name
    assert lookup.video(["v3"], "v3.mp4") is None
    assert lookup.summary()["found"] == {"id": 1, "path": 1, "name": 1}


def test_too_many_misses_are_refused_naming_the_file_and_examples(tmp_path):
    lookup = box_file(tmp_path, [{"id": "1", "boxes": [[0, 0, 1, 1]]}])
    for rid in ("1", "2", "3"):
        lookup.image(ImageKey((rid,)))
    lookup.check_missing(0.7)
    with pytest.raises(MissingBoxes, match=r"2 of 3 images \(66.7%\) have no boxes in .*boxes.jsonl.*id '2'"):
        lookup.check_missing(0.5)
