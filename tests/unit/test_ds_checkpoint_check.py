"""Which DeepSpeed checkpoint a resume picks (pipeline.backends.ds_checkpoint_check), on dirs laid
out with DeepSpeed's file names (ZeRO-2 and ZeRO-3) and real torch archives; the real engine
round trip is tests/dist/test_checkpoint_fallback.py."""
from __future__ import annotations

import logging

import pytest
import torch

from pipeline.backends.ds_checkpoint_check import checkpoint_problem, resume_tag


def _tag(save_dir, tag, world=2, zero3=False, rank_state=True):
    d = save_dir / tag
    d.mkdir(parents=True)
    for r in range(world):
        torch.save({"r": r}, d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        if zero3:
            torch.save({"r": r}, d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        if rank_state:
            torch.save({"r": r}, d / f"rank_state_{r:05d}.pt")
    if not zero3:
        torch.save({"module": 1}, d / "mp_rank_00_model_states.pt")
    return d


def _latest(save_dir, tag):
    (save_dir / "latest").write_text(tag)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("zero3", [False, True])
def test_intact_latest_is_used(tmp_path, zero3):
    _tag(tmp_path, "step0000002", zero3=zero3)
    _tag(tmp_path, "step0000004", zero3=zero3)
    _latest(tmp_path, "step0000004")
    assert resume_tag(tmp_path, 2) == "step0000004"
    assert resume_tag(tmp_path / "absent", 2) is None


@pytest.mark.parametrize("damage,reason", [
    ("truncate_model", "truncated or not a torch checkpoint"),
    ("empty_optim", "is empty"),
    ("drop_rank_file", "but optimizer files for ranks [0] (an interrupted save?)"),
    ("drop_rank_state", "rank_state files for ranks [1]"),
    ("missing_dir", "no such checkpoint directory"),
])
def test_damaged_newest_falls_back_to_newest_intact_and_says_so(tmp_path, caplog, damage, reason):
    _tag(tmp_path, "step0000002", zero3=True)
    _tag(tmp_path, "step0000004", zero3=True)
    new = _tag(tmp_path, "step0000006", zero3=True)
    _latest(tmp_path, "step0000006")
    if damage == "truncate_model":
        _truncate(new / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    elif damage == "empty_optim":
        (new / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    elif damage == "drop_rank_file":
        (new / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    elif damage == "drop_rank_state":
        (new / "rank_state_00000.pt").unlink()
    else:
        _latest(tmp_path, "step0000009")   # `latest` names a tag that is not there
    with caplog.at_level(logging.WARNING, logger="h3fusion.checkpoints"):
        tag = resume_tag(tmp_path, 2)
    assert tag == ("step0000006" if damage == "missing_dir" else "step0000004")
    assert reason in caplog.text and f"resuming from the newest intact one, {tag}" in caplog.text
    caplog.clear()
    resume_tag(tmp_path, 2, announce=False)   # other ranks: same answer, no second warning
    assert caplog.text == ""


def test_no_intact_checkpoint_is_one_error_naming_each_problem(tmp_path):
    for tag in ("step0000002", "step0000004"):
        _truncate(_tag(tmp_path, tag) / "mp_rank_00_model_states.pt", keep=0.0)
    _latest(tmp_path, "step0000004")
    with pytest.raises(ValueError, match=r"no intact checkpoint.*step0000004: mp_rank_00_model_"
                                         r"states.pt is empty; step0000002: .*delete"):
        resume_tag(tmp_path, 2)


def test_another_world_size_names_both_sizes(tmp_path):
    _tag(tmp_path, "step0000004", world=2)
    _latest(tmp_path, "step0000004")
    with pytest.raises(ValueError, match="saved by 2 processes but this run has 1; resume with 2"):
        resume_tag(tmp_path, 1)
    with pytest.raises(ValueError, match="saved by 2 processes but this run has 4"):
        resume_tag(tmp_path, 4)


def test_unfinished_saves_and_other_dirs_are_never_candidates(tmp_path):
    (tmp_path / "hf_latest").mkdir()            # fusion's consolidated snapshot
    (tmp_path / "hf_latest" / "model.safetensors").write_bytes(b"x")
    _tag(tmp_path, "step0000002")
    assert resume_tag(tmp_path, 2) is None      # no `latest`: no save ever finished
    _latest(tmp_path, "step0000002")
    _tag(tmp_path, "step0000004")               # newer than `latest`: killed before it was named
    assert resume_tag(tmp_path, 2) == "step0000002"
    assert checkpoint_problem(tmp_path / "hf_latest") == "hf_latest: no *model_states.pt file"


def test_offline_consolidation_refuses_a_damaged_checkpoint(tmp_path, capsys):
    from pipeline.commands import main as cli_main

    _truncate(_tag(tmp_path / "ds", "step0000004") / "mp_rank_00_model_states.pt")
    _latest(tmp_path / "ds", "step0000004")
    rc = cli_main(["surgery", "zero_to_hf", "--ds-dir", str(tmp_path / "ds"), "--config-from",
                   str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "damaged checkpoint (step0000004: mp_rank_00_model_states.pt is truncated" in err
    assert "--tag" in err and not (tmp_path / "out").exists()
