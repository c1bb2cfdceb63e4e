"""The main job: the easy-vqa scene benchmark, its checks, and `mgllava demo --quick` end to end."""

import json

import pytest
from easy_vqa import get_test_questions, get_train_questions
from transformers import AutoModelForImageTextToText

from mgllava.cli import main
from mgllava.demo.annotations import annotate, facts
from mgllava.demo.check import checked_annotations, verify_benchmark
from mgllava.demo.run import VARIANTS
from mgllava.demo.scenes import SceneSpec, build_split
from mgllava.model.configuration import FUSIONS, OBJECT_TOKENS


def test_every_easy_vqa_question_is_understood_and_annotations_agree_with_all():
    for questions, answers, _ in (get_train_questions(), get_test_questions()):
        assert all(facts(q, a) for q, a in zip(questions, answers, strict=True))
    annotations, checked = checked_annotations("test")
    assert len(annotations) > 800 and checked > 9000
    assert annotate(["what color is the shape?", "what is the red shape?"], ["blue", "circle"], [0, 0]) == (
        [],
        1,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    for split, n in (("train", 12), ("test", 6)):
        build_split(split, n, root / split, SceneSpec(), seed=0)
    return root


def test_built_benchmark_checks_out_and_is_deterministic(built, tmp_path):
    report = verify_benchmark(built)
    assert report == {"answers_checked": 18, "annotation_facts_checked": report["annotation_facts_checked"],
                      "shared_source_images": 0}  # fmt: skip
    again = tmp_path / "again"
    build_split("test", 6, again, SceneSpec(), seed=0)
    assert (again / "qa.json").read_text() == (built / "test/qa.json").read_text()
    assert (again / "images/test-00003.png").read_bytes() == (
        built / "test/images/test-00003.png"
    ).read_bytes()


def test_a_wrong_answer_is_caught(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    qa = json.loads((copy / "test/qa.json").read_text())
    qa[2]["answers"] = ["purple"]
    (copy / "test/qa.json").write_text(json.dumps(qa))
    with pytest.raises(ValueError, match="test-00002: answer \\['purple'\\]"):
        verify_benchmark(copy)


def test_coco80_boxes_only_name_circles(built):
    for line in (built / "train/boxes-coco80.jsonl").read_text().splitlines():
        assert set(json.loads(line)["labels"]) <= {"sports ball"}


def test_every_demo_variant_is_a_real_configuration():
    for variant in VARIANTS.values():
        assert variant.fusion in FUSIONS and variant.object_tokens in OBJECT_TOKENS


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NOT from a detector" in printed and "random and frozen" in printed
    report = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["baseline", "objects", "full"]
    assert all(0 <= r["accuracy_mean"] <= 100 for r in report["rows"])
    assert (out / "results.png").stat().st_size > 10_000 and "| variant |" in (out / "results.md").read_text()
    assert AutoModelForImageTextToText.from_pretrained(out / "model").config.fusion == "conv_gate"
    image = out / "data/test/images/test-00000.png"
    boxes = out / "data/test/boxes.jsonl"
    capsys.readouterr()
    chat = [
        "chat",
        "--model",
        str(out / "model"),
        "--image",
        str(image),
        "--prompt",
        "What color is the shape?",
    ]
    assert main([*chat, "--box-file", str(boxes), "--show-boxes"]) == 0
    assert (
        "boxes from box_file" in capsys.readouterr().out
    )  # found in the demo's box file by the image's sha256
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # everything found on disk: reused, same table
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]
