"""The package surface: a cheap import, the public names, and the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

import reuse_lens as rl
from reuse_lens.cli import main


def test_import_loads_nothing_heavy() -> None:
    code = (
        "import sys, reuse_lens; "
        "heavy = [m for m in ('torch', 'transformer_lens', 'datasets', 'plotly', 'transformers') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names_resolve() -> None:
    for name in rl.__all__:
        assert getattr(rl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rl.nope  # noqa: B018


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "evaluate", "zoo"):
        assert command in out


def test_bad_arguments_are_clear(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--task", "ioi"])
    assert exit_info.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_evaluate_command_reports_errors_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", "zoo:nothing-here", "--task", "ioi"])
    assert exit_info.value.code == 2
    assert "no zoo model 'zoo:nothing-here'" in capsys.readouterr().err


def test_evaluate_command_on_a_folder(gpt2_folder, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", str(gpt2_folder), "--task", "sva", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "logit_diff" in out and "accuracy" in out
