"""Training checkpoints with `torch.distributed.checkpoint`, written atomically, resumed bit-exactly.

Layout under `<output_dir>/checkpoints/`:

    step-00000040/            DCP shards of the trainable parameters and the optimizer state,
                              scheduler.pt, trainer_state.json, rng-rank<r>.pt (one per rank)
    latest                    the name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp/` and renamed only after every rank has finished, then `latest`
is replaced atomically; a kill at any moment leaves the previous checkpoint intact and a stray `.tmp` that
the next save removes. Frozen parameters are not saved (they are rebuilt from the same source on resume).
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..utils import dist
from ..utils.io import atomic_write_json, atomic_write_text

OPTIONS = StateDictOptions(ignore_frozen_params=True)
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen keys are absent by design


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))


@contextmanager
def _quiet_single_process():
    """One process: DCP warns that it assumes one process, which is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Checkpointer:
    def __init__(self, output_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        # the pointer is written after the rename, so a checkpoint it names was complete: deleted since
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(
                f"{pointer} names {path.name}, which is missing or incomplete (no trainer_state.json); point "
                "it at a complete checkpoint to resume from it, or delete it to start over"
            )
        return path

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             state: dict[str, Any]) -> Path:  # fmt: skip
        info = dist.info()
        final = self.root / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
        with _quiet_single_process():
            dcp.save(
                {"model": model_state, "optim": optim_state},
                checkpoint_id=str(tmp),
                no_dist=not dist.active(),
            )
        torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
        if info.is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            atomic_write_json(
                tmp / "trainer_state.json", {**state, "step": step, "world_size": info.world_size}
            )
        dist.barrier()
        if info.is_main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            atomic_write_text(self.root / "latest", final.name + "\n")
            self._prune(final)
        dist.barrier()
        return final

    def _prune(self, newest: Path) -> None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep] if self.keep > 0 else []:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)
        for stray in self.root.glob("step-*.tmp"):
            shutil.rmtree(stray, ignore_errors=True)

    def load(
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> dict:
        info = dist.info()
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
        state = {"model": model_state, "optim": optim_state}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.active())
        result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                                options=LOAD_OPTIONS)  # fmt: skip
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        wrong = sorted(set(result.missing_keys) & trainable) + sorted(result.unexpected_keys)
        if wrong:
            raise ValueError(f"checkpoint {path} does not fit this model: {wrong[:10]}")
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = path / f"rng-rank{info.rank}.pt"
        if trainer_state["world_size"] == info.world_size and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
        return trainer_state
