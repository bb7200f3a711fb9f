import os
import subprocess
import sys
from pathlib import Path

import pytest

from danbooru_assets.cli import build_parser, main


@pytest.mark.parametrize("command", [["run", "--help"], ["sample-data", "--help"], ["settings", "--help"], ["--help"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(command)
    assert exc.value.code == 0
    assert "usage: danbooru-assets" in capsys.readouterr().out


def test_missing_root_fails_with_how_to_fix(tmp_path: Path):
    env = {**os.environ, "DANBOORU_ROOT": str(tmp_path / "no-such-dataset"), "DAGSTER_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "danbooru_assets.cli", "run"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "no-such-dataset does not exist" in proc.stderr
    assert "DANBOORU_ROOT" in proc.stderr


def test_settings_set_and_show(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("DANBOORU_SETTINGS", str(tmp_path / "s.yaml"))
    assert main(["settings", "set", "clip.keep_fraction=0.35", "clip.fixed_threshold=null"]) == 0
    assert "keep_fraction: 0.35" in (tmp_path / "s.yaml").read_text()
    assert main(["settings", "show"]) == 0
    assert "keep_fraction: 0.35" in capsys.readouterr().out
    assert main(["settings", "set", "clip.keep_fraction=7"]) == 2
    assert "clip.keep_fraction=7" in capsys.readouterr().err
    assert "keep_fraction: 0.35" in (tmp_path / "s.yaml").read_text()  # unchanged


def test_parser_knows_every_documented_command():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"run", "sample-data", "settings", "label", "export"} <= set(choices)
