"""``settings set`` edits only the keys given: comments, order and every other line of a
hand-written file survive, and the output lists only what changed."""

from pathlib import Path

import pytest

from danbooru_assets.cli import main
from danbooru_assets.settings import load_settings

HAND_WRITTEN = """\
# my notes at the top
clip:
  keep_fraction: 0.3   # tuned on Tuesday
  # prompts below
  positive_prompts:
    - a dancer
pose:
  margin: 0.05
"""


@pytest.fixture
def settings_path(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "settings.yaml"
    monkeypatch.setenv("DANBOORU_SETTINGS", str(path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    return path


def test_set_keeps_comments_order_and_other_keys(settings_path: Path, capsys):
    settings_path.write_text(HAND_WRITTEN)
    assert main(["settings", "set", "clip.keep_fraction=0.5", "prefilter.mode=off", "pose.margin=0.05"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        "clip.keep_fraction: 0.3 -> 0.5",
        'prefilter.mode: "skip" -> "off"',
        "pose.margin: 0.05 (unchanged)",
    ]
    assert out[3].startswith(f"saved {settings_path}; changed sections: clip_threshold, prefilter")
    assert len(out) == 4  # no dump of the whole file
    text = settings_path.read_text()
    # Only the one line changed; everything else is as written, then the new section.
    assert text == HAND_WRITTEN.replace("keep_fraction: 0.3 ", "keep_fraction: 0.5 ") + 'prefilter:\n  mode: "off"\n'
    settings = load_settings(settings_path)
    assert (settings.clip.keep_fraction, settings.prefilter.mode, settings.clip.positive_prompts) == (
        0.5, "off", ["a dancer"])


def test_set_writes_no_defaults_and_the_validated_value(settings_path: Path, capsys):
    assert main(["settings", "set", "prefilter.file_types=[JPEG, png]"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == 'prefilter.file_types: null -> ["jpg", "png"]'
    text = settings_path.read_text()
    assert text.startswith("# danbooru_assets curation settings")
    assert "keep_fraction" not in text  # defaults stay defaults, not written out
    assert load_settings(settings_path).prefilter.file_types == ["jpg", "png"]


def test_refused_set_leaves_the_hand_written_file(settings_path: Path, capsys):
    settings_path.write_text(HAND_WRITTEN)
    assert main(["settings", "set", "clip.keep_fraction=0.4", "pose.margin=7"]) == 2
    assert "pose.margin=7" in capsys.readouterr().err
    assert settings_path.read_text() == HAND_WRITTEN


def test_set_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit):
        main(["settings", "set", "--help"])
    out = capsys.readouterr().out
    for key in ("clip.keep_fraction", "pose.margin", "prefilter.mode", "dedup.threshold", "quality.classifier"):
        assert key in out


@pytest.mark.parametrize("command", [[], ["run"], ["sample-data"], ["label"], ["export"], ["settings"],
                                     ["settings", "set"], ["settings", "show"]])
def test_help_shows_no_docstring_markup(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert "``" not in capsys.readouterr().out


def test_label_help_shows_the_port_default_and_postgres(capsys):
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--port PORT port (0 = any free port) (default: " in out
    assert "Postgres" in out and "SQLite" in out


def test_sample_data_default_size_is_runs(capsys):
    from danbooru_assets.cli import build_parser
    from danbooru_assets.devtools.sample_data import RUN_SAMPLE_IMAGES

    assert build_parser().parse_args(["sample-data"]).images == RUN_SAMPLE_IMAGES
