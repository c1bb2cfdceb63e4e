"""Multiple-choice benchmarks: MMBench dev/test, SEED-Bench (image), MMStar, ScienceQA-IMG, AI2D.

Formats read:
- VLMEvalKit TSV, the files the MG-LLaVA reference evaluates (MMBench_DEV_EN.tsv, SEEDBench_IMG.tsv,
  MMStar.tsv, ScienceQA_TEST.tsv, AI2D_TEST.tsv): columns `index, question, [hint], A, B, ..., [answer],
  [category], [l2-category or l2_category (MMStar)], [split], image` with base64 images. A rotated MMBench copy has
  `index = base + k * 1_000_000` and may store, instead of an image, the index of the row that holds it
  (a field shorter than 16 characters), as the reference's `get_image` resolves it.
- SEED-Bench's own `SEED-Bench.json` (`questions[]` with `choice_a..d`, `data_type`, `question_type_id`;
  image questions only; images under `--images` by `data_id`). The released file repeats `question_id`
  "49914" for two image questions; both are answered and scored (the second keyed "49914#2").
- ScienceQA's own `problems.json` (`{pid: {question, choices, answer, hint, image, split, subject}}`;
  questions with an image in the chosen split; images at `<--images>/<pid>/<image>`).

Box ids (docs/benchmarks.md): a TSV row's `index`, as the reference's box files key every row (a rotated
copy then tries its base row's index); the native JSON files lack that index, so their samples are filed
under their image path.

Prompt (docs/design.md section 9, the reference's `MGLLaVAProxyEvalDataset`):
`<image>\\n[hint\\n]question\\nA. ...\\nB. ...\\nAnswer with the option's letter from the given choices directly.`
The closing instruction (`--mc-instruction`, MC_INSTRUCTIONS): by default the Chinese `请直接回答选项字母。`
when the text holds a CJK character, as the MG-LLaVA reference does (`is_cn_string` over the whole text), so an
English MMBench row that quotes kanji gets the Chinese one; LLaVA chooses by file (`--lang en`/`cn` of
`model_vqa_mmbench.py`), which `english`/`chinese` reproduce. We default to the reference's because the
numbers this project checks itself against are MG-LLaVA's. The layout is LLaVA's too (its SEED and MMBench
question files are byte-equal to these prompts).

Quirk kept from the reference, which reads TSVs with pandas: a field equal to one of pandas' default NA
strings ("", "NA", "N/A", "None", "null", "nan", ...) counts as missing, so such an option or hint is left
out of the prompt; every row where this dropped a non-empty text is listed under `pandas_na_fields`.
Deviation: pandas turns an all-number column with gaps into floats ("2" -> "2.0"); we keep fields as written.

Scoring: the letter of each answer is read by a choice rule (`metrics.CHOICE_RULES`; the benchmark's rule
under the `--scoring` pipeline, or `--choice-rule`). The metric is the benchmark's, never inferred from the
file: MMBench is scored by CircularEval (rows grouped by `index % 1_000_000` as VLMEvalKit does; a question
counts when every rotation's letter equals that row's answer; the vanilla accuracy of the original rows,
VLMEvalKit's "vanilla_0", beside it), every other benchmark by plain accuracy, one row one question.
The headline is the mean over questions (micro); the mean of the per-category accuracies (macro, MMStar's
six core capabilities weigh the same) is reported for every category column. Per-category tables use
`category` and `l2-category` / `l2_category`, per split. A TSV without answers (MMBench test) is written out
as the xlsx the MMBench server takes (LLaVA's `convert_mmbench_for_submission` layout: pandas' sheet name
"Sheet1", `index` a number, every other cell text); SEED-Bench.json answers are also written as the jsonl
LLaVA's `convert_seed_for_submission` uploads (`{"question_id", "prediction"}` a line, in the file's order).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..data.templates import IMAGE_TOKEN
from ..utils.io import atomic_write_text
from .metrics import CHOICE_RULES, CIRCULAR_BASE, circular_correct, circular_key, extract_choice
from .samples import Issue, Loaded, Sample, decode_base64, media_path, read_json, tag_in_text
from .scoring import by_category, macro_percent, mean_percent

logger = logging.getLogger(__name__)

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
MC_SUFFIX_CN = "请直接回答选项字母。"
PANDAS_NA = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
     "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)  # fmt: skip
CATEGORY_COLUMNS = ("category", "l2-category", "l2_category")  # MMBench, SEED, AI2D, SQA; MMStar
_CJK = re.compile("[\u4e00-\u9fff]")
_LETTERS = string.ascii_uppercase


# --mc-instruction: which closing instruction a prompt gets (see the module docstring)
MC_INSTRUCTIONS = {
    "by-text": "Chinese when the prompt holds a CJK character, else English (the MG-LLaVA reference)",
    "english": "always English (LLaVA's --lang en, its setting for the English files)",
    "chinese": "always Chinese (LLaVA's --lang cn, its setting for MMBench_*_CN)",
}
DEFAULT_MC_INSTRUCTION = "by-text"


def mc_prompt(
    question: str, options: dict[str, str], hint: str | None = None, instruction: str = DEFAULT_MC_INSTRUCTION
) -> str:
    """The reference's multiple-choice prompt (with the image tag in front); `instruction`: MC_INSTRUCTIONS."""
    if instruction not in MC_INSTRUCTIONS:
        raise ValueError(f"unknown --mc-instruction {instruction!r}; available: {', '.join(MC_INSTRUCTIONS)}")
    text = question + "\n" + "".join(f"{letter}. {option}\n" for letter, option in options.items())
    if hint is not None:
        text = hint + "\n" + text
    text = IMAGE_TOKEN + "\n" + text
    chinese = instruction == "chinese" or (instruction == "by-text" and _CJK.search(text) is not None)
    return text + (MC_SUFFIX_CN if chinese else MC_SUFFIX)


# -- VLMEvalKit TSV -----------------------------------------------------------------------------------------
@contextmanager
def _big_fields() -> Iterator[None]:
    """Base64 images exceed the csv module's default 128 KiB field limit; raise it for this read only."""
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_tsv(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, str] | str]]]:
    """Header and rows of a TSV (pandas' quoting rules). A row with the wrong field count comes back as
    the reason string instead of a dict, with its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path}: no such file")
    rows: list[tuple[int, dict[str, str] | str]] = []
    with _big_fields(), path.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"benchmark file {path}: empty") from None
        except csv.Error as err:
            raise ValueError(f"benchmark file {path}: unreadable header ({err})") from err
        while True:
            line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                rows.append((line, f"unreadable TSV row ({err})"))
                continue
            if not values:
                continue
            if len(values) != len(header):
                rows.append((line, f"{len(values)} fields, the header has {len(header)}"))
                continue
            rows.append((line, dict(zip(header, values, strict=True))))
    return header, rows


def _field(row: dict[str, str], key: str) -> str | None:
    value = row.get(key)
    return None if value is None or value in PANDAS_NA else value


def _options(row: dict[str, str], header: list[str]) -> dict[str, str]:
    return {c: row[c] for c in _LETTERS if c in header and _field(row, c) is not None}


def _dropped_as_na(row: dict[str, str], header: list[str]) -> list[str]:
    keys = [c for c in _LETTERS if c in header] + ["hint"]
    return [k for k in keys if row.get(k) not in (None, "") and row.get(k) in PANDAS_NA]


class _TsvBuilder:
    """Turns TSV rows into samples, collecting issues; images are resolved after all rows are read."""

    def __init__(self, header: list[str], images_dir: str | None, instruction: str) -> None:
        self.header = header
        self.images_dir = images_dir
        self.instruction = instruction
        self.has_answer = "answer" in header
        self.samples: list[Sample] = []
        self.issues: list[Issue] = []
        self.raw_images: dict[int, str] = {}
        self.table: list[dict[str, Any]] = []
        self.na_rows: list[dict[str, Any]] = []
        self.seen: set[int] = set()

    def add(self, line: int, row: dict[str, str]) -> None:
        try:
            index = int(row.get("index", ""))
        except ValueError:
            self.issues.append(Issue(f"line {line}", f"index {row.get('index')!r} is not an integer"))
            return
        key, group = str(index), str(circular_key(index))
        if index in self.seen:
            self.issues.append(Issue(f"{key} (line {line})", f"index {index} appears twice", group))
            return
        self.seen.add(index)
        reason = self._row_problem(row)
        if reason is not None:
            self.issues.append(Issue(key, f"line {line}: {reason}", group))
            return
        self.table.append({k: v for k, v in row.items() if k != "image"})
        dropped = _dropped_as_na(row, self.header)
        if dropped:
            self.na_rows.append({"id": key, "fields": dropped})
        self.samples.append(self._sample(index, row))
        self.raw_images[index] = row.get("image", "")

    def _row_problem(self, row: dict[str, str]) -> str | None:
        question = _field(row, "question")
        if question is None:
            return "no question"
        options = _options(row, self.header)
        if len(options) < 2:
            return f"{len(options)} options (need at least 2)"
        answer = _field(row, "answer") if self.has_answer else None
        if answer is not None and answer.strip() not in options:
            return f"answer {answer!r} is not one of the options {''.join(options)}"
        if "image" not in self.header and "image_path" not in self.header:
            return "no image or image_path column"
        return tag_in_text(question, _field(row, "hint"), *options.values())

    def _sample(self, index: int, row: dict[str, str]) -> Sample:
        options = _options(row, self.header)
        answer = _field(row, "answer") if self.has_answer else None
        meta = {
            "index": index,
            "group": str(circular_key(index)),
            "options": options,
            "answer": answer.strip() if answer is not None else None,
        }
        for column in (*CATEGORY_COLUMNS, "split"):
            if _field(row, column) is not None:
                meta[column] = row[column]
        image = None
        if "image" not in self.header:
            image = media_path(self.images_dir, row["image_path"])
        return Sample(
            key=str(index),
            prompt=mc_prompt(row["question"], options, _field(row, "hint"), self.instruction),
            image=image,
            box_id=str(index),  # the reference's box files have one record per TSV row, keyed by `index`
            answers=[meta["answer"]] if meta["answer"] is not None else None,
            meta=meta,
            alt_box_ids=(meta["group"],),  # a rotated copy shows its base row's image
        )

    def resolve_images(self) -> None:
        """Decode each base64 image once; rows that point at another row share its bytes."""
        decoded: dict[int, bytes] = {}
        keep = []
        for sample in self.samples:
            if sample.image is not None:
                keep.append(sample)
                continue
            try:
                sample.image = self._image_of(sample.meta["index"], decoded)
            except ValueError as err:
                self.issues.append(Issue(sample.key, str(err), sample.meta["group"]))
                continue
            keep.append(sample)
        self.samples = keep

    def _image_of(self, index: int, decoded: dict[int, bytes]) -> bytes:
        seen = [index]
        value = self.raw_images[index]
        while len(value) < 16:  # a reference to the row that holds the image
            try:
                target = int(value)
            except ValueError:
                raise ValueError(f"image field {value!r} is neither base64 nor a row index") from None
            if target not in self.raw_images or target in seen:
                raise ValueError(f"image refers to row {target}, which has no image")
            seen.append(target)
            index, value = target, self.raw_images[target]
        if index not in decoded:
            decoded[index] = decode_base64(value)
        return decoded[index]


def load_tsv(
    path: str | Path, images_dir: str | None = None, instruction: str = DEFAULT_MC_INSTRUCTION
) -> Loaded:
    """A VLMEvalKit multiple-choice TSV (see the module docstring)."""
    header, rows = read_tsv(path)
    if "question" not in header or "index" not in header:
        raise ValueError(f"benchmark file {path}: needs 'index' and 'question' columns, has {header}")
    builder = _TsvBuilder(header, images_dir, instruction)
    for line, row in rows:
        if isinstance(row, str):
            builder.issues.append(Issue(f"line {line}", row))
        else:
            builder.add(line, row)
    builder.resolve_images()
    copies = sum(1 for s in builder.samples if s.meta["index"] >= 1_000_000)
    info = {
        "format": "VLMEvalKit TSV",
        "box_ids": "the TSV `index` (a rotated copy then tries its base row's index)",
        "circular_copies": copies,
        "has_answers": builder.has_answer,
        "pandas_na_fields": builder.na_rows,
    }
    return Loaded(builder.samples, builder.issues, info, builder.table)


# -- SEED-Bench and ScienceQA native files ------------------------------------------------------------------
SEED_FORMAT = "SEED-Bench.json"


def load_seed_json(
    path: str | Path, images_dir: str | None = None, instruction: str = DEFAULT_MC_INSTRUCTION
) -> Loaded:
    """SEED-Bench.json, image questions (`data_type == "image"`). The released file repeats a question id
    ("49914" twice, two image questions): each copy is its own question, the second keyed "49914#2", and
    `info["renamed_duplicates"]` names them; the upload file writes both under the id the file gives them."""
    data = read_json(path, "SEED-Bench file")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"SEED-Bench file {path}: expected an object with a 'questions' list")
    type_names = {int(v): k for k, v in (data.get("question_type") or {}).items()}
    samples, issues, skipped = [], [], 0
    copies: dict[str, list[str]] = {}
    for n, q in enumerate(data["questions"]):
        if not isinstance(q, dict):
            issues.append(Issue(f"question {n}", "not an object"))
            continue
        if q.get("data_type", "image") != "image":
            skipped += 1
            continue
        qid = str(q.get("question_id", f"#{n}"))
        keys = copies.setdefault(qid, [])
        key = qid if not keys else f"{qid}#{len(keys) + 1}"
        keys.append(key)
        options = {L: q.get(f"choice_{L.lower()}") for L in "ABCD"}
        problem = _native_problem(q.get("question"), options, q.get("answer"), q.get("data_id"))
        if problem:
            issues.append(Issue(key, problem))
            continue
        type_id = str(q.get("question_type_id"))
        category = type_names.get(int(type_id)) if type_id.isdigit() else None
        samples.append(
            Sample(
                key=key,
                prompt=mc_prompt(q["question"], options, None, instruction),
                image=media_path(images_dir, q["data_id"]),
                box_id=q["data_id"],  # not the reference's key (the TSV `index`, which this file lacks)
                answers=[q["answer"]],
                meta={
                    "group": key,
                    "question_id": q.get("question_id"),
                    "options": options,
                    "answer": q["answer"],
                    "category": category or type_id,
                },
            )
        )
    renamed = {qid: keys for qid, keys in copies.items() if len(keys) > 1}
    for qid, keys in renamed.items():
        logger.warning("%s: question_id %r names %d questions; answered and scored as %s",
                       path, qid, len(keys), ", ".join(keys))  # fmt: skip
    info = {
        "format": SEED_FORMAT,
        "box_ids": "the image's `data_id` (SEED-Bench.json has no TSV `index`)",
        "video_questions_skipped": skipped,
        "renamed_duplicates": renamed,
    }
    return Loaded(samples, issues, info)


def _native_problem(question: Any, options: dict[str, Any], answer: Any, image: Any) -> str | None:
    if not isinstance(question, str) or not question:
        return "no question"
    if any(not isinstance(v, str) for v in options.values()):
        return "an option is missing or not text"
    if answer not in options:
        return f"answer {answer!r} is not one of the options {''.join(options)}"
    if not isinstance(image, str) or not image:
        return "no image"
    return tag_in_text(question, *options.values())


def load_scienceqa_json(
    path: str | Path,
    images_dir: str | None = None,
    split: str = "test",
    instruction: str = DEFAULT_MC_INSTRUCTION,
) -> Loaded:
    """ScienceQA problems.json: the questions of `split` that have an image (ScienceQA-IMG)."""
    data = read_json(path, "ScienceQA file", unique_keys=True)  # keyed by problem id
    if not isinstance(data, dict):
        raise ValueError(f"ScienceQA file {path}: expected an object of problems keyed by id")
    samples, issues = [], []
    for pid, p in data.items():
        if not isinstance(p, dict):
            issues.append(Issue(str(pid), "not an object"))
            continue
        if p.get("split") != split or not p.get("image"):
            continue
        choices = p.get("choices")
        if not isinstance(choices, list) or not 2 <= len(choices) <= 26:
            issues.append(Issue(str(pid), "choices must be a list of 2 to 26 texts"))
            continue
        options = dict(zip(_LETTERS, choices, strict=False))
        answer = p.get("answer")
        letter = _LETTERS[answer] if isinstance(answer, int) and 0 <= answer < len(choices) else answer
        problem = _native_problem(p.get("question"), options, letter, p.get("image"))
        if problem:
            issues.append(Issue(str(pid), problem))
            continue
        hint = p.get("hint") if isinstance(p.get("hint"), str) and p.get("hint") else None
        samples.append(
            Sample(
                key=str(pid),
                prompt=mc_prompt(p["question"], options, hint, instruction),
                image=media_path(images_dir, f"{pid}/{p['image']}"),
                box_id=f"{pid}/{p['image']}",  # not the reference's key (the TSV `index`, not in this file)
                answers=[letter],
                meta={"group": str(pid), "options": options, "answer": letter, "category": p.get("subject")},
            )
        )
    info = {
        "format": "ScienceQA problems.json",
        "box_ids": "the image path `<pid>/<image>` (problems.json has no TSV `index`)",
        "split": split,
    }
    return Loaded(samples, issues, info)


def load_multiple_choice(
    path: str | Path, images_dir: str | None = None, instruction: str = DEFAULT_MC_INSTRUCTION
) -> Loaded:
    """By file type: `.tsv` VLMEvalKit, else SEED-Bench.json or ScienceQA problems.json by content."""
    if Path(path).suffix.lower() == ".tsv":
        return load_tsv(path, images_dir, instruction)
    data = read_json(path, "benchmark file")
    if isinstance(data, dict) and "questions" in data:
        return load_seed_json(path, images_dir, instruction)
    return load_scienceqa_json(path, images_dir, instruction=instruction)


# -- scoring ------------------------------------------------------------------------------------------------
def score_multiple_choice(
    loaded: Loaded, predictions: dict[str, str], rule: str = "reference", *, circular: bool
) -> dict[str, Any]:
    """Accuracy over the predicted questions. `predictions`: key -> answer text. `circular` comes from the
    benchmark (MMBench), never from the file: with it, rows are grouped by `meta["group"]` (index % 1000000)
    and a question counts only if every rotation is right (CircularEval); without it every row is a question
    of its own, whatever its index."""
    if rule not in CHOICE_RULES:
        raise ValueError(f"unknown choice rule {rule!r}; available: {', '.join(CHOICE_RULES)}")
    groups: dict[str, list[Sample]] = {}
    for sample in loaded.samples:
        groups.setdefault(sample.meta["group"] if circular else sample.key, []).append(sample)
    broken = {issue.group for issue in loaded.issues if issue.group is not None} if circular else set()
    rows = {
        s.key: extract_choice(predictions[s.key], s.meta["options"], rule)
        for s in loaded.samples
        if s.key in predictions
    }
    hits, incomplete, no_gt = {}, [], []
    for group, members in groups.items():
        if group in broken or any(s.key not in predictions for s in members):
            incomplete.append(group)
        elif any(s.meta["answer"] is None for s in members):
            no_gt.append(group)
        else:
            hits[group] = circular_correct(rows[s.key] == s.meta["answer"] for s in members)
    mains = {g: _main_row(groups[g]) for g in hits}
    result: dict[str, Any] = {
        "metric": "circular_accuracy" if circular else "accuracy",
        "score": mean_percent([float(v) for v in hits.values()]),
        "scored": len(hits),
        "rules": {"choice_extraction": rule, "choice_extraction_rule": CHOICE_RULES[rule].description},
        "categories": _categories(mains, hits),
        "macro_accuracy": _macro(mains, hits),
        "no_ground_truth": sorted(no_gt, key=_numeric_first),
        "incomplete_questions": sorted(set(incomplete) | broken, key=_numeric_first),
        # None, VLMEvalKit's "Z" (refusal / none of the options), the reference's runs like "ABC", or a
        # letter beyond this question's options (LLaVA's ScienceQA rule records it; it is wrong)
        "unparsed_predictions": sum(
            1 for s in loaded.samples if s.key in rows and rows[s.key] not in s.meta["options"]
        ),
        "extracted": rows,
    }
    if circular:
        result["rules"]["circular"] = "rows grouped by index % 1000000; right only if every rotation is right"
        result["vanilla_accuracy"] = _vanilla(loaded.samples, rows)
    return result


def _vanilla(samples: list[Sample], letters: dict[str, str | None]) -> dict[str, Any]:
    """Plain accuracy of the original rows (index < 1,000,000) that were answered and have an answer:
    VLMEvalKit's "vanilla_0" (PRINT_VANILLA=1), the number a benchmark without rotations would give."""
    firsts = [
        s
        for s in samples
        if s.meta.get("index", 0) < CIRCULAR_BASE and s.key in letters and s.meta["answer"] is not None
    ]
    hits = [float(letters[s.key] == s.meta["answer"]) for s in firsts]
    return {"score": mean_percent(hits), "n": len(hits), "rows": "index < 1000000 (the unrotated copies)"}


def _numeric_first(key: str) -> tuple[int, Any]:
    return (0, int(key)) if key.lstrip("-").isdigit() else (1, key)


def _main_row(members: list[Sample]) -> Sample:
    return min(members, key=lambda s: s.meta.get("index", 0))


def _categories(mains: dict[str, Sample], hits: dict[str, bool]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    splits = sorted({m.meta.get("split") for m in mains.values() if m.meta.get("split") is not None})
    for column in CATEGORY_COLUMNS:
        table = by_category((mains[g].meta.get(column), float(h)) for g, h in hits.items())
        if table:
            out[column] = table
    if len(splits) > 1:
        out["split"] = by_category((mains[g].meta.get("split"), float(h)) for g, h in hits.items())
    return out


def _macro(mains: dict[str, Sample], hits: dict[str, bool]) -> dict[str, float]:
    """Per category column: the mean of the category accuracies (each category weighs the same)."""
    out = {}
    for column in CATEGORY_COLUMNS:
        value = macro_percent((mains[g].meta.get(column), float(h)) for g, h in hits.items())
        if value is not None:
            out[column] = value
    return out


# -- MMBench test submission --------------------------------------------------------------------------------
SUBMISSION_DROP = ("hint", "category", "source", "image", "comment", "l2-category")


def write_mmbench_submission(loaded: Loaded, predictions: dict[str, str], path: str | Path) -> Path:
    """The xlsx the MMBench evaluation server takes: the TSV's columns without hint, category, source,
    image, comment and l2-category, with `prediction` inserted as the 7th column, on a sheet named "Sheet1"
    (LLaVA's `convert_mmbench_for_submission`, pandas `to_excel`). `index` is written as a number, every other
    cell as text ("007" stays "007"); pandas' NA strings and missing predictions as empty cells. Control
    characters, which xlsx cannot store, are dropped from the cells."""
    try:
        from openpyxl import Workbook
        from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    except ImportError as err:
        raise ValueError(
            "writing the MMBench submission needs openpyxl: pip install 'mgllava[eval]'"
        ) from err
    if not loaded.table:
        raise ValueError("no rows to write: the benchmark file had no valid rows")
    columns = [c for c in loaded.table[0] if c not in SUBMISSION_DROP]
    columns.insert(min(6, len(columns)), "prediction")
    book = Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(columns)
    for row in loaded.table:
        values = {**row, "prediction": predictions.get(str(row.get("index")))}
        cells = [_cell(c, values.get(c), ILLEGAL_CHARACTERS_RE) for c in columns]
        sheet.append(cells)
        for cell in sheet[sheet.max_row]:
            if isinstance(cell.value, str):
                cell.data_type = "s"  # text, even when it looks like a number or a formula
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    book.save(tmp)
    tmp.replace(path)
    return path


def _cell(column: str, value: Any, illegal: re.Pattern[str]) -> Any:
    """`index` as a number; pandas' NA strings as empty; other text as text without control characters."""
    if value is None or (column != "prediction" and value in PANDAS_NA):
        return None
    if column == "index":
        return int(value)
    return illegal.sub("", str(value))


# -- SEED-Bench upload --------------------------------------------------------------------------------------
def write_seed_upload(
    loaded: Loaded, predictions: dict[str, str], path: str | Path
) -> tuple[Path, list[str]]:
    """The SEED-Bench leaderboard file LLaVA's `convert_seed_for_submission` writes: one
    `{"question_id", "prediction"}` a line, the question id as SEED-Bench.json gives it (a repeated id on each
    of its questions, each with its own answer), the answer text as generated, in the file's order. Questions
    without an answer get "" and are returned."""
    lines, empty = [], []
    for sample in loaded.samples:
        text = predictions.get(sample.key)
        if text is None:
            empty.append(sample.key)
        record = {"question_id": sample.meta["question_id"], "prediction": text or ""}
        lines.append(json.dumps(record) + "\n")  # json.dumps' defaults, as LLaVA writes it
    return atomic_write_text(path, "".join(lines)), empty
