"""Box files: our JSONL and the reference's JSON read into one index; lookups by id, path and hash."""

import json

import pytest

from mgllava.boxes import Boxes
from mgllava.boxes.files import BoxIndex, BoxRecord, to_reference_json


def test_reference_json_round_trip(tmp_path):
    reference = [
        {"id": 12, "boxes": [[1, 2, 30, 40]], "scores": [0.5], "labels": ["cat"]},
        {"id": "x9", "boxes": [], "scores": [], "labels": []},
        {
            "video": "clip_01.mp4",
            "frames": [{"boxes": [[0, 0, 5, 5]], "scores": [0.9], "labels": ["dog"]}] * 8,
        },
    ]
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(reference))
    index = BoxIndex.load(path)
    assert index.boxes_for(id="12").labels == ["cat"]
    assert index.boxes_for(id=12).xyxy.tolist() == [[1, 2, 30, 40]]
    assert len(index.boxes_for(id="x9")) == 0
    assert len(index.frames_for(video="clip_01.mp4")) == 8
    assert to_reference_json(index.records) == [
        {"id": "12", "boxes": [[1.0, 2.0, 30.0, 40.0]], "scores": [0.5], "labels": ["cat"]},
        {"id": "x9", "boxes": [], "scores": [], "labels": []},
        {
            "video": "clip_01.mp4",
            "frames": [{"boxes": [[0.0, 0.0, 5.0, 5.0]], "scores": [0.8999999761581421], "labels": ["dog"]}]
            * 8,
        },
    ]


def test_our_jsonl_lookups_by_id_path_hash_and_errors(tmp_path):
    records = [
        BoxRecord(id="a", image="imgs/a.jpg", sha256="h1", boxes=Boxes([[0, 0, 1, 1]], frame=(10, 10))),
        BoxRecord(id="b", image="imgs/b.jpg", error="cannot decode"),
    ]
    path = tmp_path / "boxes.jsonl"
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    index = BoxIndex.load(path)
    assert index.boxes_for(image="imgs/a.jpg").frame == (10, 10)
    assert index.boxes_for(sha256="h1") is index.boxes_for(id="a")
    assert index.boxes_for(id="b") is None and [r.id for r in index.errors] == ["b"]
    assert index.boxes_for(id="zzz") is None


def test_duplicate_ids_must_agree(tmp_path):
    same = [{"id": 1, "boxes": [[0, 0, 1, 1]]}, {"id": 1, "boxes": [[0, 0, 1, 1]]}]
    (tmp_path / "same.json").write_text(json.dumps(same))
    assert len(BoxIndex.load(tmp_path / "same.json").by_id) == 1
    (tmp_path / "diff.json").write_text(json.dumps([same[0], {"id": 1, "boxes": [[5, 5, 9, 9]]}]))
    with pytest.raises(ValueError, match="id '1' appears twice with different boxes"):
        BoxIndex.load(tmp_path / "diff.json")


@pytest.mark.parametrize(
    "content, match",
    [("{not json", "not valid JSON"), ('"a string"', "expected a list"), ('[{"id": 1}]', "neither 'boxes'"),
     ('[{"id": 1, "boxes": [[1, 2, 3]]}]', "bad boxes")],
)  # fmt: skip
def test_malformed_box_files_are_named(tmp_path, content, match):
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        BoxIndex.load(path)
