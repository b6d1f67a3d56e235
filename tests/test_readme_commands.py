"""Every command the README shows runs in a test or says what it needs.

    .venv/bin/pytest tests/test_readme_commands.py -q

The ```bash blocks (the 5-minute tour, "Bring your own data") run as written in tests/test_readme_tour.py and
tests/test_byod.py. The other command lines of the README (indented examples: full-length recipes, placeholders
such as CKPT, optional parts in [brackets]) are checked here without their hours of training: every `mmret`
line parses with its command's own parser (for `mmret fit`, LightningCLI with `--print_config`, which validates
every key and value of the config and the options without building anything), and every recipe or file it
names exists. A line that needs what a test machine lacks (a SLURM cluster, GPUs) says so in its comment; the
two `make` commands are what CI runs (.ci/run).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mmret.cli import LIGHTNING_COMMANDS, _command_parser, main

REPO = Path(__file__).resolve().parents[1]
NEEDS = ("needs a SLURM cluster", "needs a GPU")


def readme_command_lines(readme: str) -> list[tuple[int, str]]:
    """(line number, command) of the indented command lines outside ```bash blocks, continuations joined."""
    lines, found, fenced, index = readme.splitlines(), [], False, 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"^    (mmret|python|sbatch|make) ", line):
            start, command = index + 1, line.strip()
            while command.endswith("\\"):
                index += 1
                command = command[:-1] + " " + lines[index].strip()
            found.append((start, command))
        index += 1
    return found


COMMANDS = readme_command_lines((REPO / "README.md").read_text())


def _argv(command: str) -> tuple[list[str], str]:
    """The command's words without its comment and [optional parts], and the comment."""
    text, _, comment = command.partition("  # ")
    text = re.sub(r"\[[^\]]*\]", " ", text)
    return shlex.split(text), comment


def test_the_readme_has_the_command_lines_this_module_checks():
    programs = {_argv(command)[0][0] for _, command in COMMANDS}
    assert programs == {"make", "mmret", "sbatch"}, programs
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("line, command", COMMANDS, ids=[f"README:{n}" for n, _ in COMMANDS])
def test_each_readme_command_parses_or_says_what_it_needs(line, command, capsys, monkeypatch):
    argv, comment = _argv(command)
    if argv[0] == "make":  # `make test` is what CI runs; `make demo` is `mmret demo` (tests/test_demo.py)
        targets = {"test": "make test", "demo": "mmret demo"}
        where = {"test": (REPO / ".ci/run").read_text(), "demo": (REPO / "Makefile").read_text()}
        assert targets[argv[1]] in where[argv[1]], command
        return
    if argv[0] == "sbatch" or (argv[:2] == ["mmret", "sweep"] and "--dry-run" not in argv):
        assert any(need in comment for need in NEEDS), f"README:{line} does not say what it needs: {command}"
        script = next(word for word in argv[1:] if word.endswith(".sbatch") or word.endswith(".yaml"))
        assert (REPO / script).is_file(), script
        return
    monkeypatch.chdir(REPO)
    name, options = argv[1], argv[2:]
    for word in options:  # recipes, sweep and table specs the line names are in the repository
        if word.startswith("experiments/"):
            assert (REPO / word).is_file(), f"README:{line}: {word} does not exist"
    if name in LIGHTNING_COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([name, *options, "--print_config"])
        assert exit_.value.code in (0, None), capsys.readouterr().err[-2000:]
        assert "class_path" in capsys.readouterr().out
        return
    parser, _ = _command_parser(name)
    try:
        parser.parse_args(options)
    except SystemExit as exit_:
        pytest.fail(
            f"README:{line}: `{command}` does not parse (exit {exit_.code}): {capsys.readouterr().err}"
        )
