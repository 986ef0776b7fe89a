"""`python -m distconvnet --help` names every command, and each one it names runs."""

import contextlib
import io
import subprocess
import sys

import pytest

from distconvnet import cli
from trainer_fixtures import REPO, subprocess_env

COMMANDS = ["train", "summary", "show", "bench", "bench_scaling", "torchrun"]


def test_help_lists_the_commands_after_the_options():
    done = subprocess.run([sys.executable, "-m", "distconvnet", "--help"], cwd=REPO,
                          capture_output=True, text=True, env=subprocess_env())
    assert (done.returncode, done.stderr) == (0, "")
    out = done.stdout
    assert out.startswith("convnet.py usage:")
    listing = out[out.index("\nCommands: python -m distconvnet COMMAND"):].splitlines()[2:]
    assert [line.split()[0] for line in listing] == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_each_listed_command_has_its_help(command):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        sys.exit(cli.main([command, "--help"]))
    assert exited.value.code == 0
    usage = out.getvalue()
    # train's is the original's table; every other command has a parser of its own
    assert usage.startswith("convnet.py usage:") == (command == "train")
    assert "usage:" in usage
