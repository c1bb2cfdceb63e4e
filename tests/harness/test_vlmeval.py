"""The VLMEvalKit adapter, called the way VLMEvalKit's inference loop (`vlmeval/inference.py`, `infer_data`)
calls its models, without installing VLMEvalKit: on MMBench with the reference's box file its answers equal
`mgllava eval`'s; other prompts and message forms equal the engine's answers."""

import base64
import io
import json
import math

import pytest
from PIL import Image

from mgllava.boxes import MissingBoxes
from mgllava.eval import EvalOptions, run_eval
from mgllava.eval.multiple_choice import PANDAS_NA
from mgllava.harness.vlmeval import REFERENCE_MCQ, MGLlavaVLMEval
from mgllava.inference import Engine, GenerationSettings

from .. import eval_formats as fmt

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir)


class MCQDataset:
    """What VLMEvalKit's `ImageMCQDataset` hands its models: `dataset_name`; rows as pandas reads the TSV (its
    NA strings become NaN, the index an int); an image field holding another row's index resolved to that
    row's image; `dump_image(line)` decoding the base64 image and re-saving it as `<index>.png`
    (`decode_base64_to_image_file`); and its own `build_prompt(line)`."""

    def __init__(self, name, rows, root):
        self.dataset_name = name
        self.root = root
        images = {row["index"]: row["image"] for row in rows}
        self.data = []
        for row in rows:
            line = {k: (math.nan if isinstance(v, str) and v in PANDAS_NA else v) for k, v in row.items()}
            line["index"] = int(row["index"])
            image = images[row["index"]]
            line["image"] = images[int(image)] if len(image) <= 64 else image
            self.data.append(line)

    def dump_image(self, line):
        path = self.root / f"{line['index']}.png"
        if not path.exists():
            Image.open(io.BytesIO(base64.b64decode(line["image"]))).save(path)
        return [str(path)]

    def build_prompt(self, line):
        options = {
            c: line[c]
            for c in "ABCD"
            if c in line and not (isinstance(line[c], float) and math.isnan(line[c]))
        }
        hint = line.get("hint")
        prompt = "" if isinstance(hint, float) else f"Hint: {hint}\n"
        prompt += f"Question: {line['question']}\nOptions:\n" + "".join(
            f"{k}. {v}\n" for k, v in options.items()
        )
        prompt += "Please select the correct answer from the options above. \n"
        return [
            *({"type": "image", "value": p} for p in self.dump_image(line)),
            {"type": "text", "value": prompt},
        ]


def infer_data(model, dataset):
    """VLMEvalKit's loop: custom prompt if the model asks for it, else the dataset's; one question at a time."""
    model.set_dump_image(dataset.dump_image)
    answers = {}
    for line in dataset.data:
        if hasattr(model, "use_custom_prompt") and model.use_custom_prompt(dataset.dataset_name):
            struct = model.build_prompt(line, dataset=dataset.dataset_name)
        else:
            struct = dataset.build_prompt(line)
        answers[line["index"]] = model.generate(message=struct, dataset=dataset.dataset_name)
    return answers


def reference_box_file(path):
    """The reference's JSON form, keyed by MMBench index: questions 0 (and its rotations), 1 and 2; not 6."""
    records = [
        {
            "id": "0",
            "boxes": [[2, 2, 20, 14], [22, 16, 38, 28]],
            "scores": [0.9, 0.6],
            "labels": ["cat", "dog"],
        },
        {"id": "1", "boxes": [[5, 5, 25, 25]], "scores": [0.7], "labels": ["box"]},
        {"id": "2", "boxes": [[0, 0, 39, 29]], "scores": [0.5], "labels": ["cow"]},
    ]
    path.write_text(json.dumps(records))
    return path


def test_vlmevalkit_loop_on_mmbench_equals_mgllava_eval(model_dir, tmp_path):
    boxes = reference_box_file(tmp_path / "mmbench_boxes.json")
    tsv = fmt.write_mmbench(tmp_path / "MMBench_DEV_EN.tsv", bad_rows=False)
    opts = EvalOptions(benchmark="mmbench_dev", data=str(tsv), out=str(tmp_path / "eval"), model=model_dir,
                       boxes=str(boxes), max_missing_boxes=0.5, max_new_tokens=NEW_TOKENS, device="cpu")  # fmt: skip
    run_eval(opts)
    ours = {
        int(r["key"]): r["prediction"]
        for r in map(json.loads, (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines())
    }
    (tmp_path / "images").mkdir()
    dataset = MCQDataset("MMBench_DEV_EN", fmt.mmbench_rows(), tmp_path / "images")
    model = MGLlavaVLMEval(model_dir, box_file=str(boxes), max_missing_boxes=2, max_new_tokens=NEW_TOKENS)
    answers = infer_data(model, dataset)
    assert "MMBench_DEV_EN" in REFERENCE_MCQ and model.use_custom_prompt("MMBench_DEV_EN")
    assert len(ours) == 8 and set(ours) < set(answers)  # eval leaves out the row whose answer is "E"
    assert {k: answers[k] for k in ours} == ours
    summary = model.box_summary()
    assert summary["found"] == {"id": 7} and summary["missing"] == 2  # rows 6 and 1000006 are not in the file
    assert model.last_boxes[0].source == "missing"  # the last row, 1000006
    model.generate(model.build_prompt(dataset.data[1], "MMBench_DEV_EN"), "MMBench_DEV_EN")  # index 1000000
    (used,) = model.last_boxes
    assert used.source == "box_file" and used.boxes.labels == ["cat", "dog"]


def test_other_datasets_use_their_own_prompt_and_answers_equal_the_engine(model_dir, engine, tmp_path):
    dataset = MCQDataset("MMBench_DEV_EN", fmt.mmbench_rows()[:2], tmp_path)
    model = MGLlavaVLMEval(model_dir, reference_prompts=False, max_new_tokens=NEW_TOKENS)
    assert not model.use_custom_prompt("MMBench_DEV_EN") and not MGLlavaVLMEval.use_custom_prompt(
        model, "MME"
    )
    answers = infer_data(model, dataset)
    for line in dataset.data:
        image, text = dataset.build_prompt(line)
        expected = engine.chat([{"role": "user", "content": "<image>\n" + text["value"]}], images=[image["value"]],
                               settings=GenerationSettings(max_new_tokens=NEW_TOKENS))  # fmt: skip
        assert answers[line["index"]] == expected.text
    with pytest.raises(ValueError, match="build_prompt is for"):
        model.build_prompt(dataset.data[0], "MMBench_DEV_EN")


def test_message_forms_interleaving_and_chat(model_dir, engine, tmp_path):
    model = MGLlavaVLMEval(model_dir, max_new_tokens=NEW_TOKENS)
    first, second = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(first)
    Image.new("RGB", (30, 40), (30, 30, 200)).save(second)

    def engine_answer(messages, images):
        return engine.chat(
            messages, images=images, settings=GenerationSettings(max_new_tokens=NEW_TOKENS)
        ).text

    assert model.generate("Hello there") == engine_answer([{"role": "user", "content": "Hello there"}], [])
    one = engine_answer([{"role": "user", "content": "<image>\nWhat is it?"}], [str(first)])
    assert model.generate([str(first), "What is it?"]) == one  # a path to an image file is an image
    assert model.generate({"type": "text", "value": str(tmp_path / "missing.png")}) == engine_answer(
        [{"role": "user", "content": str(tmp_path / "missing.png")}], []
    )
    interleaved = [{"type": "text", "value": "Compare"}, {"type": "image", "value": str(first)},
                   {"type": "text", "value": "with"}, {"type": "image", "value": str(second)}]  # fmt: skip
    two = engine_answer(
        [{"role": "user", "content": "Compare\n<image>\nwith\n<image>"}], [str(first), str(second)]
    )
    assert model.generate(interleaved) == two
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image", "value": str(first)}, {"type": "text", "value": "What?"}],
        },
        {"role": "assistant", "content": "A red box."},
        {
            "role": "user",
            "content": [{"type": "text", "value": "And this?"}, {"type": "image", "value": str(second)}],
        },
    ]
    expected = engine_answer([{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A red box."},
                              {"role": "user", "content": "And this?\n<image>"}], [str(first), str(second)])  # fmt: skip
    assert model.chat(conversation) == expected


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ([{"type": "video", "value": "clip.mp4"}], "type 'video' is not one of"),
        ([{"value": "no type"}], "expected a string or a"),
        ([], "non-empty list"),
        (3, "a string, a dict"),
        ([{"type": "image", "value": "/no/such/image.png"}], "image"),
    ],
)
def test_bad_messages_are_clear_errors(model_dir, message, error):
    model = MGLlavaVLMEval(model_dir, max_new_tokens=2)
    with pytest.raises(ValueError, match=error):
        model.generate(message)


def test_missing_boxes_refuse_without_a_detector_and_a_detector_fills_in(model_dir, box_models, tmp_path):
    boxes = reference_box_file(tmp_path / "boxes.json")
    dataset = MCQDataset("MMBench_DEV_EN", fmt.mmbench_rows()[-2:], tmp_path)  # rows 6 and 1000006
    strict = MGLlavaVLMEval(model_dir, box_file=str(boxes), max_new_tokens=2)
    with pytest.raises(MissingBoxes, match=r"1 images have no boxes in .*boxes.json \(allowed: 0\).*id '6'"):
        infer_data(strict, dataset)
    with pytest.raises(ValueError, match="set_dump_image"):
        MGLlavaVLMEval(model_dir).dump_image(dataset.data[0])
    detected = MGLlavaVLMEval(model_dir, box_file=str(boxes), detector=str(box_models["owlv2"]), tagger="clip",
                              tagger_model=str(box_models["clip"]), vocabulary="coco80", max_new_tokens=2)  # fmt: skip
    infer_data(detected, dataset)
    assert [b.source for b in detected.last_boxes] == ["proposer"]
    assert detected.box_summary()["missing"] == 2
