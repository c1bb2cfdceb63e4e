"""The towers' stand-in pretraining: per-cell targets, resume to the uninterrupted result, the towers in the
runs' starting folders."""

import pytest
import torch
from safetensors.torch import load_file

from mgllava.demo import pretrain
from mgllava.demo.pretrain import COLOURS, NONE, PretrainSettings, cell_targets, pretraining_set, train_tower
from mgllava.demo.scenes import SceneSpec

TINY = PretrainSettings(scenes=12, test_scenes=6, steps=4, batch=4, save_every=2)


def test_cell_targets_mark_every_cell_a_part_covers_and_nothing_else():
    spec = SceneSpec()  # 6 x 6 cells of 32 px
    layout = {
        "big": ((40.0, 40.0, 100.0, 90.0), "red"),  # cells x 1-3, y 1-2
        "small": ((131.0, 5.0, 135.0, 9.0), "blue"),  # cell (4, 0)
        "stripe": ((33.0, 140.0, 34.0, 160.0), "teal"),  # 1 px wide, cell (1, 4)
    }
    target = cell_targets(layout, spec).view(6, 6)
    expected = torch.full((6, 6), NONE)
    expected[1:3, 1:4] = COLOURS.index("red")
    expected[0, 4] = COLOURS.index("blue")
    expected[4, 1] = COLOURS.index("teal")
    assert torch.equal(target, expected)
    shared = {"small": ((131.0, 5.0, 135.0, 9.0), "blue"), "neighbour": ((140.0, 2.0, 152.0, 14.0), "red")}
    coarse, fine = cell_targets(shared, spec).view(6, 6), cell_targets(shared, spec, grid=48).view(48, 48)
    assert coarse[0, 4] == COLOURS.index("red")  # one 32 px cell, two parts: the larger one's colour
    assert fine[1, 33] == COLOURS.index("blue") and fine[1, 36] == COLOURS.index("red")  # 4 px cells: both
    edge = cell_targets({"small": ((60.0, 0.0, 64.0, 4.0), "gray")}, spec).view(6, 6)
    assert edge[0, 1] == COLOURS.index("gray") and edge[0, 2] == NONE  # a box ending on a cell border


def test_pretraining_scenes_put_parts_anywhere_and_targets_match_their_centres():
    data = pretraining_set("train", 24, seed=0, tower="vision_tower")
    assert data["pixels"].shape == (24, 3, 84, 84) and [t.shape for t in data["targets"]] == [(24, 36)]
    rows = torch.arange(24)
    for k in range(3):  # each part's centre cell holds a colour, never NONE
        assert (data["targets"][0][rows, data["centres"][:, k]] != NONE).all()
    assert len(set(data["centres"][:, 0].tolist())) > 3  # the big shape is not at one fixed cell
    high = pretraining_set("train", 24, seed=0, tower="high_res_tower")
    assert high["pixels"].shape == (24, 3, 192, 192)
    assert [t.shape[1] for t in high["targets"]] == [48 * 48, 24 * 24, 12 * 12, 6 * 6]  # one per stage
    assert torch.equal(high["targets"][-1], data["targets"][0])  # same scenes, same 6 x 6 targets
    coloured = [(t != NONE).float().mean() for t in high["targets"]]
    assert coloured == sorted(coloured)  # finer grids: a smaller share of cells touched by a part


def test_an_interrupted_pretraining_resumes_to_the_uninterrupted_tower(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    whole.mkdir()
    accuracy = train_tower("vision_tower", whole, TINY)
    assert set(accuracy) == {"big", "small", "stripe"}
    assert not (whole / "vision_tower.ckpt.pt").exists()  # removed once the tower is written

    cut = tmp_path / "cut"
    cut.mkdir()
    progress = pretrain._progress

    def interrupt_after_the_first_checkpoint(out, tower, step, loss):
        progress(out, tower, step, loss)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "_progress", interrupt_after_the_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_tower("vision_tower", cut, TINY)
    assert torch.load(cut / "vision_tower.ckpt.pt", weights_only=True)["step"] == 2
    assert not (cut / "vision_tower.safetensors").exists()
    monkeypatch.setattr(pretrain, "_progress", progress)
    assert train_tower("vision_tower", cut, TINY) == accuracy
    resumed, uninterrupted = (
        load_file(cut / "vision_tower.safetensors"),
        load_file(whole / "vision_tower.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    trained_from = pretrain.demo_model(TINY.seed).vision_tower.state_dict()
    assert any(not torch.equal(trained_from[k], uninterrupted[k]) for k in uninterrupted)  # it did train


def test_towers_pretrained_with_other_settings_are_refused(tmp_path):
    (tmp_path / "vision_tower.json").write_text('{"settings": {"steps": 1}, "accuracy": {}}')
    with pytest.raises(ValueError, match="vision_tower pretrained with other settings"):
        pretrain.tower_jobs(tmp_path, TINY)


def test_a_job_waits_for_the_files_it_needs_and_an_endless_wait_is_refused(tmp_path):
    from mgllava.demo.jobs import Job, RunFailed, _next_ready

    made = tmp_path / "made.safetensors"
    first = Job("run/a", tmp_path / "a", (1,), 0, (), needs=(made,))
    second = Job("run/b", tmp_path / "b", (1,), 0, ())
    assert _next_ready([first, second], running={"pretrain": None}) is second
    made.write_bytes(b"x")
    assert _next_ready([first, second], running={}) is first
    made.unlink()
    with pytest.raises(RunFailed, match=r"run/a wait for files no job makes: .*made\.safetensors"):
        _next_ready([first], running={})
