"""Scoring rules of the benchmarks, as pure functions that follow the official scripts, quirks included.

Harnesses disagree by whole points because of answer normalisation and choice extraction, so every function
here names the script it follows (repository, file, and the commit read when it matters). Where that script
has a quirk, we keep it and say so; a function that deviates says how. docs/scoring.md gives every rule with
its source and worked examples; `scoring.py` groups them into the pipelines `--scoring` chooses.

VQA-style accuracy (answers compared after normalisation; leave-one-out over the human answers):
- `vqa_accuracy`: GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (master, a013f00
  "Fixed processing answers bug", 2021): newlines and tabs become spaces and both sides are stripped; when
  the human answers are not all identical, `processPunctuation` and `processDigitArticle` go over the
  prediction and every answer; when they are identical, neither side is touched. The score is the mean over
  the n leave-one-out subsets of `min(1, matches / 3)`.
- `vqa_accuracy_lmms_eval`: lmms-eval `lmms_eval/tasks/vqav2/utils.py` (since 28ea9a1, 2025-08-11): the
  same two steps on both sides always, unanimous or not.
- `evalai_normalize`: `EvalAIAnswerProcessor` of LLaVA `llava/eval/m4c_evaluator.py` (from MMF): lower-case,
  drop ',' and '?', "'s" -> " 's", then the punctuation and digit/article steps (its digit-comma test is
  `(?<=\\d)(,)+(?=\\d)`). LLaVA's `scripts/convert_vqav2_for_submission.py` passes every VQAv2 answer through it.
- `textvqa_accuracy`: `TextVQAAccuracyEvaluator` of the same file (MMF's, written by TextVQA's authors):
  the processor on the prediction and on every answer; the prediction's soft score, else 0.
- `anls`: the Robust Reading Competition script (DocVQA / InfographicVQA `evaluate_method`, as in Qwen-VL
  `eval_mm/infographicsvqa_eval.py`; lmms-eval `api/metrics.py anls` and the reference's `anls_compute` agree):
  strip, lower-case and collapse spaces before the edit distance, but divide by the length of the *raw*
  strings; a similarity of exactly `threshold` is kept.

Multiple choice (`extract_choice(prediction, options, rule)`; rules in `CHOICE_RULES`):
- "reference": MG-LLaVA / XTuner `multiple_choice_dataset.py`, `re.search(r'([A-D]+)', prediction)`.
- "vlmevalkit": VLMEvalKit `vlmeval/utils/matching_util.py` `can_infer` (e8e78f0, 2026): refusals -> "Z";
  the one option letter among the tokens, if it is within the last four; "(correct) answer is **X**";
  else the one option whose text is in the answer. Its ChatGPT fallback is not run (exact matching).
- "mmstar": MMStar-Benchmark/MMStar `eval/vlmeval/evaluate/mmstar.py`: the first character, or the one after
  "(", "option " or "the answer is ".
- "llava-sqa": LLaVA `llava/eval/eval_science_qa.py`; "llava-seed": LLaVA
  `scripts/convert_seed_for_submission.py` (the answer text must equal the letter).
- `circular_*`: MMBench CircularEval as in VLMEvalKit `vlmeval/dataset/utils/multiple_choice.py`: rows whose
  `index % 1_000_000` agree are the rotations of one question, which counts only if every rotation is right.

Video QA judges:
- `rule_judge`: our own rule-based judge (no official script; reported under its own name).
- `read_judge_reply` / `judge_summary_official`: Video-ChatGPT `quantitative_evaluation/
  evaluate_activitynet_qa.py` and Video-LLaVA `videollava/eval/video/eval_video_qa.py` (the file format the
  MG-LLaVA reference's `VIDEOQADataset` writes): the reply is `ast.literal_eval`-ed and saved as JSON; a reply
  that cannot be read is asked again until every question has a verdict; every verdict counts in the mean
  score, one without a usable `score` adds 0 and is neither yes nor no; accuracy = yes / (yes + no), with
  "yes" tested (as a substring) before "no".
- `read_judge_reply_lmms_eval` / `judge_summary_lmms_eval`: lmms-eval `lmms_eval/tasks/activitynetqa/utils.py`:
  the reply's first `{...}` is read; any failure (request, reading, keys) counts as "no" with score 0.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# -- VQA normalisation (vqaEval.py / EvalAIAnswerProcessor share these tables) ---------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# `(?!<=\d)` is a look-ahead (a typo for a look-behind in the original), so this removes every period
# that is not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP_VQAEVAL = re.compile(r"(\d)(,)(\d)")  # vqaEval.py
_COMMA_STRIP_EVALAI = re.compile(r"(?<=\d)(,)+(?=\d)")  # EvalAIAnswerProcessor (LLaVA, MMF, lmms-eval)
# Every script calls `periodStrip.sub("", text, re.UNICODE)`: the flag lands in `count`, so at most 32
# periods are removed.
_PERIOD_COUNT = int(re.UNICODE)


def _process_punctuation(text: str, comma_strip: re.Pattern[str]) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_strip.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_punctuation(text: str) -> str:
    """vqaEval.py `processPunctuation`: each mark is deleted when it touches a space (or the text has a
    digit,digit comma anywhere), else replaced by a space; then periods not followed by a digit go."""
    return _process_punctuation(text, _COMMA_STRIP_VQAEVAL)


def process_digit_article(text: str) -> str:
    """vqaEval.py `processDigitArticle`: lower-case, number words -> digits, drop a/an/the, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    """Newlines and tabs to spaces, then strip (every VQA script does this to both sides first)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the n subsets that leave one answer out of `min(1, matches / 3)`. The scripts leave out one
    answer *record* (VQA records differ by `answer_id`), i.e. one position, which is what this does."""
    accs = []
    for left_out in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != left_out and a == prediction)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def _need_answers(answers: Sequence[str], name: str) -> list[str]:
    if not answers:
        raise ValueError(f"{name} needs at least one ground-truth answer")
    return list(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy (vqaEval.py master) of one prediction against the human answers (10 in VQA;
    with n answers the leave-one-out mean runs over n subsets). In [0, 1]."""
    gts = [_clean(a) for a in _need_answers(answers, "vqa_accuracy")]
    pred = _clean(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    return _leave_one_out(pred, gts)


def lmms_eval_normalize(text: str) -> str:
    """lmms-eval's VQAv2 normalisation: clean, then the EvalAI processor's `process_punctuation` and
    `process_digit_article` (no lower-casing or ',' / '?' removal before them, unlike the whole processor)."""
    return process_digit_article(_process_punctuation(_clean(text), _COMMA_STRIP_EVALAI))


def vqa_accuracy_lmms_eval(prediction: str, answers: Sequence[str]) -> float:
    """lmms-eval's VQAv2 accuracy: `lmms_eval_normalize` on the prediction and on every answer, whether or
    not the answers agree; then the same leave-one-out mean."""
    gts = [lmms_eval_normalize(a) for a in _need_answers(answers, "vqa_accuracy_lmms_eval")]
    return _leave_one_out(lmms_eval_normalize(prediction), gts)


def evalai_normalize(text: str) -> str:
    """EvalAIAnswerProcessor (LLaVA `m4c_evaluator.py`): lower-case, drop ',' and '?', "'s" -> " 's", then
    the punctuation and digit/article steps (with its own digit-comma rule)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digit_article(_process_punctuation(_clean(text), _COMMA_STRIP_EVALAI))


def vqa_accuracy_llava(prediction: str, answers: Sequence[str]) -> float:
    """LLaVA's VQAv2 numbers: the prediction through the EvalAI processor (as into the upload file), then the
    official accuracy. Unanimous answers are then compared with the processed prediction."""
    return vqa_accuracy(evalai_normalize(prediction), answers)


def textvqa_answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """M4C `_compute_answer_scores`: the soft score of every distinct (normalised) human answer."""
    gts = [evalai_normalize(a) for a in answers]
    return {unique: _leave_one_out(unique, gts) for unique in set(gts)}


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """M4C TextVQAAccuracyEvaluator: the normalised prediction's soft score, else 0. M4C asserts exactly 10
    answers; with n answers the same leave-one-out mean runs over n (as lmms-eval's TextVQA does)."""
    scores = textvqa_answer_scores(_need_answers(answers, "textvqa_accuracy"))
    return scores.get(evalai_normalize(prediction), 0.0)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the EvalAI-normalised prediction equals any normalised answer (M4C's STVQA accuracy)."""
    gts = {evalai_normalize(a) for a in _need_answers(answers, "exact_match")}
    return float(evalai_normalize(prediction) in gts)


# -- ANLS ---------------------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; all cost 1)."""
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        new = [j]
        for i, ca in enumerate(a, 1):
            new.append(row[i - 1] if ca == cb else 1 + min(row[i - 1], row[i], new[-1]))
        row = new
    return row[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction: max over answers of 1 - NL, set to 0 below `threshold` (RRC script)."""
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in _need_answers(answers, "anls"):
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    result = 1 - min(values)
    return 0.0 if result < threshold else result


# -- multiple choice ----------------------------------------------------------------------------------------
_REFERENCE_CHOICE = re.compile(r"([A-D]+)")


def choice_reference(prediction: str, options: Mapping[str, str]) -> str | None:
    """MG-LLaVA/XTuner: the first run of capital A-D anywhere, even inside a word ("Apple" -> "A"), possibly
    several letters ("AB", never equal to an answer), never E or later."""
    match = _REFERENCE_CHOICE.search(prediction)
    return match.group(1) if match else None


_VLMEVAL_SPLIT_CHARS = ".()[],:;!*#{}"
_VLMEVAL_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_VLMEVAL_VERBOSE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _can_infer_option(answer: str, letters: list[str]) -> str | None:
    """VLMEvalKit `can_infer_option` (its VERBOSE-only "A might be a quantifier" give-up is off by default)."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in _VLMEVAL_REFUSALS):
        return "Z"
    text = answer
    for ch in _VLMEVAL_SPLIT_CHARS:
        text = text.replace(ch, " ")
    splits = text.split()
    found = [letter for letter in letters if letter in splits]
    if len(found) == 1:
        if splits.index(found[0]) > len(splits) - 5:  # the first occurrence, among the last four tokens
            return found[0]
    elif not found and "Z" in splits:
        return "Z"
    match = _VLMEVAL_VERBOSE.search(answer)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    return None


def _can_infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit `can_infer_text`: the one option whose (lower-cased) text is in the answer, for answers no
    longer than twice the options' total length."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    found = [letter for letter, text in options.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def choice_vlmevalkit(prediction: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit `can_infer` (exact matching): a letter of `options`, "Z" (a refusal, or a lone "Z"), or None."""
    answer = str(prediction)
    return _can_infer_option(answer, list(options)) or _can_infer_text(answer, options)


def choice_mmstar(prediction: str, options: Mapping[str, str]) -> str | None:
    """MMStar's rule. The script tests `answer == p[0]`, or `p[1]` after "(", `p[7]` after "option ", `p[14]`
    after "the answer is ", with p the lower-cased, stripped prediction; for option letters (never "(",
    "o" or "t") that is the letter returned here, upper-cased. An empty prediction is wrong (None)."""
    p = prediction.lower().strip().replace("\n", " ")
    for prefix in ("(", "option ", "the answer is "):
        if p.startswith(prefix):
            return p[len(prefix)].upper() if len(p) > len(prefix) else None
    return p[0].upper() if p else None


_LLAVA_SQA_LETTERS = "ABCDE"  # eval_science_qa.py `--options` default
_LLAVA_SQA_PATTERN = re.compile(r"The answer is ([A-Z]).")


def choice_llava_sqa(prediction: str, options: Mapping[str, str]) -> str | None:
    """LLaVA's ScienceQA parse (its `parsed_ans`): the whole answer is a letter A-E; or "X. ..." with X in
    A-E; or exactly one match of `The answer is ([A-Z]).` (any character after the letter, so a bare trailing
    letter is missed). A parsed letter beyond the question's options is returned as parsed, as LLaVA records
    it; it is wrong (`get_pred_idx` -> -1) because it never equals the answer."""
    letters = list(_LLAVA_SQA_LETTERS)
    if prediction in letters:
        return prediction
    if len(prediction) >= 3 and prediction[0] in letters and prediction[1:3] == ". ":
        return prediction[0]
    found = _LLAVA_SQA_PATTERN.findall(prediction)
    return found[0] if len(found) == 1 else None


def choice_llava_seed(prediction: str, options: Mapping[str, str]) -> str | None:
    """LLaVA's SEED-Bench scoring: right only when the answer text *is* the letter (`row['text'] == answer`)."""
    return prediction if prediction in options else None


@dataclass(frozen=True)
class ChoiceRule:
    extract: Callable[[str, Mapping[str, str]], str | None]
    description: str


CHOICE_RULES: dict[str, ChoiceRule] = {
    "reference": ChoiceRule(
        choice_reference,
        "first run of capital A-D anywhere in the answer, re.search(r'([A-D]+)') "
        "(MG-LLaVA/XTuner multiple_choice_dataset.py)",
    ),
    "vlmevalkit": ChoiceRule(
        choice_vlmevalkit,
        "VLMEvalKit can_infer, exact matching: refusal -> Z; the one option letter among the tokens, if within "
        "the last four; '(correct) answer is **X**'; else the one option whose text is in the answer "
        "(vlmeval/utils/matching_util.py)",
    ),
    "mmstar": ChoiceRule(
        choice_mmstar,
        "MMStar: first character, or the one after '(', 'option ' or 'the answer is ' "
        "(MMStar eval/vlmeval/evaluate/mmstar.py)",
    ),
    "llava-sqa": ChoiceRule(
        choice_llava_sqa,
        "LLaVA ScienceQA: the answer is a letter A-E, or starts 'X. ', or has one 'The answer is X.' "
        "(llava/eval/eval_science_qa.py)",
    ),
    "llava-seed": ChoiceRule(
        choice_llava_seed,
        "LLaVA SEED-Bench: the answer text equals the letter (scripts/convert_seed_for_submission.py)",
    ),
}


def extract_choice(prediction: str, options: Mapping[str, str], rule: str = "reference") -> str | None:
    """The option letter a free-text answer picks under `rule` (see CHOICE_RULES), or None (wrong).

    `options` maps letters to option texts. "reference" can return more than one letter ("AB" from "AB
    testing"); "vlmevalkit" can return "Z" (a refusal); both then never equal the answer.
    """
    if rule not in CHOICE_RULES:
        raise ValueError(f"unknown choice rule {rule!r}; available: {', '.join(CHOICE_RULES)}")
    return CHOICE_RULES[rule].extract(prediction, options)


CIRCULAR_BASE = 1_000_000


def circular_key(index: int) -> int:
    """The question a (possibly rotated) MMBench row belongs to: `index % 1_000_000`."""
    return int(index) % CIRCULAR_BASE


def circular_groups(indices: Iterable[int]) -> dict[int, list[int]]:
    """Row indices grouped by question, in first-seen order."""
    groups: dict[int, list[int]] = {}
    for index in indices:
        groups.setdefault(circular_key(index), []).append(int(index))
    return groups


def circular_correct(hits: Iterable[bool]) -> bool:
    """CircularEval: a question counts only when every one of its rotations was answered right."""
    hits = list(hits)
    if not hits:
        raise ValueError("a circular group needs at least one row")
    return all(hits)


# -- video QA judges ----------------------------------------------------------------------------------------
RULE_JUDGE = "rule_contains_v1"
RULE_JUDGE_DESCRIPTION = (
    "rule_contains_v1: both texts EvalAI-normalised; right when the answer's words appear as a contiguous "
    "run of the prediction's words (so 'a man is cooking' answers 'cooking')"
)


def rule_judge(prediction: str, answer: str) -> bool:
    """Our rule-based video QA judge (see RULE_JUDGE_DESCRIPTION); empty answers are never right."""
    gt = evalai_normalize(answer).split()
    pred = evalai_normalize(prediction).split()
    if not gt:
        return False
    return any(pred[i : i + len(gt)] == gt for i in range(len(pred) - len(gt) + 1))


class JudgeReplyError(ValueError):
    """A judge reply the official scripts cannot read (and would ask for again)."""


_LITERAL_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)
# what reading a verdict can raise in the scripts' summaries: missing keys, a non-dict, int("high"), a pred
# without .lower(), a score of 1e999
_VERDICT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError)


def read_judge_reply(text: str) -> Any:
    """The official reading of a reply: `ast.literal_eval` of the whole text, saved to and read back from a
    JSON file. Raises JudgeReplyError when either fails (the scripts then ask again)."""
    try:
        value = ast.literal_eval(text)
    except _LITERAL_ERRORS as err:
        raise JudgeReplyError(f"judge reply is not a Python literal: {text[:200]!r}") from err
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise JudgeReplyError(f"judge reply cannot be saved as JSON: {text[:200]!r}") from err


_MISSING = object()


def _official_verdict(text: str | None) -> Any:
    if text is None:
        return _MISSING
    try:
        return read_judge_reply(text)
    except JudgeReplyError:
        return _MISSING


def judge_summary_official(replies: Sequence[str | None]) -> dict[str, Any]:
    """Video-ChatGPT / Video-LLaVA totals over one reply per question (None: no reply yet).

    Every question must have a readable reply, else `complete` is False and there is no score (the scripts
    keep asking). Every verdict counts in the mean score; one whose `score` is not `int()`-able adds nothing
    and, like one whose `pred` is not text, is neither yes nor no (`unusable`). accuracy = yes / (yes + no),
    "yes" tested as a substring before "no"; None when there is neither.
    """
    yes = no = total = unusable = count = missing = 0
    for text in replies:
        verdict = _official_verdict(text)
        if verdict is _MISSING:
            missing += 1
            continue
        count += 1
        try:
            total += int(verdict["score"])  # added before 'pred' is read, as in eval_video_qa.py
            pred = verdict["pred"].lower()
            if "yes" in pred:
                yes += 1
            elif "no" in pred:
                no += 1
        except _VERDICT_ERRORS:
            unusable += 1
    complete = missing == 0
    return {
        "accuracy": yes / (yes + no) if complete and yes + no else None,
        "average_score": total / count if complete and count else None,
        "yes": yes,
        "no": no,
        "judged": count,
        "unusable": unusable,
        "missing": missing,
        "complete": complete,
    }


def read_judge_reply_lmms_eval(text: str) -> tuple[Any, int]:
    """lmms-eval's reading: the text between the first '{' and the next '}', `ast.literal_eval`-ed, then
    (pred, int(score)) with pred set to "yes"/"no" when it contains them. JudgeReplyError on any failure."""
    try:
        verdict = ast.literal_eval("{" + text.split("{")[1].split("}")[0] + "}")
        score = int(verdict["score"])
        pred = verdict["pred"]
        low = pred.lower()
    except (*_LITERAL_ERRORS, *_VERDICT_ERRORS) as err:
        raise JudgeReplyError(f"judge reply not readable by lmms-eval's rule: {text[:200]!r}") from err
    return ("yes" if "yes" in low else "no" if "no" in low else pred), score


def judge_summary_lmms_eval(replies: Sequence[str | None]) -> dict[str, Any]:
    """lmms-eval's totals: a failed request or unreadable reply is ("no", 0); accuracy = yes / (yes + no)
    (0 when neither), mean score over every question."""
    yes = no = total = failures = 0
    for text in replies:
        try:
            if text is None:
                raise JudgeReplyError("no reply")
            pred, score = read_judge_reply_lmms_eval(text)
        except JudgeReplyError:
            pred, score = "no", 0
            failures += 1
        total += score
        if "yes" in pred.lower():
            yes += 1
        elif "no" in pred.lower():
            no += 1
    count = len(replies)
    return {
        "accuracy": (yes / (yes + no) if yes + no else 0.0) if count else None,
        "average_score": total / count if count else None,
        "yes": yes,
        "no": no,
        "judged": count,
        "counted_as_no": failures,
        "missing": 0,
        "complete": True,
    }
