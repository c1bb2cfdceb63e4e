"""Records read from disk on access: JSON lists (any formatting, any UTF-8, chunk boundaries anywhere) and
JSONL give back exactly the records `json` parses, and malformed files name the file."""

import json

import pytest

from mgllava.utils import records
from mgllava.utils.records import RecordFile, RecordFileError

RECORDS = [{"id": i, "text": "é€😀[]{}," * (i % 4), "nested": [1, {"a": "]"}]} for i in range(30)] + [
    3,
    "s",
    None,
]


@pytest.mark.parametrize("layout", ["compact", "indented", "jsonl"])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 24])
def test_every_record_comes_back_from_its_span(tmp_path, monkeypatch, layout, chunk):
    monkeypatch.setattr(records, "CHUNK", chunk)  # chunk boundaries inside records and UTF-8 characters
    path = tmp_path / ("data.jsonl" if layout == "jsonl" else "data.json")
    if layout == "jsonl":
        path.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in RECORDS), encoding="utf-8"
        )
    else:
        path.write_text(
            json.dumps(RECORDS, ensure_ascii=False, indent=2 if layout == "indented" else None),
            encoding="utf-8",
        )
    seen = []
    index = RecordFile.scan(path, lambda i, r: seen.append((i, r)))
    assert seen == list(enumerate(RECORDS))
    assert [index.read(i) for i in reversed(range(len(index)))] == RECORDS[::-1]


@pytest.mark.parametrize(
    "text, match",
    [("", "empty file"), ('{"id": 1}', "expected a JSON list"), ('[{"id": 1}', "not closed"),
     ('[{"id": 1}, {"id" 2}]', "not valid JSON at byte 18")],
)  # fmt: skip
def test_malformed_lists_name_the_file(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(RecordFileError, match=rf"bad\.json: .*{match}"):
        RecordFile.scan(path)


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n{oops\n')
    with pytest.raises(RecordFileError, match=r"bad\.jsonl:2: not valid JSON"):
        RecordFile.scan(path)


def test_a_kept_scan_is_mapped_back_and_a_changed_file_is_scanned_again(tmp_path):
    path, cache = tmp_path / "data.jsonl", tmp_path / "cache"
    path.write_text('{"id": 1}\n{"id": 2}\n')
    calls = []

    def build():
        calls.append(1)
        index = RecordFile.scan(path)
        return {"starts": index.starts, "stops": index.stops}

    first = records.cached_arrays(path, "test", build, cache)
    again = records.cached_arrays(path, "test", build, cache)
    assert len(calls) == 1 and isinstance(again["starts"], records.np.memmap)
    assert again["starts"].tolist() == first["starts"].tolist() == [0, 10]
    path.write_text('{"id": 1}\n{"id": 22}\n{"id": 3}\n')  # another size: another key
    assert records.cached_arrays(path, "test", build, cache)["starts"].tolist() == [0, 10, 21]
    assert len(calls) == 2
