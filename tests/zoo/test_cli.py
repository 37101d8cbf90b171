"""The `reuse-lens zoo` subcommand."""

from __future__ import annotations

import pytest

from reuse_lens import zoo
from reuse_lens.cli import main


def test_zoo_list_names_every_shipped_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [f"zoo:{name}" for name in zoo.available()]


def test_zoo_status_shows_scores(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "status"]) == 0
    assert "zoo:base" in capsys.readouterr().out


def test_zoo_train_rejects_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["zoo", "train", "--only", "nope"])
    assert info.value.code == 2
    assert "base" in capsys.readouterr().err
