"""The main job: the easy-vqa scene benchmark, the simulated detector, the report, and `mgllava demo --quick`
end to end, interrupted and resumed."""

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter

import pytest
from easy_vqa import get_test_questions, get_train_questions
from transformers import AutoModelForImageTextToText

from mgllava.cli import main
from mgllava.demo.annotations import annotate, facts
from mgllava.demo.check import checked_annotations, verify_benchmark
from mgllava.demo.detector import DetectorModel, SceneObject, iou
from mgllava.demo.report import collapse_note, summarize, verdict
from mgllava.demo.run import VARIANTS
from mgllava.demo.scenes import KINDS, SceneSpec, build_split
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
    assert report == {"answers_checked": 18, "kinds_checked": 18,
                      "annotation_facts_checked": report["annotation_facts_checked"],
                      "shared_source_images": 0}  # fmt: skip
    again = tmp_path / "again"
    build_split("test", 6, again, SceneSpec(), seed=0)
    for name in ("qa.json", "boxes.jsonl", "test.jsonl", "images/test-00003.png"):
        assert (again / name).read_bytes() == (built / "test" / name).read_bytes()
    kinds = Counter(
        json.loads(line)["category"] for line in (built / "test/test.jsonl").read_text().splitlines()
    )
    assert kinds["a"] == 2 and kinds["b"] + kinds["c"] == 4 and set(kinds) <= set(KINDS)  # one part per scene


def test_a_wrong_answer_or_kind_is_caught(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    qa = json.loads((copy / "test/qa.json").read_text())
    qa[2]["conversations"][1]["value"] = "purple"
    (copy / "test/qa.json").write_text(json.dumps(qa))
    with pytest.raises(ValueError, match=r"test-00002 .*answer 'purple'"):
        verify_benchmark(copy)
    shutil.copytree(built, copy, dirs_exist_ok=True)
    qa = json.loads((copy / "test/qa.json").read_text())
    k = qa[1]["parts"].index("small")
    qa[1]["kinds"][k] = "b" if qa[1]["kinds"][k] == "c" else "c"  # the box file says otherwise
    (copy / "test/qa.json").write_text(json.dumps(qa))
    with pytest.raises(ValueError, match="test-00001 \\(small\\): kind"):
        verify_benchmark(copy)


def test_the_small_shape_and_stripe_are_where_the_scene_says_and_the_stripe_is_never_boxed(built):
    from PIL import Image

    spec = SceneSpec()
    asked = [json.loads(line) for line in (built / "train/test.jsonl").read_text().splitlines()]
    assert [q["part"] for q in asked] == ["big", "small", "stripe"] * 4  # one part shown per scene, in turn
    small_cells, stripe_cells = set(), set()
    for line in (built / "train/scenes.jsonl").read_text().splitlines():
        boxes = json.loads(line)["boxes"]
        small_cells.add((int(boxes["small"][0]) // spec.cell, int(boxes["small"][1]) // spec.cell))
        stripe_cells.add((int(boxes["stripe"][0]) // spec.cell, int(boxes["stripe"][1]) // spec.cell))
    assert stripe_cells == {spec.stripe_cell} and len(small_cells) > 6  # the small shape lies anywhere
    for line in (built / "train/scenes.jsonl").read_text().splitlines():
        scene = json.loads(line)
        small, near = scene["boxes"]["small"], scene["boxes"]["neighbour"]
        assert [int(v) // spec.cell for v in small[:2]] == [int(v) // spec.cell for v in near[:2]]  # one cell
        assert small[2] <= near[0] or near[2] <= small[0] or small[3] <= near[1] or near[3] <= small[1]
        assert (
            spec.neighbour_length[0] <= max(near[2] - near[0], near[3] - near[1]) <= spec.neighbour_length[1]
        )
        assert min(near[2] - near[0], near[3] - near[1]) == spec.neighbour_width
        assert scene["sources"]["neighbour"]["color"] != scene["sources"]["small"]["color"]
    for line in (built / "test/scenes.jsonl").read_text().splitlines():
        scene = json.loads(line)
        image = Image.open(built / "test/images" / f"{scene['id']}.png").convert("RGB")
        x1, y1, x2, y2 = (int(v) for v in scene["boxes"]["stripe"])
        assert (x2 - x1 == 1) != (y2 - y1 == 1)  # 1 px wide, one way or the other
        assert max(x2 - x1, y2 - y1) >= SceneSpec().stripe_length[0]
        small = scene["boxes"]["small"]
        assert max(small[2] - small[0], small[3] - small[1]) <= SceneSpec().small_side[1]
        assert image.size == (SceneSpec().side, SceneSpec().side)


def test_detector_recall_noise_and_false_positives_match_its_stated_rates():
    detector = DetectorModel()
    rng = random.Random(0)
    small = SceneObject("circle", (100.0, 100.0, 104.0, 104.0))  # 16 px in the 768 frame: small_recall
    large = SceneObject("square", (10.0, 10.0, 60.0, 60.0))  # 200 px: large_recall
    found = {"small": 0, "large": 0}
    spurious, ious, n = [], [], 4000
    for _ in range(n):
        record = detector.detect(rng, [small, large], 192)
        for name, obj in (("small", small), ("large", large)):
            best = max((iou(obj.box, b) for b in record["boxes"]), default=0.0)
            found[name] += best >= detector.min_iou
            if name == "large" and best > 0:
                ious.append(best)
        spurious.append(sum(max(iou(o.box, b) for o in (small, large)) == 0 for b in record["boxes"]))
        assert record["scores"] == sorted(record["scores"], reverse=True)
    # box noise moves some found boxes below the match IoU: found <= recall, by a few points
    assert detector.small_recall - 0.12 < found["small"] / n <= detector.small_recall + 0.03
    assert detector.large_recall - 0.06 < found["large"] / n <= detector.large_recall + 0.02
    assert 0.7 < statistics.median(ious) < 0.9
    assert abs(statistics.mean(spurious) - detector.false_positives) < 0.05
    assert detector.recall(2.0) == detector.small_recall and detector.recall(100.0) == detector.large_recall
    assert detector.small_recall < detector.recall(10.0) < detector.large_recall


def test_coco80_boxes_only_name_circles(built):
    for line in (built / "train/boxes-coco80.jsonl").read_text().splitlines():
        assert set(json.loads(line)["labels"]) <= {"sports ball"}


def test_every_demo_variant_is_a_real_configuration():
    for variant in VARIANTS.values():
        assert variant.fusion in FUSIONS and variant.object_tokens in OBJECT_TOKENS


def _result(variant, seed, a, b, c, answers):
    return {"variant": variant, "seed": seed, "overall": (a + b + c) / 3, "kinds": {"a": a, "b": b, "c": c},
            "answers": answers, "stage2_loss": [1.0]}  # fmt: skip


def test_report_rows_verdicts_and_collapse_notes():
    results = [_result("baseline", s, 20 + s, 12, 12, {"red": 90, "blue": 10}) for s in range(3)]
    results += [_result("objects", s, 20, 40 + s, 12, {"red": 30, "blue": 70}) for s in range(3)]
    rows = summarize(results, VARIANTS)
    assert [r["variant"] for r in rows] == ["baseline", "objects"]
    assert rows[0]["a"]["mean"] == 21.0 and rows[0]["a"]["std"] == round(statistics.pstdev([20, 21, 22]), 2)
    lines = verdict(rows)
    assert any(line.startswith("objects - baseline on b: +29.0") and line.endswith("holds") for line in lines)
    assert any(
        line.startswith("objects - baseline on overall") and "does NOT hold" not in line for line in lines
    )
    assert "above chance" in lines[0] and "NOT" not in lines[0]
    assert (
        collapse_note({"red": 90, "blue": 10})
        == "collapsed: 'red' is 90% of its 100 answers ('red' 90, 'blue' 10)"
    )
    assert (
        collapse_note({"red": 30, "blue": 70})
        == "collapsed: 'blue' is 70% of its 100 answers ('blue' 70, 'red' 30)"
    )
    assert collapse_note({"red": 40, "blue": 35, "teal": 25}) == ""


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "quick"
    assert main(["demo", "--quick", "--variants", "baseline,full", "--out", str(out)]) == 0
    return out


def test_demo_quick_end_to_end(quick_demo, capsys):
    out = quick_demo
    report = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["baseline", "full"]
    questions = {
        json.loads(line)["id"]: json.loads(line)
        for line in (out / "data/test/test.jsonl").read_text().splitlines()
    }
    for row in report["rows"]:
        run = out / "runs" / row["variant"] / "seed0"
        predictions = [json.loads(line) for line in (run / "eval/predictions.jsonl").read_text().splitlines()]
        assert sorted(p["key"] for p in predictions) == sorted(questions)
        result = json.loads((run / "result.json").read_text())
        # per-kind accuracy recomputed from the predictions and the benchmark's kinds
        for kind in KINDS:
            scores = [p["score"] for p in predictions if questions[p["key"]]["category"] == kind]
            assert result["kinds"][kind] == pytest.approx(100 * sum(scores) / len(scores), abs=1e-3)
            assert row[kind]["mean"] == pytest.approx(result["kinds"][kind], abs=0.01)
        assert result["answers"] == dict(Counter(p["prediction"] for p in predictions))
        assert len(result["stage2_loss"]) == 40 and result["stage2_loss"][-1] < result["stage2_loss"][0] / 2
    assert (out / "results.png").stat().st_size > 10_000 and "| variant |" in (out / "results.md").read_text()
    assert AutoModelForImageTextToText.from_pretrained(out / "model").config.fusion == "conv_gate"
    image = out / "data/test/images/test-00000.png"
    chat = [
        "chat",
        "--model",
        str(out / "model"),
        "--image",
        str(image),
        "--prompt",
        "What color is the big shape?",
    ]
    capsys.readouterr()
    assert main([*chat, "--box-file", str(out / "data/test/boxes.jsonl"), "--show-boxes"]) == 0
    assert (
        "boxes from box_file" in capsys.readouterr().out
    )  # found in the demo's box file by the image's sha256
    assert main(["demo", "--quick", "--variants", "baseline,full", "--out", str(out)]) == 0  # all reused
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]
    capsys.readouterr()
    assert main(["demo", "--quick", "--variants", "baseline", "--seeds", "2", "--out", str(out)]) == 2
    assert "made with other settings (seeds); use another --out" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_demo_resumes_to_the_uninterrupted_result(quick_demo, tmp_path):
    out = tmp_path / "resumed"
    argv = ["demo", "--quick", "--variants", "full", "--out", str(out)]
    # Ctrl-C's handler set explicitly: under a non-interactive shell's background job SIGINT starts ignored
    script = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from mgllava.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", script, *argv]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = out / "runs/full/seed0/stage2/checkpoints"
    deadline = time.monotonic() + 600
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, (
            "the run ended before its first checkpoint"
        )
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)  # Ctrl-C: the parent stops its workers
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "run the same command again to resume" in err
    assert not (out / "runs/full/seed0/result.json").exists()
    assert main(["demo", "--quick", "--variants", "full", "--out", str(out)]) == 0
    resumed = json.loads((out / "runs/full/seed0/result.json").read_text())
    uninterrupted = json.loads((quick_demo / "runs/full/seed0/result.json").read_text())
    assert resumed == uninterrupted
    assert os.path.getsize(out / "runs/full/seed0/log.txt") > 0


def test_probe_features_and_linear_probe(built):
    import numpy as np

    from mgllava.demo.probe import PARTS, features, linear_probe

    feats, colours = features(built / "test")
    scenes = [json.loads(line) for line in (built / "test/scenes.jsonl").read_text().splitlines()]
    for part in PARTS:  # only the scenes that show the part (one part per scene: 2 of the 6)
        assert list(colours[part]) == [s["sources"][part]["color"] for s in scenes if part in s["shown"]]
        dims = {name: f.shape for name, f in feats[part].items()}
        assert dims["clip_cell"] == (2, 64) and dims["convnext_s4"] == (2, 64) and dims["object"] == (2, 160)
    rng = np.random.default_rng(0)
    labels = np.array(["red", "blue", "green"] * 40)
    centres = {c: rng.normal(size=5) * 4 for c in ("red", "blue", "green")}
    x = np.stack([centres[c] + rng.normal(size=5) * 0.3 for c in labels])
    assert linear_probe(x[:90], labels[:90], x[90:], labels[90:]) == 100.0
    noise = rng.normal(size=(120, 5))
    assert linear_probe(noise[:90], labels[:90], noise[90:], labels[90:]) < 70.0


def test_gate_read_out_agrees_with_the_trained_conv_gate(quick_demo):
    from mgllava.demo.probe import gate_opening

    images = sorted((quick_demo / "data/test/images").glob("*.png"))[:4]
    opening = gate_opening(quick_demo / "runs/full/seed0/stage2/final", images)  # raises if it disagrees
    assert -1 <= opening["tanh_gate"] <= 1 and opening["tanh_gate"] != 0 and opening["added_over_low"] > 0
