"""Taggers, the OWLv2 detector and the online proposer, on tiny random models loaded from disk as users load
real ones. The detector must give what transformers' own OWLv2 forward + post-processing gives."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, Owlv2ForObjectDetection, Owlv2Processor

from mgllava.boxes import (
    Boxes,
    BoxProposer,
    ClipTagger,
    FixedTagger,
    Owlv2Detector,
    load_vocabulary,
)
from mgllava.boxes.files import BoxRecord
from mgllava.boxes.lookup import BoxLookup, ImageKey
from mgllava.boxes.proposer import content_key
from mgllava.boxes.select import FrameMap, prepare_boxes
from mgllava.boxes.taggers import RamPlusTagger, parse_ram_tags
from mgllava.data.processor import MGLlavaProcessor
from mgllava.utils.hashing import sha256_file

TAGS = ["cat", "dog", "traffic light"]


def image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def detector(box_models):
    return Owlv2Detector.from_pretrained(box_models["owlv2"], batch_size=4)


def reference_detect(folder, images, tags, threshold=0.2):
    """The reference's script: processor + forward + post_process with target size (max_wh, max_wh)."""
    model = Owlv2ForObjectDetection.from_pretrained(folder).eval()
    processor = Owlv2Processor.from_pretrained(folder)
    out = []
    for im in images:
        inputs = processor(text=[[f"a photo of {t}" for t in tags]], images=im, return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        side = max(im.size)
        result = processor.post_process_grounded_object_detection(
            outputs, threshold=threshold, target_sizes=[(side, side)]
        )[0]
        out.append((result["boxes"], result["scores"], [tags[i] for i in result["labels"].tolist()]))
    return out


def test_detector_equals_owlv2_forward_and_post_processing(box_models, detector):
    images = [image(80, 50, 1), image(50, 90, 2), image(64, 64, 3)]
    ours = detector.detect(images, [TAGS] * 3)
    for im, got, (boxes, scores, labels) in zip(
        images, ours, reference_detect(box_models["owlv2"], images, TAGS), strict=True
    ):
        assert got.frame == im.size and len(got) == len(boxes) > 0
        torch.testing.assert_close(got.xyxy, boxes, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got.scores, scores, atol=1e-5, rtol=1e-5)
        assert got.labels == labels


def test_detector_batches_equal_single_images_and_mixed_tag_sets(detector):
    images = [image(80, 50, 4), image(30, 70, 5), image(64, 64, 6)]
    tags = [TAGS, ["dog"], ["car", "cat", "bus", "tree"]]
    batched = detector.detect(images, tags)
    for im, t, got in zip(images, tags, batched, strict=True):
        alone = detector.detect([im], [t])[0]
        assert torch.equal(alone.xyxy, got.xyxy) and torch.equal(alone.scores, got.scores)
        assert alone.labels == got.labels and set(got.labels) <= set(t)


def test_query_embeddings_are_computed_once_per_tag(box_models):
    detector = Owlv2Detector.from_pretrained(box_models["owlv2"], cache_size=4)
    calls = []
    detector.model.owlv2.text_model.register_forward_hook(lambda *_: calls.append(1))
    detector.detect([image(40, 40)], [TAGS])
    detector.detect([image(50, 40), image(40, 50)], [TAGS, TAGS[:2]])
    assert len(calls) == 1  # one text-encoder call for the three tags, then the cache
    detector.detect([image(40, 40)], [["bus", "car"]])
    assert len(calls) == 2 and list(detector._queries) == [
        "cat",
        "dog",
        "bus",
        "car",
    ]  # LRU of 4: least recent out


def test_detector_in_bfloat16_runs_and_stays_close(box_models, detector):
    bf16 = Owlv2Detector.from_pretrained(box_models["owlv2"], dtype=torch.bfloat16)
    im = image(70, 40, 7)
    ours, theirs = bf16.detect([im], [TAGS])[0], detector.detect([im], [TAGS])[0]
    assert ours.xyxy.dtype == torch.float32 and ours.frame == (70, 40)
    assert abs(len(ours) - len(theirs)) <= 2  # scores near the threshold may move across it


def test_no_tags_means_no_boxes_and_empty_tag_lists_are_refused(detector):
    got = detector.detect([image(30, 20)], [[]])[0]
    assert len(got) == 0 and got.frame == (30, 20)
    with pytest.raises(ValueError, match="tag list is empty"):
        FixedTagger([" ", ""])
    with pytest.raises(ValueError, match="2 images but 1 tag lists"):
        detector.detect([image(10, 10), image(10, 10)], [TAGS])


def test_clip_tagger_equals_clip_zero_shot(box_models):
    tagger = ClipTagger.from_pretrained(box_models["clip"], vocabulary="coco80", threshold=0.0, top_k=3)
    model = CLIPModel.from_pretrained(box_models["clip"]).eval()
    processor = CLIPProcessor.from_pretrained(box_models["clip"])
    images = [image(80, 50, 8), image(40, 60, 9)]
    prompts = [f"a photo of a {t}." for t in tagger.vocabulary]
    with torch.no_grad():
        expected = model(**processor(text=prompts, images=images, padding=True, return_tensors="pt"))
    probs = expected.logits_per_image.softmax(-1)
    torch.testing.assert_close(tagger.probabilities(images), probs, atol=1e-5, rtol=1e-4)
    for row, tags in zip(probs, tagger.tags(images), strict=True):
        assert tags == [tagger.vocabulary[i] for i in row.topk(3).indices.tolist()]
    strict = ClipTagger(model, processor, tagger.vocabulary, threshold=float(probs.max()) + 1e-3)
    assert strict.tags(images) == [[], []]  # nothing recognised: an empty list, not an error


def test_shipped_vocabularies_and_files(tmp_path):
    coco, lvis = load_vocabulary("coco80"), load_vocabulary("lvis")
    assert len(coco) == 80 and coco[0] == "person" and "traffic light" in coco
    assert len(lvis) == 1203 and lvis[0] == "aerosol can" and "bat (animal)" in lvis
    path = tmp_path / "tags.txt"
    path.write_text("# my tags\ncat\n\nhot_dog\ncat\n")
    assert load_vocabulary(path) == ["cat", "hot dog"]
    with pytest.raises(FileNotFoundError, match="neither a packaged vocabulary"):
        load_vocabulary("imagenet")
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="has no tags"):
        load_vocabulary(path)


def test_ram_plus_says_how_to_install_and_parses_like_the_reference():
    if importlib.util.find_spec("ram") is None:  # not installed here: the error says how to get it
        with pytest.raises(ImportError, match="recognize-anything"):
            RamPlusTagger("ram_plus_swin_large_14m.pth")
    assert parse_ram_tags(" Cat | Dog | traffic light | cat") == ["cat", "dog", "traffic light"]


def test_processor_proposes_boxes_when_none_are_given(box_models, detector, tmp_path):
    proposer = BoxProposer(FixedTagger(TAGS), detector, cache_size=8)
    processor = MGLlavaProcessor.from_preset("tiny")
    processor.proposer = proposer
    side = processor.image_processor.high_res_size
    a, b = image(80, 50, 10), image(50, 80, 11)
    out = processor(text="<image><image><image>", images=[a, b, a.copy()])
    expected = [
        prepare_boxes(boxes, FrameMap.padded(*im.size, side))
        for im, boxes in zip([a, b], detector.detect([a, b], [TAGS] * 2), strict=True)
    ]
    assert out["object_counts"].tolist() == [len(expected[0]), len(expected[1]), len(expected[0])]
    assert torch.equal(out["object_boxes"][: len(expected[0])], expected[0].xyxy)
    assert proposer.stats == {"file": 0, "cache": 0, "detected": 2}  # the copy of `a` is the same picture
    processor(text="<image>", images=[a], boxes=None)
    assert proposer.stats["cache"] == 1
    mine = processor(text="<image><image>", images=[a, b], boxes=[[[1, 1, 20, 20]], []])  # given, and "none"
    assert mine["object_counts"].tolist() == [1, 1] and mine["object_boxes"][1].tolist() == [0, 0, 0, 0]
    assert "proposer" not in vars(processor.image_processor)  # no detector inside the image processor
    assert proposer.stats["detected"] == 2


def test_proposer_reads_a_box_file_by_content_hash(detector, tmp_path):
    path = tmp_path / "a.png"
    image(60, 40, 12).save(path)
    record = BoxRecord(id="a", sha256=sha256_file(path), boxes=Boxes([[1, 2, 30, 20]], labels=["cat"]))
    (tmp_path / "b.jsonl").write_text(json.dumps(record.to_json()) + "\n")
    proposer = BoxProposer(FixedTagger(TAGS), detector, BoxLookup.load(tmp_path / "b.jsonl"))
    rgb = Image.open(path).convert("RGB")
    assert content_key(ImageKey.of(str(path)), rgb) == record.sha256
    assert proposer([str(path)], [rgb])[0].xyxy.tolist() == [[1, 2, 30, 20]]
    assert proposer.stats == {"file": 1, "cache": 0, "detected": 0}


def test_a_processor_with_a_proposer_saves_and_loads_without_it(detector, tmp_path):
    processor = MGLlavaProcessor.from_preset("tiny")
    processor.proposer = BoxProposer(FixedTagger(TAGS), detector)
    batch = processor(text="<image>\nWhat is in the image?", images=image(90, 60, 13))
    rows = int((batch["input_ids"] == processor.image_token_id).sum())
    assert (
        rows == processor.num_image_tokens + int(batch["object_counts"][0]) > processor.num_image_tokens + 1
    )
    processor.save_pretrained(tmp_path / "p")
    assert "proposer" not in (tmp_path / "p" / "processor_config.json").read_text()
    loaded = MGLlavaProcessor.from_pretrained(tmp_path / "p")
    assert loaded.proposer is None and processor.proposer is not None
    assert loaded(text="<image>\nhi", images=image(90, 60, 13))["object_counts"].tolist() == [
        1
    ]  # zero-box fallback
