"""Slow training checks (CI): 2-process torchrun equals 1 process; a SIGKILLed run resumes bit-exactly."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mgllava.cli import main
from mgllava.utils.io import read_jsonl

from .. import synth

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "mgllava.cli", *args]  # fmt: skip
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(folder / "metrics.jsonl")]


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = load_file(a / "final/model.safetensors"), load_file(b / "final/model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=key)


@pytest.mark.slow
def test_two_processes_fsdp_equal_one_process_through_both_stages(tmp_path):
    data = synth.write_dataset(tmp_path / "d", n=16, text_only=4)
    src = synth.source_override(data)
    for name, run in (("one", lambda *a: main(list(a))), ("two", lambda *a: torchrun(*a).returncode)):
        assert run("train", "tiny-stage1", src, f"output_dir={tmp_path}/{name}/s1", "max_steps=4") == 0, name
        code = run("train", "tiny-stage2", src, f"output_dir={tmp_path}/{name}/s2",
                   f"init_from={tmp_path}/{name}/s1/final", "max_steps=4")  # fmt: skip
        assert code == 0, name
    for stage in ("s1", "s2"):
        one, two = losses(tmp_path / "one" / stage), losses(tmp_path / "two" / stage)
        assert len(one) == len(two) == 4
        assert one == pytest.approx(two, rel=1e-5, abs=1e-6)
        assert_same_weights(tmp_path / "one" / stage, tmp_path / "two" / stage, atol=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_ends_bit_exact(tmp_path):
    data = synth.write_dataset(tmp_path / "d", n=12, text_only=0)
    args = ["train", "tiny-stage2", synth.source_override(data), "model=tiny", "init_from=null",
            "stage.requires_init=false", "save_every=4", "stage.epochs=8", "stage.lr=1e-3"]  # fmt: skip
    assert main([*args, f"output_dir={tmp_path}/full"]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mgllava.cli", *args, f"output_dir={killed}"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    latest = killed / "checkpoints/latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-00000008":
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    assert main([*args, f"output_dir={killed}"]) == 0
    assert_same_weights(tmp_path / "full", killed)
    assert losses(tmp_path / "full") == losses(killed)


@pytest.mark.slow
def test_chunked_loss_under_fsdp_equals_the_plain_loss_in_one_process(tmp_path):
    """The chunked loss recomputes the (FSDP-sharded, trainable) head in the backward: 2 ranks with it train as
    one process without it."""
    data = synth.write_dataset(tmp_path / "d", n=16, text_only=4)
    stage2 = [
        "tiny-stage2",
        synth.source_override(data),
        "init_from=null",
        "stage.requires_init=false",
        "max_steps=3",
    ]
    assert main(["train", *stage2, f"output_dir={tmp_path}/one"]) == 0
    two = torchrun("train", *stage2, f"output_dir={tmp_path}/two", "loss_chunk_tokens=5")
    assert two.returncode == 0, two.stderr[-3000:]
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5, abs=1e-6)
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)


@pytest.mark.slow
def test_cpu_offload_trains_as_one_process_and_resumes(tmp_path):
    """`cpu_offload` (FSDP2's shards, gradients and AdamW state in host memory, materialised on the CPU, the
    frozen towers and buffers placed on the device) trains, checkpoints and exports as one process does; its
    DCP checkpoint resumes. On a CPU-only machine host and device coincide: this checks the plumbing, and
    `make test-gpu` the copies between them."""
    data = synth.write_dataset(tmp_path / "d", n=16, text_only=4)
    stage2 = ["tiny-stage2", synth.source_override(data), "init_from=null", "stage.requires_init=false",
              "stage.epochs=2", "save_every=2"]  # fmt: skip
    assert main(["train", *stage2, f"output_dir={tmp_path}/one"]) == 0
    two = tmp_path / "two"
    run = torchrun("train", *stage2, f"output_dir={two}", "cpu_offload=true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(tmp_path / "one") == pytest.approx(losses(two), rel=1e-5, abs=1e-6)
    assert_same_weights(tmp_path / "one", two, atol=1e-5)
    steps = len(losses(two))
    kept = sorted(p.name for p in (two / "checkpoints").glob("step-*"))
    assert len(kept) == 2 and kept[-1] == f"step-{steps:08d}"
    shutil.rmtree(two / "final")
    (two / "checkpoints/latest").write_text(kept[0] + "\n")  # as if killed after the earlier checkpoint
    rerun = torchrun("-v", "train", *stage2, f"output_dir={two}", "cpu_offload=true")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {int(kept[0][5:])}" in rerun.stderr
    assert len(losses(two)) == steps
    assert_same_weights(tmp_path / "one", two, atol=1e-5)
