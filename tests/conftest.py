"""Shared test setup: offline hub, deterministic torch, and the fixtures every package's tests share: tiny models
on disk in the real formats (`formats.py` writes them), the tiny mg-llava folder. Plain helpers (tiny model and
engine, scenes, data URLs, a stand-in proposer) are in `serving.py`; synthetic training data in `synth.py`,
benchmark files in `eval_formats.py`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import mgllava  # noqa: F401 - registers the Auto classes
from mgllava.convert.folder import configure_generation, write_folder

from . import formats
from .serving import tiny_parts


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory):
    """A CLIP folder, an OpenCLIP ConvNeXt file and an LLM folder, tiny and random, in the real formats."""
    root = tmp_path_factory.mktemp("components")
    return formats.write_components(root)


@pytest.fixture(scope="session")
def box_models(tmp_path_factory):
    """A CLIP tagger folder and an OWLv2 detector folder, tiny and random, as `save_pretrained` writes them."""
    root = tmp_path_factory.mktemp("box_models")
    return {
        "clip": formats.write_clip_tagger_folder(root / "clip"),
        "owlv2": formats.write_owlv2_folder(root / "owlv2"),
    }


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The `tiny` preset with random weights (seed 0) and its processor, generation configured as `assemble`
    does, saved as one HF folder: what `Engine.from_pretrained`, `mgllava eval` and the harnesses load."""
    model, processor = tiny_parts()
    configure_generation(model, processor)
    return write_folder(model, processor, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def model_dir(tiny_folder) -> str:
    """`tiny_folder` as the string a command line takes."""
    return str(tiny_folder)
