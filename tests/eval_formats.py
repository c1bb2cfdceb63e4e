"""Small benchmark files written in the exact published formats, for the loader and runner tests.

Formats: VLMEvalKit TSV (MMBench with CircularEval copies whose image field points at the base row;
SEEDBench_IMG, MMStar, ScienceQA_TEST and AI2D_TEST with their columns), SEED-Bench.json, ScienceQA problems.json, TextVQA 0.5.1 JSON + Rosetta OCR JSON + LLaVA's question
JSONL, DocVQA val JSON and VLMEvalKit DocVQA TSV, VQAv2 questions/annotations JSON, Video-ChatGPT
test_q/test_a JSON, and our short-answer JSONL.
"""

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image

from . import formats

MMB_COLUMNS = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "source",
    "l2-category",
    "comment",
    "split",
]


def png_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def rotate(options: list[str], answer: int, k: int) -> tuple[list[str], int]:
    """Rotation k of a question (options shifted left by k), as MMBench's circular copies are built."""
    n = len(options)
    return options[k:] + options[:k], (answer - k) % n


def mmbench_rows() -> list[dict]:
    """Question 0: four options, four copies (copies point at row 0 for the image); question 1: two
    options with a hint, one copy with its own image; question 2: hint 'nan' and an option 'None' (pandas
    NA); question 6: a copy whose answer is not an option (invalid, so the question is not scored)."""
    img0, img1, img2 = b64(png_bytes((200, 0, 0))), b64(png_bytes((0, 200, 0))), b64(png_bytes((0, 0, 200)))
    rows = []
    base = ["cat", "dog", "cow", "pig"]
    for k in range(4):
        opts, ans = rotate(base, 1, k)
        rows.append(
            dict(
                index=k * 1_000_000,
                question="Which animal?",
                hint="",
                A=opts[0],
                B=opts[1],
                C=opts[2],
                D=opts[3],
                answer="ABCD"[ans],
                category="attribute",
                image=img0 if k == 0 else "0",
                source="x",
                **{"l2-category": "perception"},
                comment="",
                split="dev",
            )
        )
    for k in range(2):
        opts, ans = rotate(["left", "right"], 0, k)
        rows.append(
            dict(
                index=1 + k * 1_000_000,
                question="Which side?",
                hint="Look at the red box.",
                A=opts[0],
                B=opts[1],
                C="",
                D="",
                answer="AB"[ans],
                category="attribute",
                image=img1,
                source="x",
                **{"l2-category": "perception"},
                comment="",
                split="dev",
            )
        )
    rows.append(
        dict(
            index=2,
            question="How many?",
            hint="nan",
            A="1",
            B="2",
            C="None",
            D="",
            answer="A",
            category="count",
            image=img2,
            source="x",
            **{"l2-category": "reasoning"},
            comment="",
            split="dev",
        )
    )
    rows.append(
        dict(
            index=6,
            question="Sky colour?",
            hint="",
            A="blue",
            B="green",
            C="",
            D="",
            answer="A",
            category="count",
            image=img2,
            source="x",
            **{"l2-category": "reasoning"},
            comment="",
            split="dev",
        )
    )
    rows.append(dict(rows[-1], index=1_000_006, A="green", B="blue", answer="E"))
    return rows


def write_tsv(
    path: Path, rows: list[dict], columns=MMB_COLUMNS, quoting=csv.QUOTE_MINIMAL, extra_lines=()
) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=quoting, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
        for line in extra_lines:
            handle.write(line + "\n")
    return path


def write_mmbench(path: Path, with_answers=True, bad_rows=True) -> Path:
    rows = mmbench_rows()
    columns = MMB_COLUMNS if with_answers else [c for c in MMB_COLUMNS if c != "answer"]
    extra = []
    if bad_rows:
        extra = [
            "3\tToo few fields\tA",  # malformed row
            "\t".join(
                [
                    "4",
                    "Broken image?",
                    "",
                    "a",
                    "b",
                    "",
                    "",
                    "A",
                    "count",
                    "!!!not*base64!!!",
                    "x",
                    "r",
                    "",
                    "dev",
                ]
            ),
            "\t".join(["5", "Dangling ref?", "", "a", "b", "", "", "A", "count", "77", "x", "r", "", "dev"]),
        ]
        if not with_answers:
            extra = [e.replace("\tA\tcount", "\tcount") for e in extra]
    return write_tsv(path, rows, columns, extra_lines=extra)


# VLMEvalKit's columns of the other multiple-choice TSVs the reference evaluates (image last but one or last).
MC_TSV_COLUMNS = {
    "SEEDBench_IMG.tsv": ["index", "question", "A", "B", "C", "D", "answer", "category", "image"],
    "MMStar.tsv": [
        "index",
        "question",
        "answer",
        "category",
        "l2_category",
        "bench",
        "A",
        "B",
        "C",
        "D",
        "image",
    ],
    "ScienceQA_TEST.tsv": [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "answer",
        "category",
        "image",
        "split",
    ],
    "AI2D_TEST.tsv": ["index", "question", "A", "B", "C", "D", "answer", "category", "image"],
}


def write_mc_tsv(path: Path, indices=(0, 1, 2)) -> Path:
    """A VLMEvalKit multiple-choice TSV named like the published one (`path.name` picks the columns):
    one question per index, each with its own base64 image."""
    rows = []
    for n, index in enumerate(indices):
        rows.append(
            dict(
                index=index,
                question=f"Question {n}?",
                hint="A hint." if n % 2 else "",
                A="yes",
                B="no",
                C="maybe",
                D="never",
                answer="AB"[n % 2],
                category="perception",
                l2_category="coarse",
                bench="seed",
                image=b64(png_bytes((40 * n % 255, 90, 160), size=(36 + 4 * n, 28))),
                split="test",
            )
        )
    return write_tsv(path, rows, MC_TSV_COLUMNS[path.name])


def write_seed(path: Path) -> Path:
    questions = [
        dict(
            answer="B",
            choice_a="red",
            choice_b="green",
            choice_c="blue",
            choice_d="black",
            data_id="img1.png",
            data_type="image",
            question="What colour?",
            question_id="101",
            question_type_id=1,
        ),
        dict(
            answer="A",
            choice_a="run",
            choice_b="walk",
            choice_c="sit",
            choice_d="jump",
            data_id="v.mp4",
            data_type="video",
            question="What action?",
            question_id="102",
            question_type_id=10,
        ),
        dict(
            answer="E",
            choice_a="1",
            choice_b="2",
            choice_c="3",
            choice_d="4",
            data_id="img1.png",
            data_type="image",
            question="How many?",
            question_id="103",
            question_type_id=2,
        ),
    ]
    types = {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10}
    path.write_text(json.dumps({"questions": questions, "question_type": types}))
    return path


def write_seed_repeated_id(path: Path) -> Path:
    """SEED-Bench.json as released in one respect: two image questions share `question_id` "49914" (the
    released file's ids are strings), between questions with ids of their own."""

    def question(qid, question, answer, data_id, type_id):
        choices = dict(choice_a="one", choice_b="two", choice_c="three", choice_d="four")
        return dict(answer=answer, **choices, data_id=data_id, data_type="image", question=question,
                    question_id=qid, question_type_id=type_id)  # fmt: skip

    questions = [
        question("49913", "How many dogs are there?", "A", "1454426_2591111986.jpg", 2),
        question("49914", "How many cats are there?", "B", "1454427_2591111987.jpg", 2),
        question("49914", "How many cars are in the image?", "D", "1454428_2591111988.jpg", 1),
        question("49915", "How many people are there?", "C", "1454429_2591111989.jpg", 1),
    ]
    types = {"Scene Understanding": 1, "Instance Identity": 2}
    path.write_text(json.dumps({"questions": questions, "question_type": types}))
    return path


def write_scienceqa(path: Path) -> Path:
    problems = {
        "5": dict(
            question="Which is a mammal?",
            choices=["shark", "whale", "trout"],
            answer=1,
            hint="Whales breathe air.",
            image="image.png",
            split="test",
            subject="natural science",
            grade="grade4",
            lecture="",
            solution="",
        ),
        "6": dict(
            question="No image here?",
            choices=["a", "b"],
            answer=0,
            hint="",
            image=None,
            split="test",
            subject="language science",
        ),
        "7": dict(
            question="Train question?",
            choices=["a", "b"],
            answer=0,
            hint="",
            image="image.png",
            split="train",
            subject="social science",
        ),
        "8": dict(
            question="Bad answer?",
            choices=["a", "b"],
            answer=5,
            hint="",
            image="image.png",
            split="test",
            subject="social science",
        ),
    }
    path.write_text(json.dumps(problems))
    return path


def write_textvqa(folder: Path) -> dict[str, Path]:
    """As released: the official questions lower-case (one with a capitalised word), one image without OCR
    tokens; LLaVA's question file with the same questions through `str.capitalize()` and, for the image
    without tokens, an empty `Reference OCR token: ` line (its 115 such questions read so)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = [
        dict(
            question="what brand is this?",
            image_id="aa01",
            image_classes=["Bottle"],
            image_width=40,
            image_height=30,
            answers=["coca cola"] * 6 + ["coke"] * 4,
            question_tokens=["what"],
            question_id=34602,
            set_name="val",
        ),
        dict(
            question="what number is on the SIGN?",
            image_id="bb02",
            answers=["5"] * 10,
            question_id=34603,
            set_name="val",
        ),
    ]
    official = folder / "TextVQA_0.5.1_val.json"
    official.write_text(
        json.dumps(
            {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}
        )
    )
    ocr = folder / "TextVQA_Rosetta_OCR_v0.2_val.json"
    ocr.write_text(
        json.dumps(
            {
                "data": [
                    {"image_id": "aa01", "ocr_tokens": ["COCA", "Cola"], "ocr_info": []},
                    {"image_id": "bb02", "ocr_tokens": [], "ocr_info": []},
                ]
            }
        )
    )
    llava = folder / "llava_textvqa_val_v051_ocr.jsonl"
    lines = [
        {
            "question_id": "aa01",
            "image": "aa01.jpg",
            "category": "default",
            "text": "What brand is this?\nReference OCR token: COCA, Cola\nAnswer the question using a single word or phrase.",
        },
        {
            "question_id": "bb02",
            "image": "bb02.jpg",
            "category": "default",
            "text": "What number is on the sign?\nReference OCR token: \nAnswer the question using a single word or phrase.",
        },
        {
            "question_id": "cc03",
            "image": "cc03.jpg",
            "category": "default",
            "text": "Not in the annotations?\nReference OCR token: x\nAnswer the question using a single word or phrase.",
        },
    ]
    llava.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"official": official, "ocr": ocr, "llava": llava}


def write_docvqa(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = [
        dict(
            questionId=49153,
            question="What is the date?",
            question_types=["handwritten", "form"],
            image="documents/pybv0228_81.png",
            docId=14465,
            ucsf_document_id="pybv0228",
            ucsf_document_page_no="81",
            answers=["12/15/88", "15 December 1988"],
            data_split="val",
        ),
        dict(
            questionId=49154,
            question="Who signed?",
            question_types=["form"],
            image="documents/x.png",
            docId=1,
            answers=[],
            data_split="val",
        ),
    ]
    official = folder / "val_v1.0.json"
    official.write_text(
        json.dumps({"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0", "data": data})
    )
    tsv = write_tsv(
        folder / "DocVQA_VAL.tsv",
        [
            dict(
                index="0",
                image=b64(png_bytes()),
                question="What is the date?",
                answer="['12/15/88', 'Dec 15']",
                split="val",
            ),
            dict(index="1", image="0", question="Title?", answer="['MEMO']", split="val"),
            dict(index="2", image="%%%%not-base64%%%%", question="Broken?", answer="['x']", split="val"),
        ],
        columns=["index", "image", "question", "answer", "split"],
        quoting=csv.QUOTE_ALL,
    )
    return {"official": official, "tsv": tsv}


def write_vqav2(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    questions = [
        dict(image_id=42, question="What color is the bus?", question_id=420),
        dict(image_id=42, question="How many wheels?", question_id=421),
        dict(image_id=7, question="Is it raining?", question_id=70),
    ]
    base = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    val_q = folder / "v2_OpenEnded_mscoco_val2014_questions.json"
    val_q.write_text(json.dumps({**base, "data_subtype": "val2014", "questions": questions}))
    test_q = folder / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    test_q.write_text(json.dumps({**base, "data_subtype": "test-dev2015", "questions": questions[:2]}))
    full_q = folder / "v2_OpenEnded_mscoco_test2015_questions.json"
    full_q.write_text(json.dumps({**base, "data_subtype": "test2015", "questions": questions}))

    def ann(qid, answers, answer_type, question_type):
        return dict(
            question_id=qid,
            image_id=0,
            question_type=question_type,
            answer_type=answer_type,
            multiple_choice_answer=answers[0],
            answers=[dict(answer=a, answer_confidence="yes", answer_id=i + 1) for i, a in enumerate(answers)],
        )

    annotations = folder / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(
        json.dumps(
            {
                **base,
                "data_subtype": "val2014",
                "annotations": [
                    ann(420, ["red"] * 10, "other", "what color is the"),
                    ann(421, ["4"] * 2 + ["four"] * 1 + ["6"] * 7, "number", "how many"),
                ],
            }
        )
    )  # question 70 has no annotation
    suffix = "\nAnswer the question using a single word or phrase."
    llava_full = folder / "llava_vqav2_mscoco_test2015.jsonl"
    llava_full.write_text(
        "".join(
            json.dumps({"question_id": q["question_id"], "image": f"COCO_test2015_{q['image_id']:012d}.jpg",
                        "text": q["question"] + suffix, "category": "default"}) + "\n"
            for q in reversed(questions)  # its own order, which LLaVA's upload follows
        )
    )  # fmt: skip
    return {
        "val": val_q,
        "testdev": test_q,
        "test2015": full_q,
        "annotations": annotations,
        "llava_test2015": llava_full,
    }


def write_video(path: Path, n_frames: int = 12) -> Path:
    return formats.write_video(path, n_frames=n_frames, step=15)


def write_video_qa(folder: Path, videos: bool = True) -> dict[str, Path]:
    """MSVD-style: two videos (.avi name resolution left to the loader via the bare video_name)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "videos").mkdir(exist_ok=True)
    if videos:
        write_video(folder / "videos" / "-4wsuPCjDBc_5_15.mp4")
        write_video(folder / "videos" / "video7010.mp4", n_frames=9)
    questions = [
        dict(video_name="-4wsuPCjDBc_5_15", question_id="v0", question="what is the man doing?"),
        dict(video_name="video7010", question_id="v1", question="what is in the bowl?"),
        dict(video_name="missing_clip", question_id="v2", question="who is there?"),
        dict(video_name="video7010", question_id="v3", question="is there an answer?"),
    ]
    answers = [
        dict(answer="cooking", type=0, question_id="v0"),
        dict(answer="soup", type=0, question_id="v1"),
        dict(answer="woman", type=0, question_id="v2"),
    ]  # v3 has none
    (folder / "test_q.json").write_text(json.dumps(questions))
    (folder / "test_a.json").write_text(json.dumps(answers))
    return {
        "questions": folder / "test_q.json",
        "answers": folder / "test_a.json",
        "videos": folder / "videos",
    }


def write_short_vqa(folder: Path, n: int = 6, broken: bool = False) -> Path:
    """Our short-answer JSONL with PNG images; `broken` adds a missing image, an undecodable image and a
    record without answers."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    colors = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    records = []
    for i in range(n):
        name = list(colors)[i % 3]
        Image.new("RGB", (32 + 4 * i, 32), colors[name]).save(folder / "images" / f"{i}.png")
        records.append(
            {
                "id": f"q{i}",
                "image": f"images/{i}.png",
                "question": "what color is the image?",
                "answers": [name],
                "category": "color",
            }
        )
    if broken:
        (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
        records += [
            {"id": "gone", "image": "images/nowhere.png", "question": "what color?", "answers": ["red"]},
            {"id": "corrupt", "image": "images/corrupt.png", "question": "what color?", "answers": ["red"]},
            {"id": "no-gt", "image": "images/0.png", "question": "what color?", "category": "color"},
        ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
