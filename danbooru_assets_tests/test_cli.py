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
    """Every command the README shows (``danbooru-assets <command>``) is one the parser knows."""
    import re

    choices = build_parser()._subparsers._group_actions[0].choices
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = set(re.findall(r"danbooru-assets ([a-z][a-z-]+)", readme))
    assert {"run", "sample-data", "settings", "label", "export"} <= documented
    assert sorted(documented - set(choices)) == []


@pytest.fixture
def settings_file(tmp_path: Path, monkeypatch) -> Path:
    """A valid settings file that every refused command must leave byte-for-byte as it is."""
    from danbooru_assets.settings import CurationSettings, save_settings

    path = tmp_path / "settings.yaml"
    monkeypatch.setenv("DANBOORU_SETTINGS", str(path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    save_settings(path, CurationSettings())
    return path


def refused(argv: list[str], capsys) -> str:
    """The one stderr line of a command that must fail with exit status 2 and save nothing."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "saved" not in out
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "assignment, expected",
    [
        ("clip.keep_fracton=0.3", "clip.keep_fracton: unknown key (did you mean clip.keep_fraction?)"),
        ("nonexistent.key=3", "nonexistent: unknown key; valid sections: clip, pose, quality"),
        ("clip.fixed_threshold=.nan", "clip.fixed_threshold: Input should be a finite number"),
        ("clip.fixed_threshold=.inf", "clip.fixed_threshold: Input should be a finite number"),
        ("clip.image_rules.min_side=-5", "clip.image_rules.min_side: Input should be greater than or equal to 1"),
        ("clip.positive_prompts=[]", "clip.positive_prompts: an empty list; use null for the built-in defaults"),
        ("quality.keep_classes=[excellent]", "quality.keep_classes: unknown label class 'excellent'"),
        ("pose.required_inside=[nose, tail]", "pose.required_inside: unknown keypoint 'tail'"),
        ("quality.classifier=xgboost", "quality.classifier: Input should be 'logreg' or 'mlp' (got 'xgboost')"),
        ("quality.round_fractions=[0.25, 0.05]", "quality.round_fractions: must increase"),
        ("clip.keep_fraction=[1", "clip.keep_fraction: not a YAML value"),
        ("clip.keep_fraction", "expected KEY=VALUE"),
    ],
)
def test_settings_set_refuses_bad_input_and_leaves_the_file(settings_file: Path, capsys, assignment, expected):
    before = settings_file.read_bytes()
    err = refused(["settings", "set", "clip.keep_fraction=0.4", assignment], capsys)
    assert expected in err
    assert err.startswith(f"error: {assignment}") or "KEY=VALUE" in err
    assert err.rstrip().endswith(f"{settings_file} unchanged")
    assert settings_file.read_bytes() == before


@pytest.mark.parametrize(
    "text, expected",
    [
        ("clip:\n  keep_fraction: [1\n", "not valid YAML at line 2 ('keep_fraction: [1')"),
        ("clip:\n  keep_fraction: 0.3\n  keep_fraction: 0.4\n", "duplicate key clip.keep_fraction (lines 2 and 3)"),
        ("clips:\n  keep_fraction: 0.3\n", "clips: unknown key (did you mean clip?)"),
        ("clip:\n  keep_fraction: .nan\n", "clip.keep_fraction: Input should be a finite number"),
    ],
)
def test_settings_show_of_a_broken_file_is_one_line(settings_file: Path, capsys, text, expected):
    settings_file.write_text(text)
    err = refused(["settings", "show"], capsys)
    assert f"settings file {settings_file}: {expected}" in err


def test_settings_set_on_a_broken_file(settings_file: Path, capsys):
    settings_file.write_text("clip:\n  keep_fraction: 7\n")
    # Another key: the file's own bad key is named, and the file stays as it is.
    err = refused(["settings", "set", "pose.margin=0.05"], capsys)
    assert f"settings file {settings_file}: clip.keep_fraction: Input should be less than or equal to 1" in err
    assert settings_file.read_text() == "clip:\n  keep_fraction: 7\n"
    # Setting the bad key itself repairs the file.
    assert main(["settings", "set", "clip.keep_fraction=0.3"]) == 0
    assert "keep_fraction: 0.3" in settings_file.read_text()
    assert "changed sections: prompts, clip_threshold" in capsys.readouterr().out  # nothing known before: all
    # YAML that cannot be parsed is not overwritten by set.
    settings_file.write_text("clip: [\n")
    assert "fix or delete the file first" in refused(["settings", "set", "clip.keep_fraction=0.3"], capsys)
    assert settings_file.read_text() == "clip: [\n"


def test_settings_show_of_an_empty_file_warns_and_shows_defaults(settings_file: Path, capsys, caplog):
    settings_file.write_text("# nothing set yet\n")
    assert main(["settings", "show"]) == 0
    assert "holds no settings: using the defaults" in caplog.text
    assert "keep_fraction: 0.2" in capsys.readouterr().out


def test_run_with_a_broken_settings_file_stops_in_one_line(tmp_path: Path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("clip:\n  keep_fraction: [1\n")
    env = {
        **os.environ,
        "DANBOORU_ROOT": str(tmp_path / "dataset"),
        "DANBOORU_SETTINGS": str(settings),
        "DAGSTER_HOME": str(tmp_path / "home"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "danbooru_assets.cli", "run"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: settings file {settings}: not valid YAML at line 2 ('keep_fraction: [1'): expected ',' or ']', but got '<stream end>'"]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "value, expected",
    [
        ("9999", "'9999' is not a shard; expected comma-separated four-digit shard keys from 0000 to 0999"),
        ("63", "'63' is not a shard (did you mean 0063?); expected comma-separated four-digit"),
        ("../../etc", "'../../etc' is not a shard; expected"),
        ("0042,,0107", "'' is not a shard"),
        ("", "'' is not a shard"),
    ],
)
def test_run_refuses_bad_shards_in_one_line(tmp_path: Path, monkeypatch, capsys, value, expected):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DANBOORU_ROOT", str(tmp_path))
    assert main(["run", "--shards", value]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: --shards {value}: ") and err.count("\n") == 1 and expected in err
    assert "Traceback" not in err and not (tmp_path / "home").exists()


def test_shard_list_parses_the_valid_form():
    from danbooru_assets.core.shards import parse_shard_list

    assert parse_shard_list("0107, 0042,0107") == ["0042", "0107"]


def test_run_asks_which_image_folder_when_both_exist_and_takes_the_flag(tmp_path: Path):
    root = tmp_path / "dataset"
    (root / "original").mkdir(parents=True)
    (root / "512px" / "0001").mkdir(parents=True)
    env = {**os.environ, "DANBOORU_ROOT": str(root), "DAGSTER_HOME": str(tmp_path / "home"),
           "DANBOORU_SETTINGS": str(tmp_path / "settings.yaml")}
    env.pop("DANBOORU_IMAGE_FOLDER", None)
    run = [sys.executable, "-m", "danbooru_assets.cli", "run"]
    proc = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "holds both original/ and 512px/" in proc.stderr and "--image-folder" in proc.stderr
    # The flag chooses the folder (original/ here has no shard folders: the run says where it looked).
    proc = subprocess.run([*run, "--image-folder", "original"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"no shard folders with images under {root / 'original'}" in proc.stderr


def test_ui_starts_dg_dev_in_the_instance_folder_with_the_project_paths_pinned(tmp_path: Path, monkeypatch):
    from danbooru_assets.cli import ui_launch

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    for name in ("DAGSTER_HOME", "DANBOORU_ROOT", "DANBOORU_SAMPLE_ROOT", "DANBOORU_STORAGE", "DANBOORU_SETTINGS",
                 "DANBOORU_LABELS"):
        monkeypatch.delenv(name, raising=False)
    command, env, home = ui_launch("127.0.0.1", 3123)
    assert home == project / ".dagster_home" and (home / "dagster.yaml").exists()
    assert command[1:] == ["dev", "-m", "danbooru_assets.definitions", "-h", "127.0.0.1", "-p", "3123"]
    # Relative defaults mean the project folder, not the instance folder the UI runs in.
    assert env["DANBOORU_SAMPLE_ROOT"] == str(project / "data" / "sample")
    assert env["DANBOORU_STORAGE"] == str(project / "data" / "storage")
    assert env["DANBOORU_SETTINGS"] == str(project / "data" / "settings.yaml")
    assert env["DANBOORU_LABELS"] == str(project / "data" / "labels.sqlite")
    assert env["DAGSTER_HOME"] == str(home)
    # A variable the user set is theirs.
    monkeypatch.setenv("DANBOORU_STORAGE", "memory://tables")
    _, env, _ = ui_launch("127.0.0.1", 3123)
    assert env["DANBOORU_STORAGE"] == "memory://tables" and "DANBOORU_SETTINGS" not in env


@pytest.mark.slow
def test_ui_serves_without_a_warning_to_interpret(tmp_path: Path):
    """Issue 17 (5): `dg dev` in the project folder warns that its dagster.yaml "will not be
    used"; `danbooru-assets ui` serves the instance with no warning at all."""
    import time
    import urllib.request

    from danbooru_assets.devtools.local_dagster import free_port

    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "DANBOORU_ROOT": str(tmp_path / "dataset")}
    (tmp_path / "dataset" / "original").mkdir(parents=True)
    log = tmp_path / "ui.log"
    project = Path(__file__).resolve().parents[1]  # holds the template dagster.yaml
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "danbooru_assets", "ui", "--port", str(port)], cwd=project,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Wait while the UI starts (no deadline: a loaded machine is slow, not broken); the
        # "Serving" line can come a moment before the socket answers.
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info") as answer:
                    assert answer.status == 200
                    break
            except OSError:
                time.sleep(1)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait()
    text = log.read_text()
    assert "WARNING" not in text and "will not be used" not in text, text
