"""`mgllava check-data` and training with bad samples: every problem named, counted, and left out."""

import json

from mgllava.cli import main
from mgllava.utils.io import read_jsonl

from .. import synth


def bad_dataset(root):
    files = synth.write_dataset(root, n=8, text_only=1)
    records = json.loads(files["data"].read_text())
    (files["images"] / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    long_answer = " ".join(["word"] * 3000)
    records += [
        {"id": "missing", "image": "nope.png", "conversations": records[0]["conversations"]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": records[0]["conversations"]},
        {"id": "escape", "image": "../../etc/passwd", "conversations": records[0]["conversations"]},
        {"id": "no_answer", "image": "000.png", "conversations": [records[0]["conversations"][0]]},
        {"id": "no_tag", "image": "000.png", "conversations": [{"from": "human", "value": "Hi"},
                                                               {"from": "gpt", "value": "Yo"}]},
        {"id": "video_junk", "video": "junk.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"},
                                                                   {"from": "gpt", "value": "Nothing."}]},
        {"id": "long", "image": "001.png", "conversations": [{"from": "human", "value": "<image>\nTell me."},
                                                            {"from": "gpt", "value": long_answer}]},
    ]  # fmt: skip
    (files["images"] / "junk.mp4").write_bytes(b"not a video")
    files["data"].write_text(json.dumps(records))
    # a box file for other ids: our samples find no boxes in it
    other = root / "other_boxes.jsonl"
    other.write_text(json.dumps({"id": "elsewhere", "boxes": [[0, 0, 1, 1]]}) + "\n")
    return files, other


def test_check_data_names_and_counts_every_problem(tmp_path, capsys):
    files, other = bad_dataset(tmp_path / "d")
    src = synth.source_override({**files, "boxes": other})
    out = tmp_path / "report"
    code = main(["check-data", "tiny-stage1", src, f"output_dir={tmp_path}/run", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1 and "FAIL" in printed
    bad = {r["id"]: " ".join(r["reasons"]) for r in read_jsonl(out / "bad_samples.jsonl")}
    assert set(bad) == {"missing", "corrupt", "escape", "no_answer", "no_tag", "video_junk"}
    assert "no such file" in bad["missing"] and "not a readable image" in bad["corrupt"]
    assert "leaves the data root" in bad["escape"] and "no answered turn" in bad["no_answer"]
    assert "0 <image> tags but 1 images" in bad["no_tag"] and "cannot decode" in bad["video_junk"]
    summary = json.loads((out / "check_summary.json").read_text())
    assert summary["samples"] == 16 and summary["bad"] == 6
    assert sum(n for k, n in summary["warnings"].items() if k.startswith("text truncated")) == 1
    assert any(k.startswith("no boxes for this sample") for k in summary["warnings"])
    assert main(["check-data", "tiny-stage1", src, f"output_dir={tmp_path}/run", "--out", str(out),
                 "--max-bad-fraction", "0.5"]) == 0  # fmt: skip


def test_training_leaves_out_checked_bad_samples_and_replaces_others(tmp_path):
    files, _ = bad_dataset(tmp_path / "d")
    src = synth.source_override(files)
    out = tmp_path / "report"
    main(["check-data", "tiny-stage1", src, f"output_dir={tmp_path}/run", "--out", str(out)])
    run = tmp_path / "skip"
    assert main(["train", "tiny-stage1", src, f"output_dir={run}", f"data.skip={out}/bad_samples.jsonl",
                 "max_steps=2"]) == 0  # fmt: skip
    assert all(r["replaced"] == 0 for r in read_jsonl(run / "metrics.jsonl"))
    run = tmp_path / "noskip"  # without the report, unusable samples are replaced on the fly and counted
    assert main(["train", "tiny-stage1", src, f"output_dir={run}", "stage.global_batch_size=16",
                 "stage.per_device_batch_size=4", "max_steps=1"]) == 0  # fmt: skip
    assert sum(r["replaced"] for r in read_jsonl(run / "metrics.jsonl")) == 6


def test_check_data_builds_the_processor_only(tmp_path, monkeypatch):
    """A paper preset's model would take tens of GB: check-data must never build it."""
    from mgllava.model.modeling import MGLlavaForConditionalGeneration

    def refuse(*args, **kwargs):
        raise AssertionError("check-data built a model")

    monkeypatch.setattr(MGLlavaForConditionalGeneration, "__init__", refuse)
    files = synth.write_dataset(tmp_path / "d", n=4)
    out = tmp_path / "report"
    code = main(["check-data", "tiny-stage1", synth.source_override(files), f"output_dir={tmp_path}/run",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    assert json.loads((out / "check_summary.json").read_text())["samples"] == 4


def test_training_counts_images_without_boxes_per_step(tmp_path):
    files = synth.write_dataset(tmp_path / "d", n=8)
    lines = files["boxes"].read_text().splitlines()
    files["boxes"].write_text("\n".join(lines[:5]) + "\n")  # 3 of the 8 images lose their boxes
    run = tmp_path / "run"
    assert main(["train", "tiny-stage1", synth.source_override(files), f"output_dir={run}"]) == 0
    assert sum(r["boxes_missing"] for r in read_jsonl(run / "metrics.jsonl")) == 3
