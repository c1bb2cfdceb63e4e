"""Shared utilities: atomic files, resumable JSONL, sharding."""

import json
import os

import pytest

from mgllava.utils.dist import gather_objects, info, shard
from mgllava.utils.io import JsonlError, JsonlWriter, atomic_write_json, read_jsonl


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "a.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert os.listdir(tmp_path / "sub") == ["a.json"]


def test_jsonl_writer_resumes_after_a_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path, key=lambda r: r["id"]) as writer:
        writer.write({"id": 1})
        writer.write({"id": 2})
    with path.open("a") as handle:
        handle.write('{"id": 3, "val')  # killed mid-write
    writer = JsonlWriter(path, key=lambda r: r["id"])
    assert writer.done == {1, 2}
    writer.write({"id": 3})
    writer.close()
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3]


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(JsonlError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_jsonl(path))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(JsonlError, match=r":2: expected a JSON object"):
        list(read_jsonl(path))


def test_shard_covers_everything_once():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_single_process_defaults():
    assert info().world_size == 1 and info().is_main
    assert gather_objects({"a": 1}) == [{"a": 1}]
