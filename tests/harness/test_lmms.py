"""The lmms-eval model `mgllava` (needs the `lmms` extra): through lmms-eval's own command line on a task
defined here (a `datasets` folder saved to disk, no hub), and through the calls lmms-eval makes, with requests
shaped as its `ConfigurableTask.construct_requests` builds them. Answers equal `Engine.chat`'s for the same
inputs; a box file's boxes reach the model; and lmms-eval's `openai_compatible` model answers the same
through `mgllava serve`."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mgllava.boxes import BoxLookup, ImageKey, MissingBoxes
from mgllava.inference import Engine, GenerationSettings

from ..formats import write_video
from ..harnessing import plain_scores

try:
    import lmms_eval
except ImportError:  # the tests below fail, saying what to install
    lmms_eval = None

pytestmark = pytest.mark.harness
SUFFIX = "\nAnswer the question using a single word or phrase."
QUESTIONS = ["What is this?", "Which colour is the circle?", "How many shapes?", "Where is the circle?"]
NEW_TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def lmms_eval_installed():
    if lmms_eval is None:
        pytest.fail(
            "lmms-eval is not installed: install the `lmms` extra (pip install -e '.[lmms]'), "
            "or deselect these tests with -m 'not harness'",
            pytrace=False,
        )


def scene(seed: int, size=(96, 64)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in torch.randint(0, 255, (3,), generator=g)))
    x, y = (int(v) for v in torch.randint(0, 40, (2,), generator=g))
    ImageDraw.Draw(image).ellipse((x, y, x + 30, y + 20), fill=(200, 30, 30))
    return image


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir)


def docs() -> list[dict]:
    sizes = [(96, 64), (64, 96), (80, 80), (120, 48)]
    return [
        {"question_id": f"q{i}", "question": q, "answer": "circle", "image": scene(i, sizes[i])}
        for i, q in enumerate(QUESTIONS)
    ]


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + SUFFIX


@pytest.fixture(scope="module")
def box_file(tmp_path_factory):
    """The reference's JSON form, keyed by question id: documents q0, q1 and q2, not q3."""
    records = [
        {
            "id": "q0",
            "boxes": [[4, 4, 40, 30], [50, 20, 90, 60]],
            "scores": [0.9, 0.5],
            "labels": ["circle", "sky"],
        },
        {"id": "q1", "boxes": [[10, 10, 50, 40]], "scores": [0.8], "labels": ["circle"]},
        {"id": "q2", "boxes": [[0, 0, 30, 30]], "scores": [0.7], "labels": ["ball"]},
    ]
    path = tmp_path_factory.mktemp("boxes") / "boxes.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A `datasets` folder saved to disk and an lmms-eval task over it, as `--include_path` reads tasks."""
    import datasets

    root = tmp_path_factory.mktemp("lmms_task")
    rows = docs()
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    table = {k: [r[k] for r in rows] for k in rows[0]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(
        root / "data"
    )
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_vqa.yaml").write_text(
        f"task: tiny_vqa\ndataset_path: {root / 'data'}\ndataset_kwargs:\n  load_from_disk: true\n"
        "test_split: test\noutput_type: generate_until\n"
        "doc_to_visual: !function tiny_utils.doc_to_visual\ndoc_to_text: !function tiny_utils.doc_to_text\n"
        f"doc_to_target: answer\ngeneration_kwargs:\n  max_new_tokens: {NEW_TOKENS}\n  temperature: 0\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "tiny_utils.py").write_text(
        f"SUFFIX = {SUFFIX!r}\n\n\ndef doc_to_visual(doc):\n    return [doc['image'].convert('RGB')]\n\n\n"
        "def doc_to_text(doc):\n    return doc['question'] + SUFFIX\n"
    )
    return tasks


def run_lmms_eval(tmp_path: Path, tasks: Path, model: str, model_args: str) -> list[dict]:
    """lmms-eval's command line in a fresh process; its logged samples (it exits 0 even on errors)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    argv = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", "tiny_vqa",
            "--include_path", str(tasks), "--batch_size", "3", "--output_path", str(tmp_path / "out"),
            "--log_samples", "--verbosity", "WARNING"]  # fmt: skip
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    found = sorted((tmp_path / "out").rglob("*_samples_tiny_vqa.jsonl"))
    assert found, f"lmms-eval wrote no samples:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return sorted((json.loads(line) for line in found[0].read_text().splitlines()), key=lambda r: r["doc_id"])


def raw_answer(engine, doc, boxes, max_new_tokens=NEW_TOKENS) -> str:
    """`Engine.chat` on the same document (one user turn, the image first, greedy), decoded unstripped."""
    messages = [{"role": "user", "content": "<image>\n" + doc_to_text(doc)}]
    result = engine.chat(messages, images=[doc["image"]], boxes=[boxes],
                         settings=GenerationSettings(max_new_tokens=max_new_tokens))  # fmt: skip
    return engine.processor.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def expected_answer(engine, doc, boxes, max_new_tokens=NEW_TOKENS, until=()):
    """The raw answer cut at the stop strings, then stripped (as the harness does)."""
    text = raw_answer(engine, doc, boxes, max_new_tokens)
    for stop in until:
        text = text.split(stop, 1)[0]
    return text.strip()


def file_boxes(box_file, doc):
    return BoxLookup.load(box_file).image(ImageKey((doc["question_id"],)))


def test_lmms_eval_command_line_runs_mgllava_with_a_box_file(model_dir, engine, task_dir, box_file, tmp_path):
    report = tmp_path / "boxes_used.jsonl"
    args = (f"pretrained={model_dir},device=cpu,box_file={box_file},box_id_field=question_id,"
            f"max_missing_boxes=0.25,box_report={report}")  # fmt: skip
    samples = run_lmms_eval(tmp_path, task_dir, "mgllava", args)
    assert [s["doc_id"] for s in samples] == [0, 1, 2, 3]
    # lmms-eval cuts generate_until answers at "\n\n" when a task's generation_kwargs give no `until`
    expected = [expected_answer(engine, doc, file_boxes(box_file, doc), until=("\n\n",)) for doc in docs()]
    assert [s["filtered_resps"] for s in samples] == expected
    assert len({*expected}) == 4 and all(expected)  # distinct, non-empty answers: the comparison can fail
    used = {r["doc_id"]: r["images"] for r in map(json.loads, report.read_text().splitlines())}
    assert [used[i][0]["source"] for i in range(4)] == ["box_file", "box_file", "box_file", "missing"]
    # the file's boxes as the model used them: mapped into its 768 px frame and back (a fraction of a pixel)
    flat = [v for box in used[0][0]["boxes"] for v in box]
    assert flat == pytest.approx([4, 4, 40, 30, 50, 20, 90, 60], abs=0.5) and used[0][0]["labels"] == [
        "circle",
        "sky",
    ]
    assert used[1][0]["tags"] == ["circle"] and used[3][0]["boxes"] == []


def test_lmms_eval_openai_compatible_model_through_mgllava_serve(engine, task_dir, tmp_path):
    from mgllava.serve import ServerSettings, create_app
    from mgllava.serve.background import serve_in_thread

    with serve_in_thread(create_app(engine, ServerSettings(model_name="tiny"))) as base:
        args = f"model=tiny,base_url={base}/v1,api_key=unused,num_concurrent=2,max_retries=1"
        samples = run_lmms_eval(tmp_path, task_dir, "openai_compatible", args)
    assert [s["filtered_resps"] for s in samples] == [expected_answer(engine, doc, None) for doc in docs()]


# -- the calls lmms-eval makes ---------------------------------------------------------------------------------
def instance(kind, args, doc_id, idx=0):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=idx,
                    metadata={"task": "t", "doc_id": doc_id, "repeats": 1})  # fmt: skip


def make_lm(model_dir, tmp_path, **model_args):
    from mgllava.harness.lmms import MGLlavaLmms

    lm = MGLlavaLmms(pretrained=model_dir, device="cpu", **model_args)
    lm.task_dict = {"t": {"test": docs()}}
    return lm


def test_mgllava_is_registered_through_the_entry_point():
    from lmms_eval.models import get_model

    from mgllava.harness.lmms import MGLlavaLmms

    points = {p.name: p.value for p in importlib.metadata.entry_points(group="lmms_eval.models")}
    assert points.get("mgllava") == "mgllava.harness.lmms_plugin:manifest", (
        "mgllava's lmms_eval.models entry point is not installed: reinstall mgllava (pip install -e .)"
    )
    assert get_model("mgllava") is MGLlavaLmms


def test_generate_until_batches_settings_and_cuts_at_until(model_dir, engine, box_file, tmp_path):
    lm = make_lm(model_dir, tmp_path, batch_size=3, box_file=str(box_file), box_id_field="question_id",
                 max_missing_boxes=0.25, box_report=str(tmp_path / "report.jsonl"))  # fmt: skip
    kwargs = [{"max_new_tokens": 6}, {"max_new_tokens": 9, "until": [" "]}, {"max_new_tokens": 6},
              {"max_new_tokens": 9, "until": [" "], "temperature": 0, "top_p": 0}]  # fmt: skip
    requests = [instance("generate_until", (doc_to_text(d), kwargs[i], doc_to_visual, i, "t", "test"), i)
                for i, d in enumerate(docs())]  # fmt: skip
    answers = lm.generate_until(requests)
    expected = [expected_answer(engine, d, file_boxes(box_file, d), kwargs[i]["max_new_tokens"], kwargs[i].get("until", ()))
                for i, d in enumerate(docs())]  # fmt: skip
    assert answers == expected and answers[0] and answers[2]
    raw = raw_answer(engine, docs()[1], file_boxes(box_file, docs()[1]), 9)
    assert " " in raw and answers[1] == raw.split(" ", 1)[0].strip()  # the stop string cut the raw text
    lines = (tmp_path / "report.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["doc_id"] for line in lines) == [0, 1, 2, 3]


def test_loglikelihood_is_the_mean_loss_of_the_continuation_with_the_image(
    model_dir, engine, box_file, tmp_path
):
    lm = make_lm(model_dir, tmp_path, batch_size=4, box_file=str(box_file), box_id_field="question_id",
                 max_missing_boxes=0.25)  # fmt: skip
    choices = [" circle", " square", " two"]
    requests, cases = [], []
    for doc_id, doc in enumerate(docs()[:3]):
        for k, choice in enumerate(choices):  # as a multiple_choice task builds them, target_delimiter " "
            requests.append(
                instance(
                    "loglikelihood", (doc_to_text(doc), choice, doc_to_visual, doc_id, "t", "test"), doc_id, k
                )
            )
            cases.append((doc, choice))
    scores = lm.loglikelihood(requests)
    tokenizer = engine.processor.tokenizer
    for (nll, greedy), (doc, choice) in zip(scores, cases, strict=True):
        continuation = tokenizer.encode(choice, add_special_tokens=False)
        messages = [{"role": "user", "content": "<image>\n" + doc_to_text(doc)}]
        logprob, is_greedy = plain_scores(
            engine, messages, continuation, [doc["image"]], [file_boxes(box_file, doc)]
        )
        assert nll == pytest.approx(-logprob / len(continuation), abs=1e-4) and greedy == is_greedy
    # a target given as a function of the document, as doc_to_target may be
    request = instance(
        "loglikelihood",
        (doc_to_text(docs()[0]), lambda d: " " + d["answer"], doc_to_visual, 0, "t", "test"),
        0,
    )
    assert lm.loglikelihood([request])[0] == pytest.approx(scores[0])


def test_a_video_document_with_per_frame_boxes_from_the_box_file(model_dir, engine, tmp_path):
    video = str(write_video(tmp_path / "clip.mp4"))
    frames = [{"boxes": [[2, 2, 20 + k, 20]], "scores": [0.9], "labels": ["blob"]} for k in range(8)]
    box_file = tmp_path / "video_boxes.json"  # the reference's video record, keyed by the file's stem
    box_file.write_text(json.dumps([{"video": "clip.mp4", "frames": frames}]))
    lm = make_lm(model_dir, tmp_path, box_file=str(box_file), box_id_field="question_id",
                 box_report=str(tmp_path / "report.jsonl"))  # fmt: skip
    lm.task_dict = {"t": {"test": [{"question_id": "v0", "video": video}]}}
    request = instance(
        "generate_until", ("What happens?", {"max_new_tokens": 4}, lambda d: [d["video"]], 0, "t", "test"), 0
    )
    (answer,) = lm.generate_until([request])
    expected = engine.chat([{"role": "user", "content": "<video>\nWhat happens?"}], images=[], video=video,
                           video_boxes=BoxLookup.load(box_file).video(path=video),
                           settings=GenerationSettings(max_new_tokens=4))  # fmt: skip
    assert answer == expected.text and answer
    (line,) = map(json.loads, (tmp_path / "report.jsonl").read_text().splitlines())
    assert line["images"] == [] and [f["source"] for f in line["video"]] == ["box_file"] * 8
    assert [f["boxes"][0][2] for f in line["video"]] == pytest.approx([20 + k for k in range(8)], abs=0.5)


def test_requests_that_cannot_be_answered_are_clear_errors(model_dir, box_file, tmp_path):
    generate = [instance("generate_until", (doc_to_text(d), {"max_new_tokens": 2}, doc_to_visual, i, "t", "test"), i)
                for i, d in enumerate(docs())]  # fmt: skip
    strict = make_lm(model_dir, tmp_path, box_file=str(box_file), box_id_field="question_id",
                     box_report=str(tmp_path / "strict.jsonl"))  # fmt: skip
    with pytest.raises(MissingBoxes, match=r"1 of 4 lmms-eval images \(25.0%\) have no boxes.*id 'q3'"):
        strict.generate_until(generate)
    assert (tmp_path / "strict.jsonl").read_text() == ""  # refused before anything was answered
    wrong_field = make_lm(model_dir, tmp_path, box_file=str(box_file), box_id_field="qid")
    with pytest.raises(ValueError, match="box_id_field 'qid' is not a field of the document"):
        wrong_field.generate_until(generate[:1])
    lm = make_lm(model_dir, tmp_path)
    beams = instance("generate_until", ("Q?", {"num_beams": 3}, doc_to_visual, 2, "t", "test"), 2)
    with pytest.raises(ValueError, match=r"task 't', split 'test', document 2: gen_kwargs num_beams=3"):
        lm.generate_until([beams])
    too_many = instance("generate_until", ("<image> <image> Q?", {}, doc_to_visual, 0, "t", "test"), 0)
    with pytest.raises(ValueError, match=r"document 0: .*2 <image> tags but 1 image"):
        lm.generate_until([too_many])
    with pytest.raises(ValueError, match="acc_mutual_info"):
        lm.loglikelihood([instance("loglikelihood", ("", " circle"), 0)])
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        lm.generate_until_multi_round([])
    with pytest.raises(ValueError, match="'auto' is not supported"):
        make_lm(model_dir, tmp_path, batch_size="auto")
    with pytest.raises(ValueError, match="give box_file too"):
        make_lm(model_dir, tmp_path, box_id_field="question_id")
    with pytest.raises(ValueError, match="max_batch_size"):
        make_lm(model_dir, tmp_path, max_batch_size=16)
