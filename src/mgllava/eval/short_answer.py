"""Short-answer benchmarks: TextVQA val, DocVQA val, VQAv2 (val scored, test-dev upload), and our own
short-answer VQA JSONL (easy-vqa and any generated set).

Formats read:
- TextVQA: the official `TextVQA_0.5.1_val.json` (`data[]`: question, question_id, image_id, answers[10]),
  with OCR tokens from the item's `ocr_tokens` or from `--ocr TextVQA_Rosetta_OCR_v0.2_val.json`
  (`data[]`: image_id, ocr_tokens); or LLaVA's question file `llava_textvqa_val_v051_ocr.jsonl`
  (`question_id` = image id, `image`, `text` = the exact prompt) with `--annotations` = the official JSON,
  matched on (image id, question) through LLaVA's `prompt_processor`, as LLaVA's `eval_textvqa.py` does.
  Images: `<--images>/<image_id>.jpg`.
- DocVQA: the official `val_v1.0.json` (`data[]`: questionId, question, image, answers, question_types),
  images under `--images`; or the VLMEvalKit `DocVQA_VAL.tsv` the reference reads (base64 `image`,
  `answer` = a Python list literal).
- VQAv2: the official questions file (`v2_OpenEnded_mscoco_<subtype>_questions.json`, images
  `COCO_<subtype>_<image_id:012d>.jpg`, test-dev images in `test2015`) with `--annotations` for val; or
  LLaVA's `llava_vqav2_mscoco_test-dev2015.jsonl` (`question_id`, `image`, `text`).
- short-answer VQA JSONL (ours): one object a line, `{"id", "image", "question", "answers": [...],
  "category"?, "prompt"?}`; `prompt`, when present, is used as the question text verbatim.

Box ids (docs/benchmarks.md): TextVQA the image id (LLaVA's `question_id`; `image_id` of the official JSON),
DocVQA the TSV `index` (the native JSON, which lacks it: the image path), VQAv2 the `question_id`.

Prompts (docs/design.md section 9): `<image>\\n{question}\\nAnswer the question using a single word or phrase.`,
byte-equal to LLaVA's question files (and so to the reference, which reads them): a LLaVA question file's
`text` is used as it is; from the official TextVQA JSON the question goes through `str.capitalize()` (LLaVA's
file and lmms-eval: "what is NASA?" -> "What is nasa?") and `\\nReference OCR token: t1, t2, ...` follows it,
kept with nothing after the colon when an image has no OCR tokens, as LLaVA's file keeps it
(`--prompt plain`: no OCR line, lmms-eval's default). VQAv2 and DocVQA questions are used as written, as
LLaVA's VQAv2 file and the VLMEvalKit DocVQA TSV have them.

Scores: TextVQA `textvqa_accuracy` (M4C); DocVQA `anls`; VQAv2 val: VQA accuracy of the chosen pipeline
(`--scoring`: official vqaEval.py, llava = EvalAI processor first, lmms-eval), with the official
per-answer-type table; VQAv2 test-dev: the upload file, answers as the pipeline writes them; short-answer
JSONL: `--metric` exact (default), vqa (the pipeline's), anls or textvqa.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data.templates import IMAGE_TOKEN
from ..utils.io import JsonlError, atomic_write_json, atomic_write_text, read_jsonl
from .metrics import anls, exact_match, textvqa_accuracy
from .multiple_choice import read_tsv
from .samples import (
    Issue,
    Loaded,
    Sample,
    decode_base64,
    keep_first,
    media_path,
    read_json,
    tag_in_text,
)
from .scoring import (
    DEFAULT_SCORING,
    UPLOAD_RULES,
    VQA_ACCURACY,
    VQA_RULES,
    by_category,
    check_scoring,
    mean_percent,
    upload_answer,
)

SHORT_SUFFIX = "Answer the question using a single word or phrase."
OCR_PREFIX = "Reference OCR token: "


def short_prompt(question: str) -> str:
    """`<image>\\n{question}\\nAnswer the question using a single word or phrase.` (question as written)."""
    return f"{IMAGE_TOKEN}\n{question}\n{SHORT_SUFFIX}"


def textvqa_prompt(question: str, ocr_tokens: list[str] | None) -> str:
    """The prompt of LLaVA's llava_textvqa_val_v051_ocr.jsonl (and lmms-eval's TextVQA) from the official
    question: `str.capitalize()` (first letter up, the rest lower-cased), then the OCR line, kept when an
    image has no tokens (`Reference OCR token: ` with nothing after it); `ocr_tokens` None: no OCR line
    (`--prompt plain`, lmms-eval's prompt without OCR)."""
    middle = "" if ocr_tokens is None else f"\n{OCR_PREFIX}{', '.join(ocr_tokens)}"
    return f"{IMAGE_TOKEN}\n{question.capitalize()}{middle}\n{SHORT_SUFFIX}"


def _answers(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        return list(value)
    if isinstance(value, list) and value and all(isinstance(a, dict) and "answer" in a for a in value):
        return [str(a["answer"]) for a in value]
    return None


def _records(path: str | Path, what: str) -> list[dict[str, Any]]:
    try:
        return list(read_jsonl(path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what} {path}: no such file") from err
    except JsonlError as err:
        raise ValueError(f"{what}: {err}") from err


# -- TextVQA ------------------------------------------------------------------------------------------------
def _textvqa_items(path: str | Path) -> list[dict[str, Any]]:
    data = read_json(path, "TextVQA file")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"TextVQA file {path}: expected an object with a 'data' list")
    return data["data"]


def _ocr_tokens(path: str | Path | None) -> dict[str, list[str]]:
    if path is None:
        return {}
    data = read_json(path, "OCR file")
    items = data.get("data") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"OCR file {path}: expected an object with a 'data' list")
    return {str(i["image_id"]): list(i.get("ocr_tokens") or []) for i in items if isinstance(i, dict)}


def load_textvqa(
    path: str | Path,
    images_dir: str | None = None,
    ocr: str | Path | None = None,
    annotations: str | Path | None = None,
    variant: str = "ocr",
) -> Loaded:
    if variant not in ("ocr", "plain"):
        raise ValueError(f"TextVQA prompt variant must be 'ocr' or 'plain', got {variant!r}")
    if Path(path).suffix.lower() == ".jsonl":
        return _load_llava_questions(path, images_dir, annotations, "TextVQA (LLaVA question file)")
    tokens = _ocr_tokens(ocr)
    samples, issues = [], []
    for n, item in enumerate(_textvqa_items(path)):
        key = str(item.get("question_id", f"#{n}")) if isinstance(item, dict) else f"#{n}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            issues.append(Issue(key, "no question"))
            continue
        image_id = str(item.get("image_id", ""))
        if not image_id:
            issues.append(Issue(key, "no image_id"))
            continue
        ocr_list = None
        if variant == "ocr":
            found = item.get("ocr_tokens", tokens.get(image_id))
            if found is None:
                raise ValueError(
                    f"TextVQA {path}: question {key} has no OCR tokens; the LLaVA OCR prompt needs "
                    "--ocr TextVQA_Rosetta_OCR_v0.2_val.json (or use --prompt plain)"
                )
            ocr_list = [str(t) for t in found]  # [] still gets LLaVA's empty "Reference OCR token: " line
        problem = tag_in_text(item["question"])
        if problem:
            issues.append(Issue(key, problem))
            continue
        samples.append(
            Sample(
                key=key,
                prompt=textvqa_prompt(item["question"], ocr_list),
                image=media_path(images_dir, f"{image_id}.jpg"),
                box_id=image_id,  # the reference keys TextVQA by LLaVA's `question_id`, which is the image id
                answers=_answers(item.get("answers")),
                meta={},
            )
        )
    info = {
        "format": "TextVQA JSON",
        "prompt": variant,
        "prompt_rule": "question.capitalize(), OCR line kept when empty (LLaVA's question file)",
        "box_ids": "`image_id` (LLaVA's `question_id`)",
    }
    return Loaded(keep_first(samples, issues, "question_id"), issues, info)


def llava_prompt_question(prompt: str) -> str:
    """LLaVA `eval_textvqa.py` `prompt_processor`: the question inside a LLaVA TextVQA prompt, lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise ValueError("OCR-style prompt without 'Question: ... Short answer:'")
        question = match.group(1)
    elif OCR_PREFIX in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif OCR_PREFIX in prompt and len(lines) == 2:
        question = lines[1].replace("Question: ", "")
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"prompt of {len(lines)} lines in no format LLaVA knows")
    if question.startswith("Question: "):
        question = question.replace("Question: ", "")
    return question.lower()


def _load_llava_questions(
    path: str | Path, images_dir: str | None, annotations: str | Path | None, what: str
) -> Loaded:
    """A LLaVA question file; answers from `annotations` (TextVQA JSON) by (image id, question) when given."""
    answers: dict[tuple[str, str], list[str]] = {}
    if annotations is not None:
        for item in _textvqa_items(annotations):
            if isinstance(item, dict) and isinstance(item.get("question"), str):
                answers[(str(item.get("image_id")), item["question"].lower())] = item.get("answers")
    samples, issues, seen = [], [], set()
    for n, rec in enumerate(_records(path, what), 1):
        qid, text, image = rec.get("question_id"), rec.get("text"), rec.get("image")
        key = f"{qid}/{n}"  # LLaVA's TextVQA `question_id` is the image id, shared by its questions
        if qid is None or not isinstance(text, str) or not isinstance(image, str):
            issues.append(Issue(f"line {n}", "needs question_id, text and image"))
            continue
        if key in seen:
            issues.append(Issue(key, f"line {n}: question_id appears twice"))
            continue
        seen.add(key)
        gt = None
        if annotations is not None:
            try:
                gt = _answers(answers.get((str(qid), llava_prompt_question(text))))
            except ValueError as err:
                issues.append(Issue(key, f"line {n}: {err}"))
                continue
        if tag_in_text(text):
            issues.append(Issue(key, tag_in_text(text)))
            continue
        samples.append(
            Sample(key, f"{IMAGE_TOKEN}\n{text}", media_path(images_dir, image), None, str(qid), gt, {})
        )
    info = {"format": what, "box_ids": "`question_id` (in LLaVA's TextVQA file: the image id)"}
    return Loaded(samples, issues, info)


# -- DocVQA -------------------------------------------------------------------------------------------------
def load_docvqa(path: str | Path, images_dir: str | None = None) -> Loaded:
    if Path(path).suffix.lower() == ".tsv":
        return _load_docvqa_tsv(path)
    data = read_json(path, "DocVQA file")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"DocVQA file {path}: expected an object with a 'data' list")
    samples, issues = [], []
    for n, item in enumerate(data["data"]):
        key = str(item.get("questionId", f"#{n}")) if isinstance(item, dict) else f"#{n}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            issues.append(Issue(key, "no question"))
            continue
        if not isinstance(item.get("image"), str):
            issues.append(Issue(key, "no image"))
            continue
        if tag_in_text(item["question"]):
            issues.append(Issue(key, tag_in_text(item["question"])))
            continue
        samples.append(
            Sample(
                key=key,
                prompt=short_prompt(item["question"]),
                image=media_path(images_dir, item["image"]),
                box_id=item["image"],  # not the reference's key (the TSV `index`, which this file lacks)
                answers=_answers(item.get("answers")),
                meta={"question_types": list(item.get("question_types") or [])},
            )
        )
    info = {"format": "DocVQA JSON", "box_ids": "the `image` path (val_v1.0.json has no TSV `index`)"}
    return Loaded(keep_first(samples, issues, "questionId"), issues, info)


def _tsv_answers(text: str | None) -> list[str] | None:
    if text is None or text == "":
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return [text]
    return _answers(value) if isinstance(value, list) else [text]


def _load_docvqa_tsv(path: str | Path) -> Loaded:
    _, rows = read_tsv(path)
    samples, issues, images = [], [], {}
    for line, row in rows:
        if isinstance(row, str):
            issues.append(Issue(f"line {line}", row))
            continue
        key = row.get("index", f"line {line}")
        if not row.get("question"):
            issues.append(Issue(key, f"line {line}: no question"))
            continue
        images.setdefault(key, row.get("image", ""))  # a repeated index is refused below
        answers = _tsv_answers(row.get("answer"))
        prompt = short_prompt(row["question"])
        samples.append(Sample(key, prompt, box_id=key, answers=answers, meta={"split": row.get("split")}))
    keep = []
    for s in keep_first(samples, issues, "index"):
        value = images[s.key]
        while len(value) < 16 and value in images:  # a row that points at another row's image
            s.alt_box_ids += (value,)  # ... and so may find its boxes under that row's index
            value = images[value]
        try:
            s.image = decode_base64(value)
        except ValueError as err:
            issues.append(Issue(s.key, str(err)))
            continue
        keep.append(s)
    return Loaded(keep, issues, {"format": "VLMEvalKit TSV", "box_ids": "the TSV `index`"})


# -- VQAv2 --------------------------------------------------------------------------------------------------
def load_vqav2(
    path: str | Path, images_dir: str | None = None, annotations: str | Path | None = None
) -> Loaded:
    if Path(path).suffix.lower() == ".jsonl":
        return _load_llava_vqav2(path, images_dir, annotations)
    data = read_json(path, "VQAv2 questions file")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"VQAv2 questions file {path}: expected an object with a 'questions' list")
    subtype = str(data.get("data_subtype", ""))
    folder = "test2015" if subtype.startswith("test") else subtype
    gts = _vqav2_annotations(annotations) if annotations is not None else None
    samples, issues = [], []
    for n, q in enumerate(data["questions"]):
        key = str(q.get("question_id", f"#{n}")) if isinstance(q, dict) else f"#{n}"
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or "image_id" not in q:
            issues.append(Issue(key, "needs question, question_id and image_id"))
            continue
        if tag_in_text(q["question"]):
            issues.append(Issue(key, tag_in_text(q["question"])))
            continue
        ann = gts.get(key) if gts is not None else None
        try:
            name = f"COCO_{folder}_{int(q['image_id']):012d}.jpg"
        except (TypeError, ValueError):
            issues.append(Issue(key, f"image_id {q['image_id']!r} is not an integer"))
            continue
        samples.append(
            Sample(
                key=key,
                prompt=short_prompt(q["question"]),
                image=media_path(images_dir, name),
                box_id=key,
                answers=_answers(ann.get("answers")) if ann else None,
                meta={
                    "question_id": q["question_id"],
                    "answer_type": ann.get("answer_type") if ann else None,
                    "question_type": ann.get("question_type") if ann else None,
                },
            )
        )
    info = {"format": "VQAv2 JSON", "subtype": subtype, "box_ids": "`question_id`"}
    return Loaded(keep_first(samples, issues, "question_id"), issues, info)


def _vqav2_annotations(path: str | Path) -> dict[str, dict[str, Any]]:
    data = read_json(path, "VQAv2 annotations file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"VQAv2 annotations file {path}: expected an object with an 'annotations' list")
    return {
        str(a["question_id"]): a for a in data["annotations"] if isinstance(a, dict) and "question_id" in a
    }


def _load_llava_vqav2(path: str | Path, images_dir: str | None, annotations: str | Path | None) -> Loaded:
    gts = _vqav2_annotations(annotations) if annotations is not None else {}
    samples, issues, seen = [], [], set()
    for n, rec in enumerate(_records(path, "VQAv2 question file"), 1):
        qid, text, image = rec.get("question_id"), rec.get("text"), rec.get("image")
        if qid is None or not isinstance(text, str) or not isinstance(image, str):
            issues.append(Issue(f"line {n}", "needs question_id, text and image"))
            continue
        key = str(qid)
        if key in seen:
            issues.append(Issue(key, f"line {n}: question_id appears twice"))
            continue
        seen.add(key)
        ann = gts.get(key)
        meta = {"question_id": qid, "answer_type": ann.get("answer_type") if ann else None}
        answers = _answers(ann.get("answers")) if ann else None
        samples.append(
            Sample(key, f"{IMAGE_TOKEN}\n{text}", media_path(images_dir, image), None, key, answers, meta)
        )
    return Loaded(samples, issues, {"format": "LLaVA VQAv2 question file", "box_ids": "`question_id`"})


def _submission_ids(path: str | Path) -> list[Any]:
    """The question ids of a VQAv2 question file, in its order: the official JSON (`questions[]`) or a LLaVA
    question file (`llava_vqav2_mscoco_test2015.jsonl`, from which LLaVA's converter completes its upload)."""
    if Path(path).suffix.lower() == ".jsonl":
        records = _records(path, "VQAv2 submission questions file")
        missing = [n for n, r in enumerate(records, 1) if "question_id" not in r]
        if missing:
            raise ValueError(
                f"VQAv2 submission questions file {path}: line(s) {missing[:5]} have no question_id"
            )
        return [r["question_id"] for r in records]
    data = read_json(path, "VQAv2 questions file")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(
            f"VQAv2 questions file {path}: expected an object with a 'questions' list (the official JSON), "
            "or a LLaVA .jsonl question file"
        )
    return [q["question_id"] for q in data["questions"] if isinstance(q, dict) and "question_id" in q]


def write_vqav2_upload(
    loaded: Loaded,
    predictions: dict[str, str],
    path: str | Path,
    extra_questions: str | Path | None = None,
    scoring: str = DEFAULT_SCORING,
) -> tuple[Path, list[str]]:
    """EvalAI's VQAv2 upload file: `[{"question_id": int, "answer": str}]`, answers as the `scoring` pipeline
    writes them (`scoring.upload_answer`); questions without a prediction get "" (as LLaVA's converter does)
    and are returned. `extra_questions` (the full test2015 questions: the official JSON or LLaVA's
    `llava_vqav2_mscoco_test2015.jsonl`) gives the ids the server expects, in that file's order, as LLaVA's
    converter writes them; questions we ran that it lacks follow."""
    entries, empty = [], []
    ids = [(s.key, s.meta.get("question_id", s.key)) for s in loaded.samples]
    if extra_questions is not None:
        listed = [(str(qid), qid) for qid in dict.fromkeys(_submission_ids(extra_questions))]
        known = {k for k, _ in listed}
        ids = listed + [(k, qid) for k, qid in ids if k not in known]
    for key, qid in ids:
        text = predictions.get(key)
        if text is None:
            empty.append(key)
        entries.append({"question_id": _int_or(qid), "answer": upload_answer(scoring, text) if text else ""})
    return atomic_write_json(path, entries, indent=None), empty


def _int_or(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


# -- our short-answer JSONL ---------------------------------------------------------------------------------
def load_short_vqa(path: str | Path, images_dir: str | None = None) -> Loaded:
    """Our general short-answer VQA JSONL (see the module docstring); image paths relative to `images_dir`
    or, when it is not given, to the JSONL's folder."""
    root = images_dir if images_dir is not None else str(Path(path).parent)
    samples, issues, seen = [], [], set()
    for n, rec in enumerate(_records(path, "short-answer VQA file"), 1):
        key = str(rec.get("id", f"line {n}"))
        text = rec.get("prompt", rec.get("question"))
        if "id" not in rec or not isinstance(text, str) or not isinstance(rec.get("image"), str):
            issues.append(Issue(key, f"line {n}: needs id, image and question"))
            continue
        if key in seen:
            issues.append(Issue(key, f"line {n}: id appears twice"))
            continue
        seen.add(key)
        if tag_in_text(text):
            issues.append(Issue(key, tag_in_text(text)))
            continue
        prompt = f"{IMAGE_TOKEN}\n{text}" if "prompt" in rec else short_prompt(text)
        meta = {"category": rec.get("category")}
        samples.append(
            Sample(key, prompt, media_path(root, rec["image"]), None, key, _answers(rec.get("answers")), meta)
        )
    return Loaded(samples, issues, {"format": "short-answer VQA JSONL", "box_ids": "`id`"})


def write_short_vqa(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records in our short-answer JSONL format (checked field by field)."""
    lines = []
    for n, rec in enumerate(records):
        for field_name in ("id", "image", "question"):
            if field_name not in rec:
                raise ValueError(f"record {n}: missing {field_name!r}")
        if _answers(rec.get("answers")) is None:
            raise ValueError(f"record {n}: 'answers' must be a non-empty list of strings")
        lines.append(json.dumps(rec, ensure_ascii=False))
    return atomic_write_text(path, "\n".join(lines) + "\n")


# -- scoring ------------------------------------------------------------------------------------------------
SHORT_METRICS: dict[str, str] = {
    "exact": "normalised exact match: EvalAI answer processor on both sides, any answer (M4C STVQA accuracy)",
    "vqa": "VQA accuracy of the --scoring pipeline",
    "anls": "ANLS, threshold 0.5 (Robust Reading Competition script)",
    "textvqa": "TextVQA accuracy (M4C TextVQAAccuracyEvaluator: EvalAI processor on both sides, soft score)",
}
_SAME_EVERYWHERE = "same in every pipeline"


def short_metric(
    metric: str, scoring: str = DEFAULT_SCORING
) -> tuple[Callable[[str, list[str]], float], dict[str, str]]:
    """The per-sample function of `metric` under `scoring`, and the rules to name in the results."""
    check_scoring(scoring)
    if metric == "vqa":
        return VQA_ACCURACY[scoring], {"metric": VQA_RULES[scoring], "scoring": scoring}
    functions = {"exact": exact_match, "anls": anls, "textvqa": textvqa_accuracy}
    if metric not in functions:
        raise ValueError(f"unknown metric {metric!r}; available: {', '.join(SHORT_METRICS)}")
    return functions[metric], {"metric": SHORT_METRICS[metric], "scoring": f"{scoring} ({_SAME_EVERYWHERE})"}


def upload_rules(scoring: str) -> dict[str, str]:
    return {
        "upload": UPLOAD_RULES[check_scoring(scoring)] + "; questions without one get ''",
        "scoring": scoring,
    }


def score_short_answer(
    loaded: Loaded,
    predictions: dict[str, str],
    metric: str,
    category_fields: tuple[str, ...] = (),
    scoring: str = DEFAULT_SCORING,
) -> dict[str, Any]:
    """Mean of `metric` (under the `scoring` pipeline) over predicted samples that have ground truth;
    per-category tables by meta fields (a list-valued field, like DocVQA's question_types, puts a sample in
    each of its categories)."""
    fn, rules = short_metric(metric, scoring)
    values: dict[str, float] = {}
    no_gt = []
    for sample in loaded.samples:
        if sample.key not in predictions:
            continue
        if not sample.answers:
            no_gt.append(sample.key)
            continue
        values[sample.key] = fn(predictions[sample.key], sample.answers)
    by_key = {s.key: s for s in loaded.samples}
    categories = {}
    for name in category_fields:
        pairs = []
        for key, value in values.items():
            field_value = by_key[key].meta.get(name)
            pairs += (
                [(c, value) for c in field_value] if isinstance(field_value, list) else [(field_value, value)]
            )
        table = by_category(pairs)
        if table:
            categories[name] = table
    return {
        "metric": metric,
        "score": mean_percent(list(values.values())),
        "scored": len(values),
        "rules": rules,
        "categories": categories,
        "no_ground_truth": no_gt,
        "per_sample": {k: round(v, 6) for k, v in values.items()},
    }
