"""Boxes reach every benchmark sample, keyed as the reference's released box files are (docs/benchmarks.md),
or the run says why before anything is written; the reference's per-benchmark box settings reach the
engine's image processor."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mgllava.boxes import Boxes
from mgllava.boxes.lookup import MissingBoxes
from mgllava.cli import main
from mgllava.eval import EvalOptions, run_eval
from mgllava.eval.runner import load_generator

from .. import eval_formats as fmt

BOX = {"boxes": [[1, 1, 12, 9], [3, 2, 20, 15]], "scores": [0.9, 0.5], "labels": ["cat", "dog"]}


def reference_boxes(path: Path, ids) -> Path:
    """A box file as the reference's scripts write it: a JSON list of `{"id", "boxes", "scores", "labels"}`,
    numeric ids as integers (its TSV scripts store `int(index)`)."""
    records = [{"id": int(i) if str(i).isdigit() else i, **BOX} for i in ids]
    path.write_text(json.dumps(records))
    return path


def reference_video_boxes(path: Path, names, frames: int = 8) -> Path:
    """The reference's video box file: `{"video": "<name>.mp4", "frames": [...]}` per video."""
    records = [{"video": f"{name}.mp4", "frames": [BOX] * frames} for name in names]
    path.write_text(json.dumps(records))
    return path


def folder(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def answer_a(batch):
    return ["A"] * len(batch)


# -- one case per benchmark: its files in the official format, the ids the reference's box file has, and
# -- the ids of a box file keyed the wrong way (with the words the refusal must say) ------------------------
def mmbench(tmp, answers=True):
    name = "MMBench_DEV_EN.tsv" if answers else "MMBench_TEST_EN.tsv"
    data = fmt.write_mmbench(tmp / name, with_answers=answers)
    every_row = [0, 1_000_000, 2_000_000, 3_000_000, 1, 1_000_001, 2, 6, 1_000_006, 3, 4, 5]
    return dict(data=str(data)), every_row, [100 + i for i in range(12)], name


def mc_tsv(name):
    def case(tmp):
        data = fmt.write_mc_tsv(tmp / name, indices=(0, 1, 2))
        return dict(data=str(data)), [0, 1, 2], [101669, 101670, 101671], name

    return case


def textvqa_official(tmp):
    files = fmt.write_textvqa(tmp / "textvqa")
    opts = dict(data=str(files["official"]), ocr=str(files["ocr"]), images=folder(tmp / "train_images"))
    return opts, ["aa01", "bb02"], [34602, 34603], "TextVQA image id"


def textvqa_llava(tmp):
    files = fmt.write_textvqa(tmp / "textvqa")
    opts = dict(data=str(files["llava"]), annotations=str(files["official"]), images=folder(tmp / "train"))
    return opts, ["aa01", "bb02", "cc03"], [34602, 34603, 34604], "TextVQA image id"


def docvqa_tsv(tmp):
    files = fmt.write_docvqa(tmp / "docvqa")
    return dict(data=str(files["tsv"])), [0, 1, 2], [49153, 49154], "DocVQA_VAL.tsv"


def vqav2(split):
    def case(tmp):
        files = fmt.write_vqav2(tmp / "vqa")
        opts = dict(data=str(files[split]), images=folder(tmp / "images"))
        if split == "val":
            opts["annotations"] = str(files["annotations"])
        ids = [420, 421, 70] if split == "val" else [420, 421]
        return opts, ids, [42, 7], "VQAv2 `question_id`"

    return case


def video(tmp):
    files = fmt.write_video_qa(tmp / "videos")
    opts = dict(data=str(files["questions"]), annotations=str(files["answers"]), images=str(files["videos"]))
    names = ["-4wsuPCjDBc_5_15", "video7010", "missing_clip"]
    return opts, names, ["v0", "v1", "v2", "v3"], "video_name"


CASES = {
    "mmbench_dev": mmbench,
    "mmbench_test": lambda tmp: mmbench(tmp, answers=False),
    "seed_image": mc_tsv("SEEDBench_IMG.tsv"),
    "mmstar": mc_tsv("MMStar.tsv"),
    "scienceqa_img": mc_tsv("ScienceQA_TEST.tsv"),
    "ai2d": mc_tsv("AI2D_TEST.tsv"),
    "textvqa_val": textvqa_official,
    "textvqa_val/llava": textvqa_llava,
    "docvqa_val": docvqa_tsv,
    "vqav2_val": vqav2("val"),
    "vqav2_testdev": vqav2("testdev"),
    "msvd_qa": video,
    "msrvtt_qa": video,
}


def write_boxes(benchmark, tmp, ids):
    if benchmark.endswith("_qa"):
        return reference_video_boxes(tmp / "boxes.json", ids)
    return reference_boxes(tmp / "boxes.json", ids)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_sample_finds_its_boxes_by_the_reference_key(case, tmp_path):
    benchmark = case.split("/")[0]
    opts, ids, _, _ = CASES[case](tmp_path)
    boxes = write_boxes(benchmark, tmp_path, ids)
    # the video fixtures name one clip that does not exist: that sample fails, allowed here
    run = EvalOptions(benchmark, out=str(tmp_path / "out"), boxes=str(boxes), max_failed_samples=1, **opts)
    results = run_eval(run, generate=answer_a)
    n = results["counts"]["samples"]
    assert n >= 2
    assert results["boxes"]["missing"] == 0 and results["boxes"]["found"] == {"id": n}
    assert results["boxes"]["looked_up"] == n
    assert results["rules"]["box_ids"] == results["info"]["box_ids"]
    assert "box_settings" in results["rules"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_box_file_keyed_the_wrong_way_is_refused_before_anything_is_written(case, tmp_path):
    benchmark = case.split("/")[0]
    opts, _, wrong, expected_key = CASES[case](tmp_path)
    boxes = write_boxes(benchmark, tmp_path, wrong)
    out = tmp_path / "out"
    run = EvalOptions(benchmark, out=str(out), boxes=str(boxes), max_missing_boxes=1.0, **opts)
    with pytest.raises(MissingBoxes, match="matches none of the") as err:
        run_eval(run, generate=answer_a)
    assert expected_key in str(err.value) and "docs/benchmarks.md" in str(err.value)
    assert repr(str(wrong[0])) in str(err.value)  # the file's ids are shown
    assert not out.exists()


def test_mmbench_copies_find_their_base_rows_boxes(tmp_path):
    """A box file with records for the base rows only still reaches the rotated copies (same image)."""
    data = fmt.write_mmbench(tmp_path / "MMBench_DEV_EN.tsv")
    boxes = reference_boxes(tmp_path / "boxes.json", [0, 1, 2, 6])
    run = EvalOptions("mmbench_dev", str(data), str(tmp_path / "out"), boxes=str(boxes))
    results = run_eval(run, generate=answer_a)
    assert results["boxes"]["found"] == {"id": 8} and results["boxes"]["missing"] == 0


@pytest.mark.parametrize(
    ("benchmark", "make", "image_ids", "tsv"),
    [
        (
            "seed_image",
            lambda tmp: fmt.write_seed(tmp / "SEED-Bench.json"),
            ["img1.png"],
            "SEEDBench_IMG.tsv",
        ),
        (
            "scienceqa_img",
            lambda tmp: fmt.write_scienceqa(tmp / "problems.json"),
            ["5/image.png"],
            "ScienceQA_TEST.tsv",
        ),
        (
            "docvqa_val",
            lambda tmp: fmt.write_docvqa(tmp / "docvqa")["official"],
            ["documents/pybv0228_81.png", "documents/x.png"],
            "DocVQA_VAL.tsv",
        ),
    ],
)
def test_native_files_without_the_tsv_index(benchmark, make, image_ids, tsv, tmp_path):
    """The benchmark's own JSON lacks the TSV `index` the reference keys by: its samples are filed under
    their image path, a reference box file is refused with a pointer to the TSV, a file keyed by image
    path is found by id."""
    data = make(tmp_path)
    wrong = reference_boxes(tmp_path / "reference.json", [0, 1, 2, 101])
    run = EvalOptions(benchmark, str(data), str(tmp_path / "out"), boxes=str(wrong))
    with pytest.raises(MissingBoxes, match=tsv):
        run_eval(run, generate=answer_a)
    assert not (tmp_path / "out").exists()
    right = reference_boxes(tmp_path / "by_image.json", image_ids)
    run = EvalOptions(benchmark, str(data), str(tmp_path / "out"), boxes=str(right))
    results = run_eval(run, generate=answer_a)
    assert results["boxes"]["found"] == {"id": len(image_ids)} and results["boxes"]["missing"] == 0


# -- through `mgllava eval` with a tiny model -------------------------------------------------------------
def eval_argv(model, benchmark, out, *extra):
    return ["eval", "--model", model, "--benchmark", benchmark, "--out", str(out), "--max-new-tokens", "4",
            *map(str, extra)]  # fmt: skip


def test_textvqa_through_main_with_the_reference_box_file(model_dir, tmp_path, capsys):
    files = fmt.write_textvqa(tmp_path / "textvqa")
    images = tmp_path / "train_images"
    images.mkdir()
    for name, color in (("aa01", (200, 20, 20)), ("bb02", (20, 20, 200))):
        Image.new("RGB", (40, 30), color).save(images / f"{name}.jpg")
    args = ["--data", files["official"], "--ocr", files["ocr"], "--images", images]
    wrong = reference_boxes(tmp_path / "by_question.json", [34602, 34603])
    assert main(eval_argv(model_dir, "textvqa_val", tmp_path / "bad", *args, "--boxes", wrong)) == 2
    err = capsys.readouterr().err
    assert "matches none of the 2 samples" in err and "TextVQA image id" in err and "'34602'" in err
    assert not (tmp_path / "bad").exists()

    right = reference_boxes(tmp_path / "textvqa_boxes.json", ["aa01", "bb02"])
    out = tmp_path / "out"
    assert main(eval_argv(model_dir, "textvqa_val", out, *args, "--boxes", right)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["boxes"]["found"] == {"id": 2} and results["boxes"]["missing"] == 0
    assert results["counts"]["predicted"] == 2 and results["counts"]["failed"] == 0
    assert results["box_settings"] == {
        "box_nms_iou": 0.2,
        "box_limit": 100,
        "box_cap": "per_label",
        "box_per_label": None,
    }
    table = (out / "results.md").read_text()
    assert "| box_settings | class-wise NMS at IoU 0.2; above 100 boxes, the top 20 per label |" in table
    assert "| box_ids | `image_id` (LLaVA's `question_id`) |" in table
    assert "| boxes found | 2 of 2 in" in table and "(2 by id)" in table


def test_vqav2_and_video_through_main(model_dir, tmp_path, capsys):
    files = fmt.write_vqav2(tmp_path / "vqa")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (30, 20), (10, 10, 200)).save(images / "COCO_test2015_000000000042.jpg")
    boxes = reference_boxes(tmp_path / "vqav2_box.json", [420, 421])
    out = tmp_path / "vqa_out"
    argv = eval_argv(model_dir, "vqav2_testdev", out, "--data", files["testdev"], "--images", images,
                     "--boxes", boxes)  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["boxes"]["found"] == {"id": 2} and results["box_settings"]["box_limit"] is None
    assert results["rules"]["box_settings"] == "class-wise NMS at IoU 0.2; no cap"
    # answers made with other box settings are never mixed into the folder
    assert main([*argv, "--box-limit", "5"]) == 2
    assert "box_settings" in capsys.readouterr().err
    assert (
        main([*argv[:6], str(tmp_path / "capped"), *argv[7:], "--box-limit", "5", "--box-cap", "top_k"]) == 0
    )
    capped = json.loads((tmp_path / "capped" / "results.json").read_text())
    assert capped["box_settings"]["box_limit"] == 5 and capped["box_settings"]["box_cap"] == "top_k"
    assert (
        capped["rules"]["box_settings"] == "class-wise NMS at IoU 0.2; at most 5 boxes, highest scores first"
    )

    videos = fmt.write_video_qa(tmp_path / "msvd")
    boxes = reference_video_boxes(tmp_path / "MSVD_frame8_only_bbox.json", ["-4wsuPCjDBc_5_15", "video7010"])
    out = tmp_path / "video_out"
    argv = eval_argv(model_dir, "msvd_qa", out, "--data", videos["questions"], "--images", videos["videos"],
                     "--annotations", videos["answers"], "--boxes", boxes, "--max-missing-boxes", "0.25",
                     "--max-failed-samples", "1")  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["boxes"]["found"] == {"id": 3} and results["boxes"]["missing"] == 1  # missing_clip
    assert results["counts"]["predicted"] == 3 and [f["id"] for f in results["failed"]] == ["v2"]
    assert results["box_settings"]["box_per_label"] == 20


def grid_boxes(n: int, cell: int = 20, per_row: int = 15) -> Boxes:
    """`n` disjoint boxes of one label on a grid (no NMS overlap), scores descending."""
    xyxy = [[(i % per_row) * cell, (i // per_row) * cell, (i % per_row) * cell + cell - 4,
             (i // per_row) * cell + cell - 4] for i in range(n)]  # fmt: skip
    return Boxes(xyxy, [1.0 - i / (2 * n) for i in range(n)], ["thing"] * n, (300, 300))


@pytest.mark.parametrize(
    ("benchmark", "flags", "used"),
    [
        ("vqav2_testdev", {}, 150),  # the reference sets no box limit for VQAv2
        ("textvqa_val", {}, 20),  # more than 100 boxes: the top 20 of the one label
        ("textvqa_val", {"box_limit": None}, 150),
        ("vqav2_testdev", {"box_limit": 7, "box_cap": "top_k"}, 7),
        ("msvd_qa", {}, 20),
    ],
)
def test_box_settings_reach_the_engines_image_processor(model_dir, tmp_path, benchmark, flags, used):
    opts = EvalOptions(benchmark, "unused", str(tmp_path), model=model_dir, box_settings=flags)
    engine = load_generator(opts, 4).engine
    image = Image.new("RGB", (300, 300), (90, 90, 90))
    messages = [{"role": "user", "content": "<image>\nwhat is there?"}]
    prepared = engine.prepare(messages, images=[image], boxes=[grid_boxes(150)])
    assert len(prepared.images[0].boxes) == used
    assert prepared.frames[0].tensors["object_counts"].tolist() == [used]


def test_bad_box_settings_name_the_flag(model_dir, tmp_path, capsys):
    data = fmt.write_short_vqa(tmp_path / "set", n=1)
    base = [
        "eval",
        "--model",
        model_dir,
        "--benchmark",
        "short_vqa",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit):
        main([*base, "--box-limit", "0"])
    assert "--box-limit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--box-nms-iou", "1.5"])
    assert "--box-nms-iou" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown box setting"):
        run_eval(
            EvalOptions("short_vqa", str(data), str(tmp_path / "o"), box_settings={"limit": 3}), answer_a
        )
    assert not (tmp_path / "o").exists()
