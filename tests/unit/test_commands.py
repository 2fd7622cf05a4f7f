"""The command layer: every `h3fusion` subcommand parses the same config/run-dir options."""
import argparse
import importlib

import pytest

from pipeline.commands import COMMANDS, main

CONFIG_COMMANDS = [name for name in COMMANDS if name != "surgery"]   # surgery: per-tool options


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
