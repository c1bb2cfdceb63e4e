"""Scorers on test vectors worked out by hand from the official scripts' rules (docs/scoring.md).

Every expected number below was computed from the rule written in the comment beside it (the script's file
is named in mgllava.eval.metrics), not by running our code. VQA arithmetic: with answers a_1..a_n and the
prediction p (both normalised as the rule says), the score is the mean over i of min(1, #{j != i: a_j == p} / 3).
"""

import pytest

from mgllava.eval.metrics import (
    anls,
    circular_correct,
    circular_groups,
    evalai_normalize,
    exact_match,
    extract_choice,
    judge_summary_lmms_eval,
    judge_summary_official,
    levenshtein,
    lmms_eval_normalize,
    process_digit_article,
    process_punctuation,
    read_judge_reply,
    read_judge_reply_lmms_eval,
    rule_judge,
    textvqa_accuracy,
    vqa_accuracy,
    vqa_accuracy_llava,
    vqa_accuracy_lmms_eval,
)
from mgllava.eval.scoring import upload_answer


# -- VQA normalisation (vqaEval.py) -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("yes, it is", "yes it is"),  # ', ' touches a space: the comma is deleted
        ("black/white", "black white"),  # '/' touches no space: replaced by a space
        ("1,000", "1000"),  # a digit,digit comma anywhere: every mark is deleted
        ("yes-no, 5,000", "yesno 5000"),  # ... so the hyphen is deleted too, not spaced
        ("1, 2", "1 2"),  # ', ' is no digit,digit comma: the comma is deleted because it touches a space
        ("2.5", "2.5"),  # a period before a digit stays
        ("3.5.", "3.5"),  # the last period is before no digit
        (".5", ".5"),
        ("e.g.", "eg"),  # every period not before a digit goes
        ("dog.", "dog"),
        ("10:30", "10:30"),  # ':' is not in the master list of marks
        ("don't", "don't"),  # nor is the apostrophe
        ("(hi)!", "hi"),  # '(' , ')' and '!' touch no space: each -> ' '; stripped here
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text).strip() == expected


def test_period_strip_stops_after_32_like_the_original():
    # periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in `count`: 40 - 32 = 8 periods stay
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Two dogs", "2 dogs"),  # lower-case, two -> 2, 'the' dropped
        ("an apple", "apple"),
        ("dont know", "don't know"),  # contraction table
        ("None", "0"),  # 'none' is a number word
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten
        ("Im here", "im here"),  # the table's key is 'Im', but words are lower-cased first: never matches
        ("a", ""),
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


# -- VQA accuracy: official (vqaEval.py master) -------------------------------------------------------------
def test_vqa_accuracy_issue_cases():
    # 7 x "a dog" + 3 x "dog" differ: both steps on both sides -> ten "dog"; p "the dog" -> "dog";
    # every subset of nine has 9 matches -> 1.0 (the old GT-punctuation-only rule gave (7*1 + 3*2/3)/10 = 0.9)
    assert vqa_accuracy("the dog", ["a dog"] * 7 + ["dog"] * 3) == 1.0
    # four "two" + two "2" + four "3" -> six "2"; leaving out a "2": 5 matches -> 1; a "3": 6 -> 1 -> 1.0
    # (the old rule kept "two": (2 * 1/3 + 8 * 2/3) / 10 = 0.6)
    assert vqa_accuracy("2", ["two"] * 4 + ["2"] * 2 + ["3"] * 4) == 1.0


def test_vqa_accuracy_unanimous_answers_are_compared_untouched():
    # ten identical answers: neither side is normalised (only newline/tab -> space and strip)
    assert vqa_accuracy("dog.", ["dog."] * 10) == 1.0  # "dog." == "dog."
    assert vqa_accuracy("dog", ["dog."] * 10) == 0.0  # "dog" != "dog."
    assert vqa_accuracy("Dog", ["dog"] * 10) == 0.0  # no lower-casing
    assert vqa_accuracy("the dog", ["dog"] * 10) == 0.0  # articles stay
    assert vqa_accuracy("two", ["2"] * 10) == 0.0  # number words stay
    assert vqa_accuracy("1,000", ["1000"] * 10) == 0.0  # the comma stays
    assert vqa_accuracy("dont", ["don't"] * 10) == 0.0  # no contraction table
    assert vqa_accuracy("  dog\n", ["dog"] * 10) == 1.0  # cleaned: "dog" == "dog"


def test_vqa_accuracy_differing_answers_are_normalised():
    # "dont" -> "don't"; answers: nine "don't" (the apostrophe is no mark) + "no":
    # leaving out a "don't": 8 matches -> 1; leaving out "no": 9 -> 1 -> 1.0
    assert vqa_accuracy("dont", ["don't"] * 9 + ["no"]) == 1.0
    # "1,000" -> "1000" (digit,digit comma); answers 5 x "1000" + 5 x "1,000" -> ten "1000" -> 1.0
    assert vqa_accuracy("1,000", ["1000"] * 5 + ["1,000"] * 5) == 1.0
    # "Coca Cola" x4 -> "coca cola", "coca-cola" x3 -> "coca cola", "coke" x3: p "coca cola" has 7 matches;
    # leaving out one of them: 6 -> 1; leaving out a "coke": 7 -> 1 -> 1.0
    answers = ["Coca Cola"] * 4 + ["coca-cola"] * 3 + ["coke"] * 3
    assert vqa_accuracy("Coca Cola", answers) == 1.0
    # p "coke": 3 matches; leaving out a "coke": 2 -> 2/3 (3 times); else 3 -> 1 (7 times): (2 + 7) / 10
    assert vqa_accuracy("coke", answers) == pytest.approx(0.9)


def test_vqa_accuracy_leave_one_out_average():
    answers = ["2"] * 3 + ["3"] * 7
    # p "two" -> "2": leaving out a "2": 2 matches -> 2/3 (3 times); a "3": 3 -> 1 (7 times): (2 + 7) / 10
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers) == 1.0  # 7 matches, at least 6 in every subset
    # one matching answer: 0 when it is left out, 1/3 otherwise: 9 * (1/3) / 10 = 0.3
    assert vqa_accuracy("2", ["2"] + ["x"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("cat", answers) == 0.0


def test_vqa_accuracy_with_fewer_than_ten_answers():
    # n = 3: leaving out "red" #1: 1 match -> 1/3; "red" #2: 1/3; "blue": 2 -> 2/3: (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert vqa_accuracy("red", ["red", "red", "blue"]) == pytest.approx(4 / 9)
    # n = 1: the only answer is always left out: 0 matches -> 0
    assert vqa_accuracy("red", ["red"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


# -- VQA accuracy: llava (EvalAI processor first) and lmms-eval (always normalised) ---------------------------
def test_vqa_accuracy_llava_processes_the_prediction_first():
    # EvalAI("The dog.") = "dog" (lower, period, article); unanimous "dog": "dog" == "dog" -> 1.0
    assert vqa_accuracy_llava("The dog.", ["dog"] * 10) == 1.0
    # EvalAI("two") = "2" == unanimous "2" -> 1.0 (official: "two" != "2" -> 0.0)
    assert vqa_accuracy_llava("two", ["2"] * 10) == 1.0
    # EvalAI("it's red") = "it 's red" ("'s" -> " 's") != unanimous "it's red" -> 0.0 (official: 1.0)
    assert vqa_accuracy_llava("it's red", ["it's red"] * 10) == 0.0
    assert vqa_accuracy("it's red", ["it's red"] * 10) == 1.0
    # differing answers: same as official on the processed prediction (six "2" of ten -> 1.0)
    assert vqa_accuracy_llava("2", ["two"] * 4 + ["2"] * 2 + ["3"] * 4) == 1.0


def test_vqa_accuracy_lmms_eval_normalises_always():
    assert vqa_accuracy_lmms_eval("The dog.", ["dog"] * 10) == 1.0  # "dog" == "dog"
    assert vqa_accuracy_lmms_eval("Dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy_lmms_eval("dont", ["don't"] * 10) == 1.0  # contraction table on the prediction
    assert vqa_accuracy_lmms_eval("it's red", ["it's red"] * 10) == 1.0  # no "'s" split (no word_tokenize)
    # its digit-comma test is (?<=\d)(,)+(?=\d): "1,,000" has one, so every mark goes -> "1000";
    # nine "1000" + "100": leaving out a "1000": 8 -> 1; "100": 9 -> 1 -> 1.0
    assert vqa_accuracy_lmms_eval("1,,000", ["1000"] * 9 + ["100"]) == 1.0
    # vqaEval's (\d)(,)(\d) does not match "1,,000": each ',' -> ' ' -> "1  000" -> "1 000" != "1000" -> 0.0
    assert vqa_accuracy("1,,000", ["1000"] * 9 + ["100"]) == 0.0
    assert lmms_eval_normalize("The  Two, dogs!") == "2 dogs"  # ', ' deleted; '!' -> ' '; the dropped


def test_vqav2_upload_answers_per_pipeline():
    assert upload_answer("official", "The Dog.") == "The Dog."  # the server normalises
    assert upload_answer("llava", "The Dog.") == "dog"  # EvalAI processor
    assert upload_answer("lmms-eval", "The Dog.") == "dog"  # period, lower-case, article
    assert upload_answer("llava", "It's red") == "it 's red"
    assert upload_answer("lmms-eval", "It's red") == "it's red"
    with pytest.raises(ValueError, match="unknown scoring pipeline"):
        upload_answer("vlmevalkit", "x")


# -- EvalAI processor / M4C TextVQA accuracy ----------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The poster shows a 10% discount.", "poster shows 10% discount"),  # LLaVA's own example
        ("It's red", "it 's red"),
        ("Two, maybe?", "2 maybe"),  # ',' and '?' removed first
        ("coca-cola", "coca cola"),
        ("3,000 people", "3000 people"),
    ],
)
def test_evalai_normalize(text, expected):
    assert evalai_normalize(text) == expected


def test_textvqa_accuracy_soft_scores():
    answers = ["Coca Cola"] * 4 + ["coca-cola"] * 3 + ["coke"] * 3  # -> 7 x "coca cola", 3 x "coke"
    assert textvqa_accuracy("COCA COLA", answers) == 1.0  # 7 matches: at least 6 in every subset
    # "coke": leaving out a "coke": 2 -> 2/3 (3 times); else 3 -> 1 (7 times): (2 + 7) / 10
    assert textvqa_accuracy("coke", answers) == pytest.approx(0.9)
    assert textvqa_accuracy("the coke", answers) == pytest.approx(0.9)  # article dropped
    assert textvqa_accuracy("pepsi", answers) == 0.0
    # both sides always processed, unanimous or not (unlike VQA's official rule)
    assert textvqa_accuracy("dog", ["Dog."] * 10) == 1.0
    # two answers, both "5" after processing: leaving out either: 1 match -> 1/3; mean 1/3
    assert textvqa_accuracy("5", ["5", "five"]) == pytest.approx(1 / 3)


def test_exact_match():
    assert exact_match("A Triangle.", ["triangle"]) == 1.0
    assert exact_match("circle", ["triangle", "square"]) == 0.0


# -- ANLS (RRC script) --------------------------------------------------------------------------------------
def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls_cases():
    assert anls("Denver Broncos", ["Denver Broncos", "Denver R. Broncos"]) == 1.0  # best answer wins
    assert anls("12/15/89", ["12/15/88"]) == pytest.approx(1 - 1 / 8)  # one substitution of 8
    assert anls("  Dear   Dr. Lobo ", ["dear dr. lobo"]) == 1.0  # case and spaces do not count
    assert anls("", [""]) == 1.0  # length 0: NL = 0
    assert anls("", ["abc"]) == 0.0  # NL = 3/3 -> 0
    # "dr.lobo" vs "dr. lobo": one insertion; denominator max(len("dr. lobo"), len("Dr.Lobo")) = 8
    assert anls("Dr.Lobo", ["dr. lobo"]) == pytest.approx(1 - 1 / 8)


def test_anls_threshold_keeps_exactly_one_half():
    assert anls("abcd", ["abxy"]) == 0.5  # NL = 2/4: 1 - NL = 0.5 is not below the threshold
    assert anls("abcd", ["axyz"]) == 0.0  # NL = 3/4
    assert anls("abcd", ["abxy"], threshold=0.6) == 0.0


def test_anls_divides_by_the_raw_lengths():
    # distance on "ab c" vs "abd c" is 1; the denominator is len("ab   c") = 6, not 5
    assert anls("ab   c", ["abd c"]) == pytest.approx(1 - 1 / 6)


# -- choice extraction --------------------------------------------------------------------------------------
OPTS = {"A": "banana", "B": "apple", "C": "cherry", "D": "grape"}  # option texts: 6 + 5 + 6 + 5 = 22 chars


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("A", "A"),
        ("The answer is B.", "B"),  # 'T' is no A-D
        ("Apple", "A"),  # the capital A of a word
        ("Cat", "C"),
        ("ABC", "ABC"),  # a run of letters, never equal to one answer letter
        ("I think (C)", "C"),
        ("E", None),  # only A-D, whatever the options
        ("no letter here", None),
    ],
)
def test_reference_choice_rule(prediction, expected):
    assert extract_choice(prediction, OPTS, "reference") == expected


@pytest.mark.parametrize(
    "prediction, options, expected",
    [
        ("B", OPTS, "B"),
        ("The answer is (B).", OPTS, "B"),  # tokens [The, answer, is, B]: B at index 3 > 4 - 5
        ("Apple", OPTS, "B"),  # no letter token; the only option text in "apple" (5 <= 2 * 22) is B's
        ("A or B", OPTS, None),  # two letters; no "answer is"; no option text
        ("A cat", {"A": "dog", "B": "cat"}, "A"),  # one letter token, index 0 > 2 - 5
        ("It is a cat", {"A": "dog", "B": "cat"}, "B"),  # 'a' is no letter; "cat" in the text (11 <= 12)
        # letter not among the last four tokens: [A, big, cat, sits, there]: index 0 > 5 - 5 fails;
        # the text (20 chars) is longer than 2 * (3 + 3): nothing
        ("A big cat sits there", {"A": "dog", "B": "cat"}, None),
        # 8 tokens, B at index 0 (not > 3); then the text rule (41 <= 44 chars) finds only "banana": A
        ("B is correct because the banana is yellow", OPTS, "A"),
        ("Cannot determine the answer from the picture.", OPTS, "Z"),  # a refusal
        ("Z", OPTS, "Z"),  # no option letter, a lone Z
        # three letters among the tokens; "correct answer is **C**" decides
        ("After thinking about options A and B, the correct answer is **C**.", OPTS, "C"),
        # the verbose pattern is case-insensitive with no word boundary: "answer is a" -> A
        ("The answer is apple", OPTS, "A"),
        ("Failed to obtain answer via API", OPTS, None),
        ("E", {**OPTS, "E": "fig"}, "E"),
    ],
)
def test_vlmevalkit_choice_rule(prediction, options, expected):
    assert extract_choice(prediction, options, "vlmevalkit") == expected


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        ("  b\n", "B"),  # lower-cased and stripped
        ("(c) cherry", "C"),  # the character after '('
        ("option d", "D"),  # p[7]
        ("The answer is A.", "A"),  # p[14]
        ("apple", "A"),  # the first character, even of a word
        ("Answer: B", "A"),  # 'a' of "answer": the script only knows the three prefixes
        ("(", None),  # p[1] does not exist: the script's except -> wrong
        ("", None),
    ],
)
def test_mmstar_choice_rule(prediction, expected):
    assert extract_choice(prediction, OPTS, "mmstar") == expected


SQA = {"A": "shark", "B": "whale", "C": "trout"}


@pytest.mark.parametrize(
    "prediction, options, expected",
    [
        ("B", SQA, "B"),
        ("B. whale", SQA, "B"),  # "X. " prefix
        ("The answer is C.", SQA, "C"),
        ("The answer is C", SQA, None),  # the pattern wants a character after the letter
        ("B.", SQA, None),  # not a bare letter, shorter than 3, no pattern
        ("b", SQA, None),  # case-sensitive
        ("D", SQA, "D"),  # beyond the 3 options: recorded as LLaVA's parsed_ans, wrong (get_pred_idx -1)
        ("C", {"A": "yes", "B": "no"}, "C"),
        ("The answer is Z.", SQA, "Z"),  # the pattern takes any capital
        ("The answer is A. The answer is B.", SQA, None),  # two matches
        ("The answer is A. No, the answer is B.", SQA, "A"),  # 'the' is not 'The': one match
        ("E", {**SQA, "D": "eel", "E": "cod"}, "E"),
    ],
)
def test_llava_sqa_choice_rule(prediction, options, expected):
    assert extract_choice(prediction, options, "llava-sqa") == expected


@pytest.mark.parametrize("prediction, expected", [("B", "B"), ("B.", None), (" B", None), ("b", None)])
def test_llava_seed_choice_rule(prediction, expected):
    assert extract_choice(prediction, OPTS, "llava-seed") == expected


def test_unknown_choice_rule():
    with pytest.raises(ValueError, match="unknown choice rule"):
        extract_choice("A", OPTS, "gpt")


def test_circular_groups_and_verdicts():
    groups = circular_groups([1, 1000001, 2, 2000001, 3000001, 1000002])
    assert groups == {1: [1, 1000001, 2000001, 3000001], 2: [2, 1000002]}
    assert circular_correct([True, True, True, True])
    assert not circular_correct([True, True, False, True])
    with pytest.raises(ValueError):
        circular_correct([])


# -- video judges -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("a man is cooking", "cooking", True),
        ("the man cooks", "cooking", False),
        ("two dogs", "2", True),
        ("The Dog", "dog", True),
        ("hotdog", "dog", False),
        ("anything", "", False),
    ],
)
def test_rule_judge(prediction, answer, expected):
    assert rule_judge(prediction, answer) is expected


def test_official_reading_of_a_reply():
    assert read_judge_reply("{'pred': 'yes', 'score': 4.8}") == {"pred": "yes", "score": 4.8}
    assert read_judge_reply(" {'pred': 'no', 'score': 2}\n") == {"pred": "no", "score": 2}
    assert read_judge_reply("(1, 2)") == [1, 2]  # saved as JSON and read back: a tuple becomes a list
    for unreadable in ("yes, 4", "Sure! {'pred': 'yes', 'score': 4}", "{'pred', 'score'}", ""):
        with pytest.raises(ValueError):  # not a literal, or (a set) not JSON: the scripts ask again
            read_judge_reply(unreadable)


def test_official_judge_counting():
    replies = [
        "{'pred': 'yes', 'score': 5}",  # yes, +5
        "{'pred': 'no', 'score': 1}",  # no, +1
        "{'pred': 'Yes.', 'score': 3}",  # 'yes' in 'yes.': yes, +3
        "{'pred': '?', 'score': 0}",  # neither, +0
        "{'pred': 'yes', 'score': 'high'}",  # int('high') fails: counted, adds nothing, neither
        "{'pred': 'yes', 'score': 4.8}",  # int(4.8) = 4: yes, +4
        "{'score': 2}",  # +2, then no 'pred': neither
        "{'pred': 'I do not know', 'score': 1}",  # 'no' in 'not'/'know': no, +1
        "None",  # a literal: counted, None['score'] fails
    ]
    summary = judge_summary_official(replies)
    # yes = 3, no = 2: accuracy 3/5; 9 verdicts, total 5+1+3+0+4+2+1 = 16: mean 16/9
    assert summary["yes"] == 3 and summary["no"] == 2 and summary["judged"] == 9
    assert summary["accuracy"] == pytest.approx(3 / 5)
    assert summary["average_score"] == pytest.approx(16 / 9)
    assert summary["unusable"] == 3 and summary["missing"] == 0 and summary["complete"]


def test_official_judge_gives_no_score_while_a_question_lacks_a_verdict():
    # an unreadable reply and a failed request are not dropped: the scripts ask until every question has a
    # verdict, so until then there is no score
    summary = judge_summary_official(["{'pred': 'yes', 'score': 5}", "I think yes", None])
    assert summary["accuracy"] is None and summary["average_score"] is None
    assert summary["missing"] == 2 and not summary["complete"] and summary["judged"] == 1


def test_lmms_eval_judge_counting():
    assert read_judge_reply_lmms_eval("Sure: {'pred': 'Yes', 'score': 4} hope this helps") == ("yes", 4)
    with pytest.raises(ValueError):
        read_judge_reply_lmms_eval("{'pred': 'yes'}")  # no score
    replies = [
        "{'pred': 'yes', 'score': 5}",  # yes, 5
        "Sure: {'pred': 'yes', 'score': 4} hope this helps",  # the first {...}: yes, 4
        "nonsense",  # no '{': ("no", 0)
        None,  # failed request: ("no", 0)
        "{'pred': 'maybe', 'score': 2}",  # neither, 2
    ]
    summary = judge_summary_lmms_eval(replies)
    # yes 2, no 2: 2/4; total 5+4+0+0+2 = 11 over 5 questions
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["average_score"] == pytest.approx(11 / 5)
    assert summary["counted_as_no"] == 2 and summary["judged"] == 5 and summary["complete"]
    # the official reading of the same replies: three questions without a verdict, no score
    assert judge_summary_official(replies)["missing"] == 3
