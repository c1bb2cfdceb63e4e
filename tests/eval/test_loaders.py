"""Each benchmark loader on a small file written in its published format; scorers on hand-worked inputs."""

import csv
import json

import pytest

from mgllava.eval.multiple_choice import (
    load_multiple_choice,
    load_scienceqa_json,
    load_seed_json,
    load_tsv,
    mc_prompt,
    score_multiple_choice,
)
from mgllava.eval.samples import limit_samples
from mgllava.eval.short_answer import (
    llava_prompt_question,
    load_docvqa,
    load_short_vqa,
    load_textvqa,
    load_vqav2,
    score_short_answer,
    write_vqav2_upload,
)
from mgllava.eval.video_qa import find_video, load_video_qa

from .. import eval_formats as fmt

SUFFIX = "Answer with the option's letter from the given choices directly."


def test_mmbench_tsv_rows_prompts_and_copies(tmp_path):
    loaded = load_tsv(fmt.write_mmbench(tmp_path / "MMBench_DEV_EN.tsv"), None)
    by_key = {s.key: s for s in loaded.samples}
    assert list(by_key) == ["0", "1000000", "2000000", "3000000", "1", "1000001", "2", "6"]
    assert by_key["0"].prompt == f"<image>\nWhich animal?\nA. cat\nB. dog\nC. cow\nD. pig\n{SUFFIX}"
    assert by_key["1000000"].meta["options"] == {"A": "dog", "B": "cow", "C": "pig", "D": "cat"}
    assert by_key["1000000"].answers == ["A"]
    assert by_key["1"].prompt == f"<image>\nLook at the red box.\nWhich side?\nA. left\nB. right\n{SUFFIX}"
    # the copies' image field "0" points at row 0: same bytes
    assert by_key["3000000"].image is by_key["0"].image and by_key["0"].image.startswith(b"\x89PNG")
    # pandas NA quirk: hint 'nan' and option 'None' are missing, and the row is listed
    assert by_key["2"].prompt == f"<image>\nHow many?\nA. 1\nB. 2\n{SUFFIX}"
    assert loaded.info["pandas_na_fields"] == [{"id": "2", "fields": ["C", "hint"]}]
    assert loaded.info["circular_copies"] == 4
    reasons = {i.where: i.reason for i in loaded.issues}
    assert len(reasons) == 4
    assert any("fields, the header has 14" in r for r in reasons.values())
    assert "not one of the options" in reasons["1000006"] and "base64" in reasons["4"]
    assert "refers to row 77" in reasons["5"]
    assert {i.group for i in loaded.issues if i.group} == {"6", "4", "5"}


def test_mmbench_circular_scoring_by_hand(tmp_path):
    loaded = load_tsv(fmt.write_mmbench(tmp_path / "mmb.tsv"), None)
    answers = {s.key: s.answers[0] for s in loaded.samples}
    predictions = {k: f"The answer is {v}." for k, v in answers.items()}
    predictions["1000001"] = "A"  # question 1: one rotation wrong
    result = score_multiple_choice(loaded, predictions, "reference", circular=True)
    # question 0 (4 rotations right), question 1 (one wrong), question 2 (right); question 6 has an invalid row
    assert result["metric"] == "circular_accuracy"
    assert result["score"] == pytest.approx(100 * 2 / 3, abs=1e-4)
    assert result["scored"] == 3 and result["incomplete_questions"] == ["4", "5", "6"]
    assert result["categories"]["category"] == {
        "attribute": {"score": 50.0, "n": 2},
        "count": {"score": 100.0, "n": 1},
    }
    assert result["categories"]["l2-category"]["reasoning"] == {"score": 100.0, "n": 1}
    # main rows: q0 attribute/perception right, q1 attribute/perception wrong, q2 count/reasoning right:
    # macro over category = (1/2 + 1/1) / 2 = 75%, the same over l2-category; micro 2/3
    assert result["macro_accuracy"] == {"category": 75.0, "l2-category": 75.0}
    # vanilla (VLMEvalKit vanilla_0): the unrotated rows 0, 1, 2, 6 are all right (1000001 is a rotation)
    assert result["vanilla_accuracy"]["score"] == 100.0 and result["vanilla_accuracy"]["n"] == 4
    # the reference rule reads "Apple" as A (right for question 2); VLMEvalKit finds no letter token, and
    # "apple" (5 chars) is longer than twice its options "1" + "2", so nothing: wrong
    predictions["2"] = "Apple"
    assert score_multiple_choice(loaded, predictions, "reference", circular=True)["score"] == pytest.approx(
        100 * 2 / 3, abs=1e-4
    )
    assert score_multiple_choice(loaded, predictions, "vlmevalkit", circular=True)["score"] == pytest.approx(
        100 * 1 / 3, abs=1e-4
    )
    # "Apple" is the one answer without an option letter under VLMEvalKit's rule
    assert (
        score_multiple_choice(loaded, predictions, "vlmevalkit", circular=True)["unparsed_predictions"] == 1
    )
    # vanilla: row 2 now wrong: 3 of 4
    assert (
        score_multiple_choice(loaded, predictions, "vlmevalkit", circular=True)["vanilla_accuracy"]["score"]
        == 75.0
    )
    # a question with a rotation not answered yet is not scored
    del predictions["2000000"]
    assert "0" in score_multiple_choice(loaded, predictions, circular=True)["incomplete_questions"]


def test_limit_keeps_rotations_together(tmp_path):
    loaded = load_tsv(fmt.write_mmbench(tmp_path / "mmb.tsv"), None)
    cut = limit_samples(loaded, 2, lambda s: s.meta["group"])
    assert [s.key for s in cut.samples] == ["0", "1000000", "2000000", "3000000", "1", "1000001"]
    with pytest.raises(ValueError):
        limit_samples(loaded, 0)


def test_tsv_quoted_like_vlmevalkit_and_test_split_without_answers(tmp_path):
    rows = fmt.mmbench_rows()
    path = fmt.write_tsv(tmp_path / "quoted.tsv", rows, quoting=csv.QUOTE_ALL)
    assert [s.key for s in load_tsv(path).samples][:2] == ["0", "1000000"]
    test = load_tsv(fmt.write_mmbench(tmp_path / "MMBench_TEST_EN.tsv", with_answers=False))
    assert not test.info["has_answers"] and all(s.answers is None for s in test.samples)
    result = score_multiple_choice(test, {s.key: "A" for s in test.samples}, circular=True)
    assert result["scored"] == 0 and result["no_ground_truth"] == ["0", "1", "2", "6"]


def test_mc_prompt_in_chinese():
    assert mc_prompt("哪个?", {"A": "猫", "B": "狗"}).endswith("B. 狗\n请直接回答选项字母。")


def test_kanji_in_an_english_row_follow_the_reference_unless_told():
    """MMBench_DEV_EN quotes kanji in some rows: the MG-LLaVA reference (default, by-text) then closes with
    the Chinese instruction; LLaVA (--lang en) keeps the English one: --mc-instruction english."""
    options = {"A": "mountain", "B": "river"}
    question = "What does the character 山 mean?"
    assert mc_prompt(question, options).endswith("B. river\n请直接回答选项字母。")
    assert mc_prompt(question, options, instruction="english").endswith(f"B. river\n{SUFFIX}")
    assert mc_prompt("Which?", options, instruction="chinese").endswith("\n请直接回答选项字母。")
    with pytest.raises(ValueError, match="unknown --mc-instruction 'cn'"):
        mc_prompt(question, options, instruction="cn")


def test_seed_bench_json(tmp_path):
    loaded = load_multiple_choice(fmt.write_seed(tmp_path / "SEED-Bench.json"), "/data/seed")
    assert [s.key for s in loaded.samples] == ["101"]
    sample = loaded.samples[0]
    assert sample.prompt == f"<image>\nWhat colour?\nA. red\nB. green\nC. blue\nD. black\n{SUFFIX}"
    assert sample.image == "/data/seed/img1.png" and sample.meta["category"] == "Scene Understanding"
    assert loaded.info["video_questions_skipped"] == 1
    assert [(i.where, "not one of the options" in i.reason) for i in loaded.issues] == [("103", True)]
    assert load_seed_json(tmp_path / "SEED-Bench.json").samples[0].answers == ["B"]


def test_a_repeated_seed_id_is_two_questions_scored_by_plain_accuracy(tmp_path, caplog):
    """SEED-Bench.json repeats question_id "49914": both questions are answered and scored (4 questions,
    not 3), each with its own answer, and the metric stays plain accuracy, not CircularEval."""
    loaded = load_seed_json(fmt.write_seed_repeated_id(tmp_path / "SEED-Bench.json"))
    assert "question_id '49914' names 2 questions; answered and scored as 49914, 49914#2" in caplog.text
    assert [s.key for s in loaded.samples] == ["49913", "49914", "49914#2", "49915"]
    assert loaded.info["renamed_duplicates"] == {"49914": ["49914", "49914#2"]}
    assert [s.meta["question_id"] for s in loaded.samples][1:3] == ["49914", "49914"]
    assert loaded.samples[2].prompt.startswith("<image>\nHow many cars are in the image?\nA. one\n")
    predictions = {"49913": "A", "49914": "B", "49914#2": "B", "49915": "C"}  # the repeated id's 2nd: wrong
    result = score_multiple_choice(loaded, predictions, "llava-seed", circular=False)
    assert result["metric"] == "accuracy" and result["scored"] == 4 and result["score"] == 75.0
    assert "vanilla_accuracy" not in result
    assert result["extracted"] == {"49913": "A", "49914": "B", "49914#2": "B", "49915": "C"}


def test_repeated_keys_are_refused_by_every_loader_or_the_runner(tmp_path):
    """Loaders that cannot rename a repeated id list the later copies as invalid, naming the id; a loader
    output that still repeats a key is refused before anything is answered."""
    from mgllava.eval.samples import Loaded, Sample, check_unique_keys

    files = fmt.write_vqav2(tmp_path / "vqa")
    data = json.loads(files["val"].read_text())
    data["questions"].append(dict(data["questions"][0], question="Asked again?"))
    files["val"].write_text(json.dumps(data))
    loaded = load_vqav2(files["val"])
    assert [s.key for s in loaded.samples] == ["420", "421", "70"]
    assert [(i.where, "'420' appears more than once" in i.reason) for i in loaded.issues] == [("420", True)]
    docs = fmt.write_docvqa(tmp_path / "doc")
    data = json.loads(docs["official"].read_text())
    data["data"].append(data["data"][0])
    docs["official"].write_text(json.dumps(data))
    assert [i.where for i in load_docvqa(docs["official"]).issues] == ["49153"]
    text = fmt.write_textvqa(tmp_path / "tv")
    data = json.loads(text["official"].read_text())
    data["data"].append(data["data"][1])
    text["official"].write_text(json.dumps(data))
    assert [i.where for i in load_textvqa(text["official"], ocr=text["ocr"]).issues] == ["34603"]
    sqa = fmt.write_scienceqa(tmp_path / "problems.json")
    text = sqa.read_text()
    sqa.write_text(text[:-1] + ", " + text[1 : text.index(', "6"')] + "}")  # problem "5" a second time
    with pytest.raises(ValueError, match=r"problems.json: key\(s\) '5' appear more than once"):
        load_scienceqa_json(sqa)
    twice = Loaded([Sample("7", "<image>\nq"), Sample("8", "<image>\nq"), Sample("7", "<image>\nr")])
    with pytest.raises(ValueError, match="'7' appear more than once"):
        check_unique_keys(twice, "seed_image SEED-Bench.json")


def test_scienceqa_problems_json(tmp_path):
    loaded = load_scienceqa_json(fmt.write_scienceqa(tmp_path / "problems.json"), "/sqa/test")
    assert [s.key for s in loaded.samples] == ["5"]
    sample = loaded.samples[0]
    assert sample.prompt == (
        f"<image>\nWhales breathe air.\nWhich is a mammal?\nA. shark\nB. whale\nC. trout\n{SUFFIX}"
    )
    assert sample.answers == ["B"] and sample.image == "/sqa/test/5/image.png"
    assert sample.meta["category"] == "natural science"
    assert [i.where for i in loaded.issues] == ["8"]


def test_textvqa_official_with_ocr_tokens(tmp_path):
    files = fmt.write_textvqa(tmp_path)
    loaded = load_textvqa(files["official"], "/tv", ocr=files["ocr"])
    first, second = loaded.samples
    # the official lower-case question capitalised as LLaVA's file and lmms-eval do (str.capitalize)
    assert first.prompt == (
        "<image>\nWhat brand is this?\nReference OCR token: COCA, Cola\n"
        "Answer the question using a single word or phrase."
    )
    # no OCR tokens: LLaVA's file keeps the line with nothing after the colon; capitalize() lowers "SIGN"
    assert second.prompt == (
        "<image>\nWhat number is on the sign?\nReference OCR token: \n"
        "Answer the question using a single word or phrase."
    )
    assert first.image == "/tv/aa01.jpg" and first.key == "34602" and len(first.answers) == 10
    plain = load_textvqa(files["official"], "/tv", variant="plain")
    assert [s.prompt for s in plain.samples] == [
        "<image>\nWhat brand is this?\nAnswer the question using a single word or phrase.",
        "<image>\nWhat number is on the sign?\nAnswer the question using a single word or phrase.",
    ]
    with pytest.raises(ValueError, match="--ocr"):
        load_textvqa(files["official"], "/tv")


def test_textvqa_official_prompts_equal_llavas_question_file(tmp_path):
    """The official JSON + Rosetta OCR give, byte for byte, the prompts of LLaVA's
    llava_textvqa_val_v051_ocr.jsonl (which the reference reads), OCR-less and lower-case questions included."""
    files = fmt.write_textvqa(tmp_path)
    native = {s.box_id: s.prompt for s in load_textvqa(files["official"], "/tv", ocr=files["ocr"]).samples}
    llava = {s.box_id: s.prompt for s in load_textvqa(files["llava"], "/tv").samples}
    assert native == {k: llava[k] for k in native} and len(native) == 2


def test_textvqa_llava_question_file(tmp_path):
    files = fmt.write_textvqa(tmp_path)
    loaded = load_textvqa(files["llava"], "/tv", annotations=files["official"])
    a, b, c = loaded.samples
    assert a.prompt.startswith("<image>\nWhat brand is this?\nReference OCR token: COCA, Cola\n")
    assert a.answers[0] == "coca cola" and b.answers == ["5"] * 10
    assert c.answers is None  # not in the annotations: listed, never scored
    assert llava_prompt_question("Q?\nReference OCR token: x\nAnswer briefly.") == "q?"
    assert llava_prompt_question("OCR tokens: a, b. Question: Who? Short answer:") == "who?"
    result = score_short_answer(loaded, {a.key: "Coca-Cola", b.key: "five", c.key: "x"}, "textvqa")
    assert result["score"] == 100.0 and result["scored"] == 2 and result["no_ground_truth"] == [c.key]


def test_one_question_in_two_released_formats_gives_one_prompt(tmp_path):
    """The benchmarks' own files and the VLMEvalKit / LLaVA files the reference reads give byte-equal prompts
    for the same question, empty hints and missing options included."""
    image = fmt.b64(fmt.png_bytes())
    seed_json = load_seed_json(fmt.write_seed(tmp_path / "SEED-Bench.json"))
    row = dict(index="101", question="What colour?", A="red", B="green", C="blue", D="black", answer="B",
               category="Scene Understanding", image=image)  # fmt: skip
    tsv = fmt.write_tsv(tmp_path / "SEEDBench_IMG.tsv", [row], fmt.MC_TSV_COLUMNS["SEEDBench_IMG.tsv"])
    assert load_tsv(tsv).samples[0].prompt == seed_json.samples[0].prompt

    problems = json.loads(fmt.write_scienceqa(tmp_path / "problems.json").read_text())
    problems["9"] = dict(question="Which is cold?", choices=["ice", "fire"], answer=0, hint="",
                         image="image.png", split="test", subject="natural science")  # fmt: skip
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    native = {s.key: s.prompt for s in load_scienceqa_json(tmp_path / "problems.json").samples}
    rows = [
        dict(index="5", question="Which is a mammal?", hint="Whales breathe air.", A="shark", B="whale",
             C="trout", answer="B", category="natural science", image=image, split="test"),
        dict(index="9", question="Which is cold?", hint="", A="ice", B="fire", C="", answer="A",
             category="natural science", image=image, split="test"),
    ]  # fmt: skip
    tsv = fmt.write_tsv(tmp_path / "ScienceQA_TEST.tsv", rows, fmt.MC_TSV_COLUMNS["ScienceQA_TEST.tsv"])
    assert {s.key: s.prompt for s in load_tsv(tsv).samples} == native
    assert native["9"] == f"<image>\nWhich is cold?\nA. ice\nB. fire\n{SUFFIX}"

    vqa = fmt.write_vqav2(tmp_path / "vqa")
    official = {s.key: s.prompt for s in load_vqav2(vqa["testdev"]).samples}
    llava = {s.key: s.prompt for s in load_vqav2(vqa["llava_test2015"]).samples}
    assert official == {k: llava[k] for k in official} and len(official) == 2

    doc = fmt.write_docvqa(tmp_path / "doc")
    from_json = load_docvqa(doc["official"]).samples[0]
    from_tsv = load_docvqa(doc["tsv"]).samples[0]
    assert (
        from_json.prompt
        == from_tsv.prompt
        == ("<image>\nWhat is the date?\nAnswer the question using a single word or phrase.")
    )


def test_docvqa_json_and_tsv(tmp_path):
    files = fmt.write_docvqa(tmp_path)
    loaded = load_docvqa(files["official"], "/doc")
    first, second = loaded.samples
    assert first.prompt == "<image>\nWhat is the date?\nAnswer the question using a single word or phrase."
    assert first.image == "/doc/documents/pybv0228_81.png" and second.answers is None
    result = score_short_answer(loaded, {"49153": "12/15/89", "49154": "Bob"}, "anls", ("question_types",))
    assert result["score"] == pytest.approx(87.5) and result["no_ground_truth"] == ["49154"]
    assert result["categories"]["question_types"] == {
        "form": {"score": 87.5, "n": 1},
        "handwritten": {"score": 87.5, "n": 1},
    }
    tsv = load_docvqa(files["tsv"])
    assert [s.key for s in tsv.samples] == ["0", "1"] and tsv.samples[0].answers == ["12/15/88", "Dec 15"]
    assert tsv.samples[1].image == tsv.samples[0].image  # "0" points at row 0's image
    assert [i.where for i in tsv.issues] == ["2"]


def test_vqav2_questions_annotations_and_scoring(tmp_path):
    files = fmt.write_vqav2(tmp_path)
    val = load_vqav2(files["val"], "/coco/val2014", files["annotations"])
    assert [s.image for s in val.samples][:1] == ["/coco/val2014/COCO_val2014_000000000042.jpg"]
    assert (
        val.samples[0].prompt
        == "<image>\nWhat color is the bus?\nAnswer the question using a single word or phrase."
    )
    assert val.samples[2].answers is None  # question 70 has no annotation
    predictions = {"420": "Red.", "421": "Four", "70": "yes"}
    result = score_short_answer(val, predictions, "vqa", ("answer_type",), "llava")
    # 420: EvalAI("Red.") = "red" == ten unanimous "red" -> 1.0
    # 421: EvalAI("Four") = "4"; answers 4,4,four,6x7 differ -> both steps -> three "4":
    # leaving out a "4": 2 matches -> 2/3 (3 times); a "6": 3 -> 1 (7 times): (2 + 7) / 10 = 0.9
    assert result["per_sample"]["421"] == pytest.approx(0.9)
    assert result["per_sample"]["420"] == 1.0 and result["no_ground_truth"] == ["70"]
    assert result["rules"]["scoring"] == "llava"
    # official: "Red." is compared untouched with the unanimous "red" -> 0.0; 421 as above -> 0.9
    official = score_short_answer(val, predictions, "vqa", ("answer_type",))
    assert official["per_sample"] == {"420": 0.0, "421": 0.9} and official["score"] == pytest.approx(45.0)
    assert result["categories"]["answer_type"]["number"]["n"] == 1
    testdev = load_vqav2(files["testdev"], "/coco")
    assert testdev.samples[0].image == "/coco/COCO_test2015_000000000042.jpg"


def test_video_qa_json(tmp_path):
    files = fmt.write_video_qa(tmp_path)
    loaded = load_video_qa(files["questions"], str(files["videos"]), files["answers"])
    assert [s.key for s in loaded.samples] == ["v0", "v1", "v2", "v3"]
    v0 = loaded.samples[0]
    assert v0.prompt == "<video>\nwhat is the man doing?" and v0.answers == ["cooking"]
    assert find_video(v0.video).endswith("-4wsuPCjDBc_5_15.mp4") and v0.box_id == "-4wsuPCjDBc_5_15"
    assert loaded.samples[3].answers is None and loaded.info["answers_paired_by"] == "question_id"
    with pytest.raises(FileNotFoundError, match="missing_clip"):
        find_video(loaded.samples[2].video)


def test_short_vqa_jsonl(tmp_path):
    path = fmt.write_short_vqa(tmp_path, n=3, broken=True)
    loaded = load_short_vqa(path)
    assert (
        loaded.samples[0].prompt
        == "<image>\nwhat color is the image?\nAnswer the question using a single word or phrase."
    )
    assert loaded.samples[0].image == str(tmp_path / "images" / "0.png")
    assert loaded.samples[-1].answers is None
    (tmp_path / "bad.jsonl").write_text(
        '{"id": "x", "image": "a.png"}\n{"id": "x", "image": "a.png", "question": "q"}\n'
    )
    bad = load_short_vqa(tmp_path / "bad.jsonl")
    assert len(bad.samples) == 1 and "needs id, image and question" in bad.issues[0].reason
    (tmp_path / "torn.jsonl").write_text('{"id": 1, "image": "a.png", "question": "q"}\n{"id": 2, "im\n')
    with pytest.raises(ValueError, match=r"torn\.jsonl:2"):
        load_short_vqa(tmp_path / "torn.jsonl")


def test_missing_or_broken_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.tsv"):
        load_tsv(tmp_path / "nothere.tsv")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_multiple_choice(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="expected an object"):
        load_docvqa(tmp_path / "list.json")


def test_nothing_scored_gives_no_score_rather_than_zero(tmp_path):
    loaded = load_short_vqa(fmt.write_short_vqa(tmp_path, n=2))
    result = score_short_answer(loaded, {}, "exact", ("category",))
    assert result["score"] is None and result["scored"] == 0 and result["categories"] == {}
    mmb = load_tsv(fmt.write_mmbench(tmp_path / "mmb.tsv"))
    assert score_multiple_choice(mmb, {}, circular=True)["score"] is None


def test_vqav2_llava_question_file(tmp_path):
    files = fmt.write_vqav2(tmp_path)
    lines = [
        {"question_id": 420, "image": "COCO_val2014_000000000042.jpg", "category": "default",
         "text": "What color is the bus?\nAnswer the question using a single word or phrase."},
        {"question_id": 420, "image": "x.jpg", "text": "duplicate id"},
        {"question_id": 71, "text": "no image"},
    ]  # fmt: skip
    path = tmp_path / "llava_vqav2_mscoco_val.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    loaded = load_vqav2(path, "/coco", files["annotations"])
    assert [s.key for s in loaded.samples] == ["420"] and loaded.samples[0].answers == ["red"] * 10
    assert loaded.samples[0].prompt == "<image>\n" + lines[0]["text"]
    assert sorted(i.reason.split(":")[-1].strip() for i in loaded.issues) == [
        "needs question_id, text and image",
        "question_id appears twice",
    ]


def test_vqav2_upload_completed_from_either_question_file(tmp_path):
    """LLaVA completes its upload from llava_vqav2_mscoco_test2015.jsonl: every id of that file, in its
    order, "" where nothing was answered. The official test2015 JSON gives the same ids in its own order."""
    files = fmt.write_vqav2(tmp_path / "vqa")
    loaded = load_vqav2(files["testdev"])  # questions 420 and 421
    answers = {"420": "Red.", "421": "4"}
    path, empty = write_vqav2_upload(loaded, answers, tmp_path / "a.json", files["llava_test2015"], "llava")
    llava = [{"question_id": 70, "answer": ""}, {"question_id": 421, "answer": "4"},
             {"question_id": 420, "answer": "red"}]  # fmt: skip
    assert json.loads(path.read_text()) == llava and empty == ["70"]
    path, empty = write_vqav2_upload(loaded, answers, tmp_path / "b.json", files["test2015"], "llava")
    assert json.loads(path.read_text()) == llava[::-1] and empty == ["70"]
    files["val"].write_text("[]")
    with pytest.raises(ValueError, match=r"LLaVA \.jsonl question file"):
        write_vqav2_upload(loaded, answers, tmp_path / "c.json", files["val"])


def mmstar_rows():
    """MMStar's TSV columns (category, l2_category); two coarse-perception questions and one math question."""
    img = fmt.b64(fmt.png_bytes())
    base = dict(hint="", C="c", D="d", image=img, source="", comment="", split="")
    return [
        dict(base, index=0, question="Scene?", A="a", B="b", answer="A", category="coarse perception",
             l2_category="image scene and topic"),
        dict(base, index=1, question="Style?", A="a", B="b", answer="B", category="coarse perception",
             l2_category="image style & quality"),
        dict(base, index=2, question="Angle?", A="a", B="b", answer="C", category="math", l2_category="geometry"),
    ]  # fmt: skip


MMSTAR_COLUMNS = ["index", "question", "A", "B", "C", "D", "answer", "category", "l2_category", "image"]


def test_mmstar_rule_with_micro_and_macro(tmp_path):
    loaded = load_tsv(fmt.write_tsv(tmp_path / "MMStar.tsv", mmstar_rows(), MMSTAR_COLUMNS))
    assert loaded.samples[0].meta["l2_category"] == "image scene and topic"
    # MMStar's rule: "a" -> A (right); "The answer is a" -> p[14] 'a' (wrong, B); "(c)" -> C (right)
    predictions = {"0": "a", "1": "The answer is a", "2": "(c)"}
    result = score_multiple_choice(loaded, predictions, "mmstar", circular=False)
    # micro 2/3; macro over category: coarse perception 1/2, math 1/1 -> (50 + 100) / 2 = 75
    assert result["score"] == pytest.approx(100 * 2 / 3, abs=1e-4) and result["metric"] == "accuracy"
    assert result["macro_accuracy"]["category"] == 75.0
    # over l2_category: 100, 0, 100 -> 200 / 3 (lmms-eval's MMStar average is this macro)
    assert result["macro_accuracy"]["l2_category"] == pytest.approx(100 * 2 / 3, abs=1e-4)
    assert result["categories"]["category"] == {
        "coarse perception": {"score": 50.0, "n": 2},
        "math": {"score": 100.0, "n": 1},
    }
    assert "vanilla_accuracy" not in result  # no rotations


def test_seed_and_scienceqa_official_versus_llava_rules(tmp_path):
    seed = load_multiple_choice(fmt.write_seed(tmp_path / "SEED-Bench.json"))
    # question 101, answer B, answered "B.": VLMEvalKit reads the token B; LLaVA wants the text to be "B"
    assert score_multiple_choice(seed, {"101": "B."}, "vlmevalkit", circular=False)["score"] == 100.0
    assert score_multiple_choice(seed, {"101": "B."}, "llava-seed", circular=False)["score"] == 0.0
    assert score_multiple_choice(seed, {"101": "B"}, "llava-seed", circular=False)["score"] == 100.0
    sqa = load_scienceqa_json(fmt.write_scienceqa(tmp_path / "problems.json"))
    # question 5, answer B: "The answer is B" is B for VLMEvalKit (last tokens); LLaVA's pattern needs a
    # character after the letter, so it is unparsed (wrong) there
    assert (
        score_multiple_choice(sqa, {"5": "The answer is B"}, "vlmevalkit", circular=False)["score"] == 100.0
    )
    assert score_multiple_choice(sqa, {"5": "The answer is B"}, "llava-sqa", circular=False)["score"] == 0.0
    assert (
        score_multiple_choice(sqa, {"5": "The answer is B."}, "llava-sqa", circular=False)["score"] == 100.0
    )


def test_answer_lengths_follow_the_reference():
    from mgllava.eval.benchmarks import BENCHMARKS

    # the reference model's evaluate_max_tokens default (fuse_model.py) is 100 for every benchmark
    assert {b.max_new_tokens for b in BENCHMARKS.values()} == {100}
