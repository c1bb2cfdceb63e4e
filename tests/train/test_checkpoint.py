"""Which checkpoint a run resumes from: none, the one `latest` names, never silently none when it names a lost one."""

import pytest

from mgllava.train.checkpoint import Checkpointer


def test_latest_is_the_checkpoint_the_pointer_names(tmp_path):
    checkpoints = Checkpointer(tmp_path)
    assert checkpoints.latest() is None  # a fresh run
    (tmp_path / "checkpoints/step-00000004").mkdir(parents=True)
    (tmp_path / "checkpoints/step-00000004/trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints/latest").write_text("step-00000004\n")
    assert checkpoints.latest() == tmp_path / "checkpoints/step-00000004"


def test_a_pointer_to_a_lost_checkpoint_stops_instead_of_starting_over(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/latest").write_text("step-00000006\n")
    with pytest.raises(FileNotFoundError, match="names step-00000006, which is missing"):
        Checkpointer(tmp_path).latest()
