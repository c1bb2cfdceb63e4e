"""`mgllava boxes` end to end through the real `main(argv)`: LLaVA JSON, image folder and TSV inputs, bad
images recorded, resume after SIGKILL, two torchrun ranks equal to one process, reference JSON round trip."""

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgllava.boxes.files import BoxIndex
from mgllava.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD = [(80, 50), (50, 90), (64, 64), (120, 40), (33, 77), (70, 70)]
BAD = {  # sample id -> (image path, the reason its record must give)
    "corrupt": ("corrupt.jpg", "not a readable image"),
    "truncated": ("truncated.png", "cannot decode"),
    "empty": ("empty.png", "not a readable image"),
    "huge": ("huge.png", "exceeds the limit of 50000"),
    "escape": ("../outside.png", "path leaves the image root"),
    "absolute": ("/etc/hostname", "absolute path"),
    "missing": ("nope.jpg", "no such file"),
}


def image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def good_path(i):
    return f"sub/{i}.png" if i % 2 else f"{i}.jpg"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("boxdata")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i, size in enumerate(GOOD):
        image(*size, seed=i).save(images / good_path(i))
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    png = io.BytesIO()
    image(60, 60, 99).save(png, "PNG")
    (images / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (images / "empty.png").write_bytes(b"")
    image(300, 300, 98).save(images / "huge.png")  # 90000 pixels > --max-image-pixels 50000
    image(20, 20, 97).save(root / "outside.png")  # exists, but outside the root: never read
    samples = [{"id": f"s{i}", "image": good_path(i), "conversations": []} for i in range(len(GOOD))]
    samples += [
        {"id": "s0", "image": "0.jpg"},  # same id, same image: fine
        {"id": "s6", "image": "./0.jpg"},  # another sample of the same picture
        {"id": "text", "conversations": []},
        {"id": "clip", "video": "v.mp4"},
    ]
    samples += [{"id": sid, "image": path} for sid, (path, _) in BAD.items()]
    (root / "llava.json").write_text(json.dumps(samples))
    return root


def boxes_args(dataset, box_models, out, *extra):
    return [
        "boxes", str(dataset / "llava.json"), "--image-root", str(dataset / "images"), "--out", str(out),
        "--detector", str(box_models["owlv2"]), "--tagger", "clip", "--tagger-model", str(box_models["clip"]),
        "--vocabulary", "coco80", "--tag-threshold", "0", "--tag-top-k", "3", "--batch-size", "2",
        "--max-image-pixels", "50000", "--reference-json", str(out.with_suffix(".json")), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def baseline(dataset, box_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "boxes.jsonl"
    assert main(boxes_args(dataset, box_models, out)) == 0
    return out


def run_subprocess(args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_llava_json_smoke_records_every_image_once(baseline, capsys):
    records = [json.loads(line) for line in baseline.read_text().splitlines()]
    keys = [r["image"] for r in records]
    assert keys == [good_path(i) for i in range(len(GOOD))] + [path for path, _ in BAD.values()]
    for i, record in enumerate(records[: len(GOOD)]):
        assert record["frame"] == list(GOOD[i]) and len(record["boxes"]) == len(record["labels"]) > 0
        assert set(record["labels"]) <= set(record["tags"]) and len(record["tags"]) == 3
    assert records[0]["id"] == "s0" and records[0]["ids"] == ["s0", "s6"]
    for record, (sid, (_, reason)) in zip(records[len(GOOD) :], BAD.items(), strict=True):
        assert record["id"] == sid and reason in record["error"] and "boxes" not in record
    index = BoxIndex.load(baseline.with_suffix(".json"))  # the reference's form: one entry per sample id
    assert index.boxes_for(id="s6").xyxy.tolist() == index.boxes_for(id="s0").xyxy.tolist()
    assert index.boxes_for(id="corrupt") is None and len(index) == len(GOOD) + 1


def test_summary_counts_unreadable_images_and_skipped_samples(
    dataset, box_models, baseline, tmp_path, capsys
):
    out = tmp_path / "again.jsonl"
    out.write_text(baseline.read_text())  # a finished file: nothing left to do
    assert main(boxes_args(dataset, box_models, out, "--no-progress")) == 0
    printed = capsys.readouterr().out
    assert f"{len(GOOD) + len(BAD)} images from 17 samples: {len(GOOD)} with boxes" in printed
    assert f"{len(BAD)} unreadable" in printed and "this run: 0 images" in printed
    assert "skipped 1 text-only" in printed and "skipped 1 video" in printed
    assert "unreadable x2: not a readable image" in printed
    assert out.read_text() == baseline.read_text()


def test_same_id_with_two_images_is_a_clear_error(dataset, box_models, tmp_path, capsys):
    bad = tmp_path / "dup.json"
    bad.write_text(json.dumps([{"id": "7", "image": "0.jpg"}, {"id": "7", "image": "2.jpg"}]))
    args = boxes_args(dataset, box_models, tmp_path / "b.jsonl")
    args[1] = str(bad)
    assert main(args) == 2
    assert "id '7' is sample 1 with image '0.jpg' and sample 2 with image '2.jpg'" in capsys.readouterr().err


def _boxes_argv(dataset, box_models, out):
    """`mgllava boxes` over the dataset's images with the tiny OWLv2, into `out`."""
    return ["boxes", str(dataset / "images"), "--out", str(out), "--detector", str(box_models["owlv2"])]


def test_empty_tag_lists(dataset, box_models, tmp_path, capsys):
    args = _boxes_argv(dataset, box_models, tmp_path / "f.jsonl")
    assert main([*args, "--tagger", "fixed", "--tags", " , "]) == 2
    assert "tag list is empty" in capsys.readouterr().err
    samples = tmp_path / "tags.jsonl"  # --tagger sample: each sample's own tags; none -> recorded "tags": []
    samples.write_text('{"id": "a", "image": "0.jpg", "tags": "cat, dog"}\n{"id": "b", "image": "2.jpg"}\n')
    out = tmp_path / "s.jsonl"
    argv = ["boxes", str(samples), "--image-root", str(dataset / "images"), "--out", str(out)]
    assert main([*argv, "--detector", str(box_models["owlv2"]), "--tagger", "sample"]) == 0
    a, b = (json.loads(line) for line in out.read_text().splitlines())
    assert a["tags"] == ["cat", "dog"] and a["boxes"] and b["tags"] == [] and b["boxes"] == []
    assert "1 without (1 had no tags)" in capsys.readouterr().out


def test_retry_errors_reads_unreadable_images_again(box_models, tmp_path, capsys):
    image(40, 30, 1).save(tmp_path / "a.png")
    (tmp_path / "s.json").write_text(
        json.dumps([{"id": "a", "image": "a.png"}, {"id": "b", "image": "b.png"}])
    )
    out = tmp_path / "o.jsonl"
    argv = ["boxes", str(tmp_path / "s.json"), "--out", str(out), "--detector", str(box_models["owlv2"])]
    argv += ["--tagger", "fixed", "--tags", "cat", "--no-progress"]
    assert main(argv) == 0
    first = out.read_text()
    assert "no such file" in json.loads(first.splitlines()[1])["error"]
    image(30, 40, 2).save(tmp_path / "b.png")  # the missing image is back
    assert main(argv) == 0 and out.read_text() == first  # a plain rerun keeps the record
    capsys.readouterr()
    assert main([*argv, "--retry-errors"]) == 0
    a, b = (json.loads(line) for line in out.read_text().splitlines())
    assert a == json.loads(first.splitlines()[0]) and b["frame"] == [30, 40] and "error" not in b
    assert "this run: 1 images" in capsys.readouterr().out


def test_ram_plus_without_its_package_says_how_to_install(dataset, box_models, tmp_path, capsys):
    if importlib.util.find_spec("ram") is not None:
        pytest.skip("recognize-anything is installed here")
    args = _boxes_argv(dataset, box_models, tmp_path / "r.jsonl")
    assert main([*args, "--tagger", "ram++", "--tagger-model", "ram_plus_swin_large_14m.pth"]) == 2
    assert "pip install git+https://github.com/xinyu1205/recognize-anything" in capsys.readouterr().err


def test_image_folder_input(dataset, box_models, tmp_path):
    out = tmp_path / "folder.jsonl"
    args = ["boxes", str(dataset / "images"), "--out", str(out), "--detector", str(box_models["owlv2"])]
    assert (
        main([*args, "--tagger", "fixed", "--vocabulary", "coco80", "--workers", "1", "--no-progress"]) == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert ids == sorted(ids) and "sub/1.png" in ids and "huge.png" in ids and len(ids) == len(GOOD) + 4
    assert sum("error" in r for r in records) == 3  # corrupt, truncated, empty (huge is under 64 MP here)


def test_benchmark_tsv_input(box_models, tmp_path, capsys):
    encoded = []
    for seed in (1, 2):
        buffer = io.BytesIO()
        image(40, 30, seed).save(buffer, "PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    rows = [
        ("10", encoded[0]),
        ("11", "10"),
        ("12", "@@not base64@@"),
        ("13", encoded[1]),
        ("14", encoded[1]),
    ]
    tsv = tmp_path / "MMBench_DEV_EN.tsv"
    tsv.write_text("index\tquestion\tA\tB\timage\n" + "".join(f"{i}\tWhat?\tx\ty\t{im}\n" for i, im in rows))
    out = tmp_path / "mmb.jsonl"
    argv = ["boxes", str(tsv), "--out", str(out), "--detector", str(box_models["owlv2"]), "--tagger", "fixed"]
    assert main([*argv, "--tags", "cat,dog", "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("ids", [r["id"]]) for r in records] == [["10", "11"], ["12"], ["13", "14"]]
    assert "not valid base64" in records[1]["error"] and records[0]["frame"] == [40, 30]
    index = BoxIndex.load(out)
    assert index.boxes_for(id=11).xyxy.tolist() == index.boxes_for(id=10).xyxy.tolist()
    tsv.write_text(tsv.read_text() + f"10\tAgain?\tx\ty\t{encoded[1]}\n")
    capsys.readouterr()
    assert main([*argv, "--tags", "cat"]) == 2  # an index twice: a clear error before any work
    assert "index '10' appears twice (line 7)" in capsys.readouterr().err


def test_reference_json_round_trips_through_boxes_convert(baseline, tmp_path):
    ref = tmp_path / "ref.json"
    assert main(["boxes-convert", str(baseline), str(ref)]) == 0
    assert json.loads(ref.read_text()) == json.loads(baseline.with_suffix(".json").read_text())
    back = tmp_path / "back.jsonl"
    assert main(["boxes-convert", str(ref), str(back)]) == 0
    ours, theirs = BoxIndex.load(baseline), BoxIndex.load(back)
    for rid in ours.by_id:
        mine = ours.boxes_for(id=rid)
        if mine is not None:
            assert theirs.boxes_for(id=rid).to_dict() == mine.to_dict()
    again = tmp_path / "again.json"
    assert main(["boxes-convert", str(back), str(again)]) == 0
    assert json.loads(again.read_text()) == json.loads(ref.read_text())


def test_reference_video_records_convert_both_ways(tmp_path):
    frames = [{"boxes": [[i, 0, i + 5, 5]], "scores": [0.5], "labels": ["dog"]} for i in range(8)]
    reference = [
        {"video": "v_01.mp4", "frames": frames},
        {"id": "3", "boxes": [], "scores": [], "labels": []},
    ]
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    assert main(["boxes-convert", str(tmp_path / "ref.json"), str(tmp_path / "ours.jsonl")]) == 0
    assert len(BoxIndex.load(tmp_path / "ours.jsonl").frames_for(video="v_01.mp4")) == 8
    assert main(["boxes-convert", str(tmp_path / "ours.jsonl"), str(tmp_path / "back.json")]) == 0
    assert json.loads((tmp_path / "back.json").read_text()) == reference


KILLER = """
import json, os, signal, sys
from mgllava.cli import main
from mgllava.utils.io import JsonlWriter

kill_at, write = int(sys.argv[1]), JsonlWriter.write

def write_then_die(self, record):  # fault injection: die while writing record number `kill_at`
    if len(self.records) + 1 == kill_at:
        self._handle.write(json.dumps(record)[:25])
        self._handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, record)

JsonlWriter.write = write_then_die
sys.exit(main(sys.argv[2:]))
"""


def test_a_run_killed_half_way_resumes_to_the_same_file(dataset, box_models, baseline, tmp_path, capsys):
    out = tmp_path / "killed.jsonl"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    args = boxes_args(dataset, box_models, out, "--no-progress")
    result = run_subprocess([sys.executable, str(script), "6", *args])
    assert result.returncode == -9, result.stderr[-2000:]
    part = tmp_path / "killed.jsonl.rank0-of-1.part"
    assert not out.exists() and not part.read_text().endswith("\n")  # 5 records and a torn sixth
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "this run: 8 images" in printed and "5 already done" in printed
    assert out.read_text() == baseline.read_text() and not part.exists()
    assert out.with_suffix(".json").read_text() == baseline.with_suffix(".json").read_text()


@pytest.mark.slow  # two fresh torchrun processes: ~15 s on 2 cores
def test_two_torchrun_ranks_write_the_one_process_file(dataset, box_models, baseline, tmp_path):
    out = tmp_path / "ranks.jsonl"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_subprocess(
        [*launch, "-m", "mgllava.cli", *boxes_args(dataset, box_models, out, "--no-progress")]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text() == baseline.read_text()
    assert out.with_suffix(".json").read_text() == baseline.with_suffix(".json").read_text()
    assert result.stdout.count("images from 17 samples") == 1  # rank 0 alone reports
    assert not list(tmp_path.glob("*.part"))
