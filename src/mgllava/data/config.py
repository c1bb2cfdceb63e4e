"""The training data's config: sources (LLaVA JSON/JSONL files with their image roots and box files), an
optional mixture file, the sampling rule per source, and the samples to leave out (`check-data` output)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataSource:
    path: str  # LLaVA JSON or JSONL: records with id, image | video | neither, conversations
    image_root: str | None = None
    video_root: str | None = None
    boxes: str | None = None  # box file: ours (.jsonl) or the reference's (.json)
    sample: str = "all"  # all | first:N | random:N

    def __post_init__(self) -> None:
        rule, _, n = self.sample.partition(":")
        if rule == "all" and not n:
            return
        if rule not in ("first", "random") or not n.isdigit():
            raise ValueError(f"sample rule {self.sample!r}: expected all, first:N or random:N")


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    mixture: str | None = None  # a YAML file with `sources:`; its sources are added to the ones above
    num_frames: int | None = (
        None  # frames per video; None: the processor's setting (8, docs/design.md section 8)
    )
    skip: str | None = None  # bad_samples.jsonl written by `mgllava check-data`: those samples are left out
    num_workers: int = 0
    index_cache: str | None = (
        None  # where scans of the data and box files are kept (None: <output_dir>/data-index)
    )
