"""`mgllava assemble --reference`: peak memory as a multiple of the reference checkpoint's size.

Writes the tests' tiny CLIP and ConvNeXt files and an LLM folder of the chosen width and depth, saves a
reference `.pth` holding that LLM and random new modules, then converts it in a fresh process and reads the
process's peak resident memory (VmHWM) after `assemble` and after writing the folder. Prints the growth over
the memory just before converting, divided by the `.pth` size: about 1x when the file is unpickled once and
its tensors are handed to the model, about 2x when it is read twice (a 26 GB Vicuna-13B file then needs
~52 GB). float32 throughout, so no cast adds a copy.

    .venv/bin/python bench/bench_assemble_memory.py [--hidden 1024] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' tiny-model writers
from tests import formats  # noqa: E402

CHILD = """
import json, sys
from mgllava.convert import assemble, write_folder

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

clip, convnext, llm, pth, out = sys.argv[1:]
before = kib("VmRSS:")
model, processor = assemble(clip, convnext, llm, "vicuna", reference=pth, high_res_image_size=128)
assembled = kib("VmHWM:")
write_folder(model, processor, out)
print(json.dumps({"before": before, "assembled": assembled, "written": kib("VmHWM:")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parts = formats.write_components(root)
        llm = formats.write_llm_folder(root / "wide-llm", hidden_size=args.hidden, num_layers=args.layers)
        state = formats.reference_checkpoint(llm, formats.CLIP_VISION["hidden_size"], formats.TRUNK_DIMS)
        pth = formats.save_reference_pth(state, root / "mg_llava.pth", "state_dict")
        del state
        size_kib = pth.stat().st_size / 1024
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        argv = [str(parts["clip"]), str(parts["convnext"]), str(llm), str(pth), str(root / "out")]
        run = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"the conversion failed:\n{run.stderr}")
        kib = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"reference .pth: {size_kib / 1024:.0f} MiB ({args.layers} layers of width {args.hidden})")
    for stage in ("assembled", "written"):
        growth = kib[stage] - kib["before"]
        print(f"peak growth after {stage:9s}: {growth / 1024:6.0f} MiB = {growth / size_kib:.2f} x the .pth")


if __name__ == "__main__":
    main()
