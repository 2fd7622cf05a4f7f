"""The command layer: every `h3fusion` subcommand parses the same config/run-dir options."""
import argparse
import importlib

import pytest

from pipeline.commands import COMMANDS, main

# surgery: per-tool options; aggregate reads several finished run dirs, no config; plan reads a
# config and a cluster shape, no run dir (tests/unit/test_memory_plan.py)
CONFIG_COMMANDS = [name for name in COMMANDS if name not in ("surgery", "aggregate", "plan")]


@pytest.mark.parametrize("name", CONFIG_COMMANDS)
def test_every_stage_command_takes_config_and_run_dir(name):
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    extra = ["--dimension", "helpful"] if name == "train-expert" else []
    args = parser.parse_args(["--config", "smollm2-135m", "--run-dir", "/x/run", "--set", "a.b=1", *extra])
    assert (args.config, args.run_dir, args.overrides) == ("smollm2-135m", "/x/run", ["a.b=1"])


def test_run_keeps_preset_and_out_as_aliases():
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS["run"][0]).add_arguments(parser)
    args = parser.parse_args(["--preset", "smollm2-135m", "--out", "/x/run"])
    assert (args.config, args.run_dir) == ("smollm2-135m", "/x/run")


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["data", "--config", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("h3fusion data: error:") and "missing.yaml" in err[0]
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_run_seed_sets_every_training_seed_and_eval_seed_but_no_data_seed():
    from pipeline.commands import config_from_args
    from pipeline.commands.run import seed_overrides
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS["run"][0]).add_arguments(parser)
    args = parser.parse_args(["--seed", "7", "--set", "expert.train.seed=3"])
    assert args.seed == 7 and parser.parse_args([]).seed is None and seed_overrides(None) == []
    args.overrides = args.overrides + seed_overrides(args.seed)   # what run.main does
    cfg = config_from_args(args)
    assert (cfg.base.train.seed, cfg.expert.train.seed, cfg.fusion.train.seed, cfg.eval.seed) == (7, 7, 7, 7)
    default = config_from_args(parser.parse_args([]))
    assert (cfg.data.builtin.seed, cfg.data.real.seed) == (default.data.builtin.seed, default.data.real.seed)
    with pytest.raises(ValueError, match="--seed"):
        seed_overrides(-1)


def test_aggregate_takes_run_dirs_and_an_out_dir():
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS["aggregate"][0]).add_arguments(parser)
    args = parser.parse_args(["--runs", "/r/s0", "/r/s1", "--out", "/r/agg"])
    assert [str(r) for r in args.runs] == ["/r/s0", "/r/s1"] and str(args.out) == "/r/agg"
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "/r/agg"])


@pytest.mark.parametrize("argv,rc", [(["--help"], 0), (["data", "--config", "missing.yaml"], 2)])
def test_torchrun_rank_exit_flushes_output_and_status(tmp_path, argv, rc):
    """A torchrun rank leaves through os._exit (no interpreter finalisation: __main__._exit_rank);
    what it printed to a pipe and its exit status must still arrive."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TORCHELASTIC_RUN_ID": "t", "RANK": "0", "WORLD_SIZE": "1",
           "H3F_EXIT_STATUS_DIR": str(tmp_path)}
    env.pop("PYTHONUNBUFFERED", None)   # a pipe is block-buffered: what os._exit would drop
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "pipeline.commands", *argv, "--run-dir",
                           str(tmp_path / "run")] if rc else
                          [sys.executable, "-m", "pipeline.commands", *argv],
                          env=env, cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == rc, done.stderr
    if rc:
        assert "h3fusion data: error:" in done.stderr and "missing.yaml" in done.stderr
        assert (tmp_path / "rank0").read_text().strip() == str(rc)
    else:
        assert "usage" in done.stdout.lower() and "train-expert" in done.stdout
