"""`mgllava eval` end to end: a tiny saved model answers benchmark files written in their real formats."""

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from mgllava.cli import main
from mgllava.eval import EvalOptions, run_eval
from mgllava.eval.easy_vqa import convert_easy_vqa
from mgllava.eval.judge import SYSTEM_PROMPT
from mgllava.eval.metrics import evalai_normalize
from mgllava.eval.runner import load_generator

from .. import eval_formats as fmt

ROOT = Path(__file__).resolve().parents[2]


def eval_argv(model, benchmark, data, out, *extra):
    return [
        "eval",
        "--model",
        model,
        "--benchmark",
        benchmark,
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-new-tokens",
        "6",
        *map(str, extra),
    ]


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_mmbench_dev_through_main(model_dir, tmp_path, capsys):
    data = fmt.write_mmbench(tmp_path / "MMBench_DEV_EN.tsv")
    assert main(eval_argv(model_dir, "mmbench_dev", data, tmp_path / "out", "--batch-size", 3)) == 0
    out = capsys.readouterr().out
    assert "mmbench_dev: circular_accuracy" in out and "(scoring official; 3 scored;" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["counts"] == {
        "samples": 8,
        "invalid": 4,
        "predicted": 8,
        "failed": 0,
        "missing": 0,
        "scored": 3,
        "no_ground_truth": 0,
    }
    assert results["rules"]["choice_extraction"] == "vlmevalkit (by --scoring official)"
    assert "circular" in results["rules"] and results["scoring"]["pipeline"] == "official"
    assert {i["id"] for i in results["invalid"]} >= {"1000006", "4", "5"}
    assert results["incomplete_questions"] == ["4", "5", "6"]
    lines = {r["key"]: r for r in read_lines(tmp_path / "out" / "predictions.jsonl")}
    assert len(lines) == 8 and all("extracted" in r and "prediction" in r for r in lines.values())
    # the score is the share of questions 0, 1, 2 whose every rotation's extracted letter is right
    groups = {"0": ["0", "1000000", "2000000", "3000000"], "1": ["1", "1000001"], "2": ["2"]}
    right = [all(lines[k]["extracted"] == lines[k]["answers"][0] for k in keys) for keys in groups.values()]
    assert results["score"] == pytest.approx(100 * sum(right) / 3, abs=1e-4)
    assert "## by category" in (tmp_path / "out" / "results.md").read_text()


def oracle(wrong=()):
    """A stand-in for the model that answers every sample right except the keys in `wrong`."""

    def generate(batch):
        return ["Z" if p.sample.key in wrong else f"The answer is {p.sample.answers[0]}" for p in batch]

    return generate


def test_known_answers_give_the_hand_computed_score(tmp_path):
    data = fmt.write_mmbench(tmp_path / "mmb.tsv")
    opts = EvalOptions("mmbench_dev", str(data), str(tmp_path / "out"), choice_rule="reference")
    results = run_eval(opts, generate=oracle(wrong={"1000001"}))
    # questions 0 and 2 right in every rotation, question 1 wrong in one ("Z"): 2 of 3
    assert results["score"] == pytest.approx(100 * 2 / 3, abs=1e-4)
    assert results["rules"]["choice_extraction"] == "reference (by --choice-rule)"
    assert results["unparsed_predictions"] == 1  # "Z" has no capital A-D
    # under VLMEvalKit's rule a lone "Z" is its "none of the options": wrong, and counted the same way
    opts = EvalOptions("mmbench_dev", str(data), str(tmp_path / "out"), score_only=True)
    results = run_eval(opts)
    assert results["score"] == pytest.approx(100 * 2 / 3, abs=1e-4) and results["unparsed_predictions"] == 1
    assert results["categories"]["category"]["attribute"] == {"score": 50.0, "n": 2}


def test_mc_instruction_reaches_the_prompts_and_the_folder_stamp(tmp_path):
    data = fmt.write_mmbench(tmp_path / "mmb.tsv")
    prompts = []

    def answer(batch):
        prompts.extend(p.sample.prompt for p in batch)
        return oracle()(batch)

    out = tmp_path / "out"
    opts = EvalOptions("mmbench_dev", str(data), str(out), mc_instruction="chinese")
    assert run_eval(opts, generate=answer)["rules"]["mc_instruction"].startswith("chinese: always Chinese")
    assert prompts and all(p.endswith("\n请直接回答选项字母。") for p in prompts)
    stamp = json.loads((out / "answers_for.json").read_text())
    assert stamp["mc_instruction"] == "chinese"
    with pytest.raises(ValueError, match="mc_instruction: 'chinese' there, 'by-text' now"):
        run_eval(EvalOptions("mmbench_dev", str(data), str(out), score_only=True))
    # a folder stamped before the option existed was made with the only behaviour then: by-text
    del stamp["mc_instruction"]
    (out / "answers_for.json").write_text(json.dumps(stamp))
    assert run_eval(EvalOptions("mmbench_dev", str(data), str(out), score_only=True))["score"] is not None


def test_textvqa_answers_made_with_the_old_prompts_are_not_mixed_in(tmp_path):
    """The official-JSON TextVQA prompts changed (capitalised, empty OCR line kept): a folder answered
    before, whose stamp has no prompt rule, is refused rather than resumed or rescored with mixed prompts."""
    files = fmt.write_textvqa(tmp_path / "tv")
    out = tmp_path / "out"
    opts = EvalOptions("textvqa_val", str(files["official"]), str(out), ocr=str(files["ocr"]))
    assert run_eval(opts, generate=lambda batch: ["coke" for _ in batch])["counts"]["scored"] == 2
    stamp = json.loads((out / "answers_for.json").read_text())
    assert stamp["prompt_rule"].startswith("question.capitalize()")
    del stamp["prompt_rule"]
    (out / "answers_for.json").write_text(json.dumps(stamp))
    opts.score_only = True
    with pytest.raises(ValueError, match="other settings \\(prompt_rule: None there"):
        run_eval(opts)


class Interrupt:
    """Wraps a generator and stops the run (as Ctrl-C would) after `batches` batches."""

    def __init__(self, generate, batches):
        self.generate, self.left = generate, batches

    def __call__(self, batch):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.generate(batch)


def test_interrupted_run_resumes_to_the_same_results(model_dir, tmp_path):
    data = fmt.write_short_vqa(tmp_path / "set", n=6)
    argv = ["--batch-size", 2]
    assert main(eval_argv(model_dir, "short_vqa", data, tmp_path / "whole", *argv)) == 0

    opts = EvalOptions(
        "short_vqa", str(data), str(tmp_path / "resumed"), model=model_dir, batch_size=2, max_new_tokens=6
    )
    with pytest.raises(KeyboardInterrupt):
        run_eval(opts, generate=Interrupt(load_generator(opts, 6), batches=1))
    shard = tmp_path / "resumed" / "shards" / "rank0.jsonl"
    assert len(read_lines(shard)) == 2 and not (tmp_path / "resumed" / "results.json").exists()
    with shard.open("a") as handle:
        handle.write('{"key": "q2", "predic')  # killed in the middle of a line
    assert main(eval_argv(model_dir, "short_vqa", data, tmp_path / "resumed", *argv)) == 0
    run = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert run["answered_this_run"] == 4
    for name in ("results.json", "predictions.jsonl", "results.md"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # a finished run asked again answers nothing and writes the same results
    assert main(eval_argv(model_dir, "short_vqa", data, tmp_path / "resumed", *argv)) == 0
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["answered_this_run"] == 0


def test_bad_inputs_are_listed_not_scored_and_retried(model_dir, tmp_path, capsys):
    data = fmt.write_short_vqa(tmp_path / "set", n=3, broken=True)
    # two samples fail: by default (--max-failed-samples 0) the score over the other four is withheld
    assert main(eval_argv(model_dir, "short_vqa", data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "2 of 6 samples failed to generate, more than --max-failed-samples 0" in err and "gone:" in err
    refused = json.loads((tmp_path / "out" / "results.json").read_text())
    assert refused["score"] is None and refused["categories"] == {} and "score_refused" in refused
    assert refused["counts"]["failed"] == 2 and refused["counts"]["scored"] == 3
    assert "| score withheld | 2 of 6 samples failed" in (tmp_path / "out" / "results.md").read_text()
    # allowed, the same answers are scored (nothing generated again) and the failures listed
    argv = eval_argv(model_dir, "short_vqa", data, tmp_path / "out", "--max-failed-samples", 2)
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["score"] is not None and "score_refused" not in results
    failed = {f["id"]: f["reason"] for f in results["failed"]}
    assert set(failed) == {"gone", "corrupt"}
    assert "nowhere.png" in failed["gone"] and "no such file" in failed["gone"]
    assert "corrupt.png" in failed["corrupt"] and "not a readable image" in failed["corrupt"]
    assert results["no_ground_truth"] == ["no-gt"]
    assert results["counts"]["scored"] == 3 and results["counts"]["failed"] == 2
    per_sample = {r["key"]: r.get("score") for r in read_lines(tmp_path / "out" / "predictions.jsonl")}
    assert per_sample["no-gt"] is None and per_sample["gone"] is None
    # fixing the missing image: the next run answers it, and only it; one failure left, one allowed
    Image.new("RGB", (20, 20), (220, 20, 20)).save(tmp_path / "set" / "images" / "nowhere.png")
    assert main([*argv[:-1], "1"]) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [f["id"] for f in again["failed"]] == ["corrupt"] and again["counts"]["scored"] == 4
    assert json.loads((tmp_path / "out" / "run.json").read_text())["answered_this_run"] == 2


def test_generation_errors_withhold_the_score(tmp_path):
    """A sample whose generation raises (an out-of-memory on the long samples, say) is counted and listed;
    past --max-failed-samples no score is given, however plausible the mean over the rest would look."""
    from mgllava.eval.runner import FailedSamples

    data = fmt.write_mmbench(tmp_path / "mmb.tsv")

    def long_ones_fail(batch):
        if any(p.sample.key == "1" for p in batch):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [f"The answer is {p.sample.answers[0]}" for p in batch]

    opts = EvalOptions("mmbench_dev", str(data), str(tmp_path / "out"), batch_size=3)
    with pytest.raises(FailedSamples, match=r"1 of 8 samples failed.*CUDA out of memory"):
        run_eval(opts, generate=long_ones_fail)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["score"] is None and "vanilla_accuracy" not in results
    assert [f["id"] for f in results["failed"]] == ["1"]
    opts.max_failed_samples, opts.score_only = 1, True
    assert run_eval(opts)["score"] == 100.0  # questions 0 and 2; question 1 lacks a rotation: not scored


def test_eval_answers_equal_the_engines_one_by_one(model_dir, tmp_path):
    """`mgllava eval` generates through the inference engine: its batched answers (batch 1 and 3, with and
    without boxes) equal `Engine.chat` on each sample alone, the path chat and serve use."""
    folder = tmp_path / "set"
    data = fmt.write_short_vqa(folder, n=5)
    questions = [
        "what color?",
        "what is the main color of this picture?",
        "color?",
        "which hue is it?",
        "what?",
    ]
    records = [
        dict(json.loads(line), question=q)
        for line, q in zip(data.read_text().splitlines(), questions, strict=True)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    boxes = tmp_path / "boxes.jsonl"
    boxes.write_text(
        '{"id": "q1", "boxes": [[1, 1, 20, 20], [5, 5, 30, 25]], "scores": [0.9, 0.8], "labels": ["a", "b"]}\n'
    )
    outs = {}
    for batch in (1, 3):
        out = tmp_path / f"b{batch}"
        argv = eval_argv(model_dir, "short_vqa", data, out, "--batch-size", batch, "--boxes", boxes)
        assert main([*argv, "--max-missing-boxes", "1"]) == 0
        outs[batch] = [r["prediction"] for r in read_lines(out / "predictions.jsonl")]
    assert outs[1] == outs[3] and len(outs[1]) == 5
    from mgllava.boxes import BoxLookup, ImageKey
    from mgllava.inference import Engine, GenerationSettings

    engine = Engine.from_pretrained(model_dir)
    lookup = BoxLookup.load(boxes)
    prompt = "\nAnswer the question using a single word or phrase."
    alone = []
    for record in records:
        image = str(folder / record["image"])
        found = lookup.image(ImageKey.of(image, [record["id"]]))
        messages = [{"role": "user", "content": "<image>\n" + record["question"] + prompt}]
        result = engine.chat(messages, images=[image], boxes=[found], settings=GenerationSettings(6))
        alone.append(result.text)
    assert alone == outs[3]
    results = json.loads((tmp_path / "b3" / "results.json").read_text())
    assert results["boxes"]["found"] == {"id": 1} and results["boxes"]["missing"] == 4


def test_a_box_file_for_other_samples_is_refused_before_anything_is_written(model_dir, tmp_path, capsys):
    data = fmt.write_short_vqa(tmp_path / "set", n=4)
    boxes = tmp_path / "other.jsonl"
    boxes.write_text('{"id": "elsewhere", "boxes": [[1, 1, 5, 5]]}\n')
    out = tmp_path / "out"
    # a file that matches no sample is refused whatever share of misses is allowed
    for allowed in ("0", "1"):
        argv = [
            *eval_argv(model_dir, "short_vqa", data, out, "--boxes", boxes),
            "--max-missing-boxes",
            allowed,
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "matches none of the 4 samples" in err and "'q0'" in err and "'elsewhere'" in err
        assert "keyed by the record's `id`" in err
        assert not out.exists()
    # one of four found: refused at the default share (0), listed in the results when allowed
    boxes.write_text('{"id": "q2", "boxes": [[1, 1, 5, 5]], "scores": [0.9], "labels": ["a"]}\n')
    assert main(eval_argv(model_dir, "short_vqa", data, out, "--boxes", boxes)) == 2
    err = capsys.readouterr().err
    assert "3 of 4 benchmark samples (75.0%) have no boxes" in err and "id 'q0'" in err
    assert "keyed by the record's `id`" in err and not out.exists()
    argv = [*eval_argv(model_dir, "short_vqa", data, out, "--boxes", boxes), "--max-missing-boxes", "0.75"]
    assert main(argv) == 0
    table = (out / "results.md").read_text()
    assert "1 of 4 in" in table and "(1 by id)" in table and "3 without boxes" in table
    assert "## Samples without boxes (3" in table and "id 'q3'" in table


def test_mmbench_test_writes_the_submission_file(model_dir, tmp_path):
    from openpyxl import load_workbook
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    data = fmt.write_mmbench(tmp_path / "MMBench_TEST_EN.tsv", with_answers=False)
    assert main(eval_argv(model_dir, "mmbench_test", data, tmp_path / "out")) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["submission"] == "submission.xlsx" and results["counts"]["no_ground_truth"] == 4
    rows = list(load_workbook(tmp_path / "out" / "submission.xlsx").active.values)
    assert list(rows[0]) == ["index", "question", "A", "B", "C", "D", "prediction", "split"]
    lines = read_lines(tmp_path / "out" / "predictions.jsonl")
    predictions = {r["key"]: ILLEGAL_CHARACTERS_RE.sub("", r["prediction"]) for r in lines}
    written = {str(r[0]): r[6] or "" for r in rows[1:]}
    assert {k: written[k] for k in predictions} == predictions
    assert written["4"] == "" and written["5"] == ""  # rows whose image is broken: listed, left empty
    # as pandas writes LLaVA's file: sheet "Sheet1", index a number, digit-only options text ("007" stays)
    book = load_workbook(tmp_path / "out" / "submission.xlsx")
    assert book.sheetnames == ["Sheet1"]
    by_index = {r[0]: r for r in rows[1:]}
    assert all(isinstance(i, int) for i in by_index)
    assert by_index[2][1:6] == ("How many?", "1", "2", None, None)  # option C "None" is pandas' NA
    from mgllava.eval.multiple_choice import load_tsv, write_mmbench_submission

    loaded = load_tsv(data)
    loaded.table[0]["A"] = "007"
    write_mmbench_submission(loaded, {"0": "12"}, tmp_path / "zeros.xlsx")
    first = list(load_workbook(tmp_path / "zeros.xlsx").active.values)[1]
    assert first[0] == 0 and first[2] == "007" and first[6] == "12"


def test_seed_bench_json_with_a_repeated_id_scores_both_and_writes_llavas_upload(tmp_path):
    """The released SEED-Bench.json repeats question_id "49914": both questions are answered and scored
    (plain accuracy, no CircularEval, no vanilla figure), and the upload holds one line per question in the
    file's order, byte for byte as LLaVA's convert_seed_for_submission writes it."""
    data = fmt.write_seed_repeated_id(tmp_path / "SEED-Bench.json")
    answers = {"49913": "A", "49914": "B", "49914#2": "C", "49915": "C"}  # 49914#2 (answer D): wrong
    opts = EvalOptions("seed_image", str(data), str(tmp_path / "out"), scoring="llava")
    results = run_eval(opts, generate=lambda batch: [answers[p.sample.key] for p in batch])
    assert results["metric"] == "accuracy" and results["score"] == 75.0 and results["counts"]["scored"] == 4
    assert "vanilla_accuracy" not in results and results["submission"] == "seed_upload.jsonl"
    assert results["info"]["renamed_duplicates"] == {"49914": ["49914", "49914#2"]}
    assert "| repeated id `49914` | its questions were answered and scored as 49914, 49914#2 |" in (
        (tmp_path / "out" / "results.md").read_text()
    )
    assert (tmp_path / "out" / "seed_upload.jsonl").read_text() == (
        '{"question_id": "49913", "prediction": "A"}\n'
        '{"question_id": "49914", "prediction": "B"}\n'
        '{"question_id": "49914", "prediction": "C"}\n'
        '{"question_id": "49915", "prediction": "C"}\n'
    )


def test_vqav2_val_score_and_testdev_upload(model_dir, tmp_path):
    files = fmt.write_vqav2(tmp_path / "vqa")
    images = tmp_path / "images"
    images.mkdir()
    for name in (
        "COCO_val2014_000000000042.jpg",
        "COCO_val2014_000000000007.jpg",
        "COCO_test2015_000000000042.jpg",
    ):
        Image.new("RGB", (30, 20), (10, 10, 200)).save(images / name)
    answers = {"420": "Red.", "421": "four", "70": "yes"}
    opts = EvalOptions(
        "vqav2_val",
        str(files["val"]),
        str(tmp_path / "val"),
        images=str(images),
        annotations=str(files["annotations"]),
    )
    results = run_eval(opts, generate=lambda batch: [answers[p.sample.key] for p in batch])
    # official (default): 420: "Red." is compared untouched with ten identical "red" -> 0.0;
    # 421: answers 4,4,four,6x7 differ -> "four" -> "4", three "4": (3 * 2/3 + 7 * 1) / 10 = 0.9; 70: none
    assert results["score"] == pytest.approx(45.0) and results["no_ground_truth"] == ["70"]
    assert results["categories"]["answer_type"] == {
        "number": {"score": 90.0, "n": 1},
        "other": {"score": 0.0, "n": 1},
    }
    assert results["scoring"]["pipeline"] == "official"

    out = tmp_path / "testdev"
    argv = eval_argv(
        model_dir,
        "vqav2_testdev",
        files["testdev"],
        out,
        "--images",
        images,
        "--submission-questions",
        files["test2015"],
        "--scoring",
        "llava",
    )
    assert main(argv) == 0
    upload = json.loads((out / "vqav2_upload.json").read_text())
    predictions = {r["key"]: r["prediction"] for r in read_lines(out / "predictions.jsonl")}
    assert upload[:2] == [
        {"question_id": int(k), "answer": evalai_normalize(v)} for k, v in predictions.items()
    ]
    assert upload[2] == {"question_id": 70, "answer": ""}
    results = json.loads((out / "results.json").read_text())
    assert results["submission_empty_answers"] == ["70"] and "EvalAI" in results["rules"]["upload"]
    # the same answers written for the official pipeline: as generated
    assert main([*argv[:-2], "--scoring", "official", "--score-only"]) == 0
    upload = json.loads((out / "vqav2_upload.json").read_text())
    assert upload[:2] == [{"question_id": int(k), "answer": v} for k, v in predictions.items()]


def write_vqa_pipeline_set(folder):
    """Four VQAv2 questions whose scores differ by pipeline, with their annotations and images."""
    folder.mkdir()
    answers = {
        1: ["dog"] * 10,  # unanimous
        2: ["two"] * 4 + ["2"] * 2 + ["3"] * 4,
        3: ["it's red"] * 10,  # unanimous
        4: ["1000"] * 9 + ["100"],
    }
    questions = [dict(image_id=q, question=f"question {q}?", question_id=q) for q in answers]
    base = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    (folder / "questions.json").write_text(
        json.dumps({**base, "data_subtype": "val2014", "questions": questions})
    )
    annotations = [
        dict(question_id=q, image_id=q, question_type="what", answer_type="other",
             answers=[dict(answer=a, answer_confidence="yes", answer_id=i + 1) for i, a in enumerate(ans)])
        for q, ans in answers.items()
    ]  # fmt: skip
    (folder / "annotations.json").write_text(json.dumps({**base, "annotations": annotations}))
    for q in answers:
        Image.new("RGB", (16, 16), (q * 40, 0, 0)).save(folder / f"COCO_val2014_{q:012d}.jpg")
    return folder / "questions.json", folder / "annotations.json"


def test_scoring_pipelines_reach_the_scorer(tmp_path, capsys):
    """`--scoring` through `run_eval` and `mgllava eval` (main(argv)): the same four answers score 50, 75 and
    100 under official, llava and lmms-eval, each number worked out by hand from the scripts' rules."""
    questions, annotations = write_vqa_pipeline_set(tmp_path / "vqa")
    answers = {"1": "The dog.", "2": "2", "3": "it's red", "4": "1,,000"}
    # per question: official / llava / lmms-eval
    # 1 ten "dog": official compares "The dog." untouched -> 0; llava: EvalAI -> "dog" -> 1; lmms-eval: -> "dog" -> 1
    # 2 differ: "2" vs six "2" after both steps (leave-one-out 5 or 6 matches) -> 1 / 1 / 1
    # 3 ten "it's red": official "it's red" == -> 1; llava: EvalAI -> "it 's red" != -> 0; lmms-eval: both
    #   normalised the same -> 1
    # 4 nine "1000" + "100" differ: official "1,,000" (no digit,digit comma) -> "1 000" -> 0; llava: EvalAI
    #   drops ',' -> "1000" -> 1; lmms-eval: its comma test matches -> "1000" -> 1
    expected = {"official": 50.0, "llava": 75.0, "lmms-eval": 100.0}
    out = tmp_path / "out"
    opts = EvalOptions(
        "vqav2_val", str(questions), str(out), images=str(tmp_path / "vqa"), annotations=str(annotations)
    )
    results = run_eval(opts, generate=lambda batch: [answers[p.sample.key] for p in batch])
    assert results["score"] == expected["official"]
    for scoring in ("llava", "lmms-eval"):
        argv = ["eval", "--benchmark", "vqav2_val", "--data", str(questions), "--annotations", str(annotations),
                "--images", str(tmp_path / "vqa"), "--out", str(out), "--score-only", "--scoring", scoring]  # fmt: skip
        assert main(argv) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["score"] == expected[scoring] and results["scoring"]["pipeline"] == scoring
        assert results["rules"]["scoring"] == scoring
        assert f"scoring pipeline | `{scoring}`" in (out / "results.md").read_text()
        assert f"(scoring {scoring}; 4 scored;" in capsys.readouterr().out


def test_scoring_settings_are_refused_before_generating(tmp_path, capsys):
    data = fmt.write_mmbench(tmp_path / "mmb.tsv")

    def never(batch):
        raise AssertionError("nothing may be generated")

    opts = EvalOptions("ai2d", str(data), str(tmp_path / "o"), scoring="lmms-eval")
    with pytest.raises(ValueError, match="lmms-eval's per-task multiple-choice extraction"):
        run_eval(opts, generate=never)
    opts = EvalOptions("ai2d", str(data), str(tmp_path / "o"), scoring="llava")
    with pytest.raises(ValueError, match="LLaVA publishes no scoring script"):
        run_eval(opts, generate=never)
    opts = EvalOptions("short_vqa", str(data), str(tmp_path / "o"), choice_rule="reference")
    with pytest.raises(ValueError, match="--choice-rule applies to multiple-choice"):
        run_eval(opts, generate=never)
    argv = [
        "eval",
        "--benchmark",
        "ai2d",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
        "--scoring",
        "x",
    ]
    with pytest.raises(SystemExit):
        main(argv)
    assert "invalid choice: 'x'" in capsys.readouterr().err
    # an explicit letter rule makes any pipeline usable for multiple choice
    opts = EvalOptions("ai2d", str(data), str(tmp_path / "ok"), scoring="lmms-eval", choice_rule="vlmevalkit")
    results = run_eval(opts, generate=oracle())
    assert (
        results["score"] == 100.0 and results["rules"]["choice_extraction"] == "vlmevalkit (by --choice-rule)"
    )


class FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that judges like a strict grader: 'yes' when the correct
    answer is 'cooking'. It answers the first question about the bowl with prose (a malformed reply)."""

    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        user = body["messages"][1]["content"]
        if (
            "Question: what is in the bowl?" in user
            and sum("bowl" in s["body"]["messages"][1]["content"] for s in FakeOpenAI.seen) == 1
        ):
            content = "I think the answer is yes."
        elif "Correct Answer: cooking\n" in user:
            content = "{'pred': 'yes', 'score': 5}"
        else:
            content = "{'pred': 'no', 'score': 1}"
        reply = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    FakeOpenAI.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_video_qa_with_rule_and_gpt_judges(model_dir, tmp_path, judge_server, monkeypatch, capsys):
    files = fmt.write_video_qa(tmp_path / "msvd")
    argv = eval_argv(
        model_dir,
        "msvd_qa",
        files["questions"],
        tmp_path / "out",
        "--images",
        files["videos"],
        "--annotations",
        files["answers"],
        "--judge-url",
        judge_server,
        "--judge-workers",
        2,
        "--max-failed-samples",  # v2's clip does not exist
        1,
    )
    monkeypatch.delenv("MGLLAVA_JUDGE_API_KEY", raising=False)
    assert main(argv) == 2
    assert "MGLLAVA_JUDGE_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("MGLLAVA_JUDGE_API_KEY", "test-key")
    # one pass only: the first reply about v1 (the bowl) is prose, which the official scripts cannot read
    assert main([*argv, "--judge-rounds", "1"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [f["id"] for f in results["failed"]] == ["v2"] and "missing_clip" in results["failed"][0]["reason"]
    assert results["no_ground_truth"] == ["v3"] and results["rules"]["max_new_tokens"] == 6
    gpt = results["judges"]["gpt_judge:gpt-3.5-turbo"]
    # official counting: v1 is not dropped from the denominator; without its verdict there is no score
    assert gpt["accuracy"] is None and gpt["average_score"] is None and gpt["missing"] == 1
    assert [f["id"] for f in gpt["failed"]] == ["v1"] and "cannot be read" in gpt["failed"][0]["reason"]
    assert results["score"] is None and results["metric"] == "gpt_judge:gpt-3.5-turbo_accuracy"
    assert "no score: 1 questions without a readable verdict" in (tmp_path / "out" / "results.md").read_text()
    assert "rule_contains_v1" in results["judges"] and results["judges"]["rule_contains_v1"]["judged"] == 2
    first = FakeOpenAI.seen[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer test-key"
    assert (
        first["body"]["model"] == "gpt-3.5-turbo" and first["body"]["messages"][0]["content"] == SYSTEM_PROMPT
    )
    # scoring again asks the judge about v1 only (the scripts' loop); v0 yes 5, v1 no 1: 1/2 and 6/2
    assert main([*argv, "--score-only"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    gpt = results["judges"]["gpt_judge:gpt-3.5-turbo"]
    assert gpt["judged"] == 2 and gpt["accuracy"] == 50.0 and gpt["average_score"] == 3.0
    assert not gpt["failed"] and results["score"] == 50.0 and len(FakeOpenAI.seen) == 3

    # lmms-eval counting on the same answers, judged afresh: the prose reply about v1 is not asked again but
    # counted as "no" with score 0: v0 yes 5, v1 no 0 -> accuracy 1/2, mean score 5/2
    lmms = tmp_path / "lmms"
    shutil.copytree(tmp_path / "out", lmms, ignore=shutil.ignore_patterns("judge-*"))
    FakeOpenAI.seen.clear()
    argv = [*argv[: argv.index("--out") + 1], str(lmms), *argv[argv.index("--out") + 2 :]]
    assert main([*argv, "--score-only", "--scoring", "lmms-eval"]) == 0
    results = json.loads((lmms / "results.json").read_text())
    gpt = results["judges"]["gpt_judge:gpt-3.5-turbo"]
    assert gpt["accuracy"] == 50.0 and gpt["average_score"] == 2.5 and gpt["counted_as_no"] == 1
    assert [f["id"] for f in gpt["failed"]] == ["v1"] and "counted as 'no'" in gpt["failed"][0]["reason"]
    assert len(FakeOpenAI.seen) == 2 and results["scoring"]["pipeline"] == "lmms-eval"


def test_easy_vqa_is_converted_and_scored(model_dir, tmp_path):
    path = convert_easy_vqa(tmp_path / "easy", "test", limit=12)
    records = read_lines(path)
    assert len(records) == 12 and {r["category"] for r in records} <= {"shape", "color", "yes/no"}
    assert all((tmp_path / "easy" / r["image"]).is_file() for r in records)
    assert (
        main(eval_argv(model_dir, "short_vqa", path, tmp_path / "out", "--limit", 5, "--batch-size", 5)) == 0
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["counts"]["samples"] == 5 and results["counts"]["scored"] == 5
    assert results["metric"] == "exact" and set(results["categories"]["category"]) <= {
        "shape",
        "color",
        "yes/no",
    }
    assert main(["eval-data", "easy-vqa", "--out", str(tmp_path / "cli"), "--limit", "3"]) == 0
    assert len(read_lines(tmp_path / "cli" / "easy_vqa_test.jsonl")) == 3


def test_cli_errors_name_the_input(model_dir, tmp_path, capsys):
    assert main(eval_argv(model_dir, "short_vqa", tmp_path / "nothere.jsonl", tmp_path / "o")) == 2
    assert "nothere.jsonl: no such file" in capsys.readouterr().err
    data = fmt.write_short_vqa(tmp_path / "set", n=1)
    assert main(["eval", "--benchmark", "short_vqa", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(eval_argv(model_dir, "vqav2_val", data, tmp_path / "o")) == 2
    assert "--annotations" in capsys.readouterr().err
    # answers of one model are never mixed with another's
    assert main(eval_argv(model_dir, "short_vqa", data, tmp_path / "o")) == 0
    assert main(eval_argv(str(tmp_path / "set"), "short_vqa", data, tmp_path / "o")) == 2
    assert "holds answers made with other settings (model:" in capsys.readouterr().err
    assert main(eval_argv(model_dir, "short_vqa", data, tmp_path / "o", "--max-new-tokens", 9)) == 2


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(model_dir, tmp_path):
    data = fmt.write_short_vqa(tmp_path / "set", n=7, broken=True)
    extra = ("--batch-size", 2, "--max-failed-samples", 2)  # the two broken images
    argv = eval_argv(model_dir, "short_vqa", data, tmp_path / "one", *extra)
    assert main(argv) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "-m",
        "mgllava.cli",
        *eval_argv(model_dir, "short_vqa", data, tmp_path / "two", *extra),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    for name in ("results.json", "predictions.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_eval_bench_script_runs():
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_eval.py"),
        "--questions",
        "2",
        "--batch-sizes",
        "1",
        "2",
        "--new-tokens",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT / "bench", env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("same answers") == 2
