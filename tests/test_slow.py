"""Slower checks, run by `make test-slow` (CI): paper-size pooling, and the component benches stay runnable."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgllava.model.objects import pool_object_features, pool_object_features_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pooling_equals_reference_at_paper_size():
    torch.manual_seed(0)
    maps = [torch.randn(c, s, s) for c, s in [(192, 192), (384, 96), (768, 48), (1536, 24)]]
    xy = torch.rand(100, 2) * 760
    boxes = torch.cat([xy, xy + torch.rand(100, 2) * 400], 1)  # many reach past the 768 edge
    ours = pool_object_features(maps, boxes, 768)
    torch.testing.assert_close(ours, pool_object_features_reference(maps, boxes, 768), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, args",
    [
        ("bench_train.py", ["--steps", "2", "--samples", "40"]),
        ("bench_serve_limits.py", ["--flood-mb", "0.5", "--budget", "2000000", "--body-mb", "2"]),
        ("bench_boxes.py", ["--images", "2", "--tags", "3", "--image-size", "64", "--repeats", "1"]),
    ],
)
def test_component_bench_scripts_run(script, args):
    """The component benches stay runnable (the suite's scripts, serving included, are smoke-tested in
    test_bench.py)."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                            cwd=ROOT / "bench", timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x" in result.stdout and "peak" in result.stdout
