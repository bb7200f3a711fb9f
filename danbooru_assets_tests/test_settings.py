"""The durable settings file: one validation path for the file and ``settings set``."""

import logging
from pathlib import Path

import dagster as dg
import pytest
from pydantic import BaseModel

from danbooru_assets.settings import (
    CurationSettings,
    PoseRules,
    SettingsError,
    load_settings,
    save_settings,
    set_setting,
    setting_keys,
    settings_source,
)
from danbooru_assets.orchestration.resources import SettingsResource


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


def load_error(path: Path) -> SettingsError:
    with pytest.raises(SettingsError) as exc:
        load_settings(path)
    message = str(exc.value)
    assert "\n" not in message and str(path) in message
    return exc.value


def test_no_file_means_defaults_and_says_so(tmp_path: Path):
    path = tmp_path / "absent.yaml"
    assert load_settings(path) == CurationSettings()
    assert settings_source(path) == f"defaults (no file at {path})"
    assert SettingsResource(path=str(path)).read().source == f"defaults (no file at {path})"


@pytest.mark.parametrize("text", ["", "# everything commented out\n", "~\n"])
def test_empty_file_means_defaults_with_a_warning(tmp_path: Path, text: str, caplog):
    path = write(tmp_path, text)
    with caplog.at_level(logging.WARNING, logger="danbooru_assets.settings"):
        assert load_settings(path) == CurationSettings()
    assert f"settings file {path} holds no settings: using the defaults" in caplog.text
    assert settings_source(path) == f"defaults ({path} holds no settings)"


def test_saved_settings_load_back_and_name_the_file_as_source(tmp_path: Path):
    path = tmp_path / "s.yaml"
    settings = set_setting(CurationSettings(), "clip.keep_fraction", "0.35")
    settings = set_setting(settings, "pose.required_inside", "[nose, hip_left]")
    save_settings(path, settings)
    assert load_settings(path) == settings
    assert load_settings(path).clip.keep_fraction == 0.35
    assert settings_source(path) == "settings file"


def test_empty_section_holds_the_defaults(tmp_path: Path):
    path = write(tmp_path, "clip:\n  # keep_fraction: 0.3\n  image_rules:\npose:\n")
    assert load_settings(path) == CurationSettings()


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("clip:\n  keep_fraction: [1\n  fixed_threshold: null\n", None, "not valid YAML at line 2 ('keep_fraction: [1')"),
        ("clip:\n  keep_fraction: 0.3\n   bad: indent\n", None, "not valid YAML at line 3"),
        ("clip:\n  keep_fraction: 0.3\n  keep_fraction: 0.4\n", "clip.keep_fraction", "duplicate key clip.keep_fraction (lines 2 and 3)"),
        ("quality:\n  min_round_size: 3\nquality:\n  min_round_size: 4\n", "quality", "duplicate key quality (lines 1 and 3)"),
        ("clips:\n  keep_fraction: 0.3\n", "clips", "clips: unknown key (did you mean clip?)"),
        ("nonexistent:\n  key: 3\n", "nonexistent", "nonexistent: unknown key; valid sections: clip, pose, quality"),
        ("clip:\n  keep_fracton: 0.3\n", "clip.keep_fracton", "unknown key (did you mean clip.keep_fraction?)"),
        ("clip:\n  image_rules:\n    min_sides: 3\n", "clip.image_rules.min_sides", "did you mean clip.image_rules.min_side?"),
        ("- clip\n- pose\n", None, "expected a mapping of sections (clip, pose, quality, prefilter"),
        ("clip:\n  fixed_threshold: .nan\n", "clip.fixed_threshold", "finite number"),
        ("clip:\n  keep_fraction: 7\n", "clip.keep_fraction", "less than or equal to 1 (got 7)"),
        ("quality:\n  classifier: xgboost\n", "quality.classifier", "'logreg' or 'mlp'"),
        ("pose:\n  required_inside: [nose, tail]\n", "pose.required_inside", "unknown keypoint 'tail'"),
    ],
)
def test_bad_file_is_one_line_naming_file_and_key(tmp_path: Path, text: str, key, expected: str):
    error = load_error(write(tmp_path, text))
    assert expected in str(error)
    assert error.key == key
    if key:
        assert f"{key}" in str(error)


def test_every_problem_of_a_file_is_named(tmp_path: Path):
    error = load_error(write(tmp_path, "quality:\n  round_fractions: [0.1, 0.05]\n  classifier: xgb\n"))
    assert "quality.round_fractions: must increase" in str(error)
    assert "quality.classifier: Input should be 'logreg' or 'mlp' (got 'xgb')" in str(error)


def test_unreadable_file_is_named(tmp_path: Path):
    path = tmp_path / "settings.yaml"
    path.write_bytes(b"\xff\xfe")
    assert "cannot be read" in str(load_error(path))
    path.unlink()
    path.mkdir()
    assert "cannot be read" in str(load_error(path))


# Every field gets a constraint: a nonsensical value for each is refused.
PREFILTER_BAD_VALUES = [
    ("prefilter.mode", "skipp"),
    ("prefilter.exclude_tags.general", "['  ']"),
    ("prefilter.exclude_tags.character", "[a, a]"),
    ("prefilter.exclude_tags.copyright", "a single string"),
    ("prefilter.exclude_tags.artist", "[[x]]"),
    ("prefilter.exclude_tags.meta", "[comic, COMIC]"),
    ("prefilter.require_tags.general", "[1girl, 1girl]"),
    ("prefilter.require_tags.character", "['']"),
    ("prefilter.require_tags.copyright", "[1]"),
    ("prefilter.require_tags.artist", "x"),
    ("prefilter.require_tags.meta", "[a b, a  b]"),
    ("prefilter.ratings", "[]"),
    ("prefilter.ratings", "[g, x]"),
    ("prefilter.ratings", "[g, g]"),
    ("prefilter.min_score", "1.5"),
    ("prefilter.min_score", "low"),
    ("prefilter.exclude_deleted", "maybe"),
    ("prefilter.exclude_banned", "maybe"),
    ("prefilter.file_types", "[]"),
    ("prefilter.file_types", "[psd]"),
    ("prefilter.file_types", "[jpg, jpeg]"),
    ("prefilter.min_side", "-1"),
    ("prefilter.min_side", "2.5"),
    ("prefilter.max_aspect_ratio", "0.5"),
    ("prefilter.max_aspect_ratio", ".inf"),
]
BAD_VALUES = [
    ("clip.keep_fraction", "0"),
    ("clip.keep_fraction", "1.5"),
    ("clip.keep_fraction", ".nan"),
    ("clip.fixed_threshold", ".nan"),
    ("clip.fixed_threshold", ".inf"),
    ("clip.fixed_threshold", "-0.1"),
    ("clip.fixed_threshold", "1.1"),
    ("clip.positive_prompts", "[]"),
    ("clip.negative_prompts", "[]"),
    ("clip.positive_prompts", "['  ']"),
    ("clip.positive_prompts", "[a cat, a cat]"),
    ("clip.positive_prompts", "a single string"),
    ("clip.image_rules.min_side", "-5"),
    ("clip.image_rules.min_side", "0"),
    ("clip.image_rules.min_side", "2.5"),
    ("clip.image_rules.max_dark_border_frac", "-0.1"),
    ("clip.image_rules.max_dark_border_frac", "2.5"),
    ("clip.image_rules.min_content_area_frac", "1.5"),
    ("clip.image_rules.min_content_area_frac", ".nan"),
    ("pose.min_confidence", "-0.1"),
    ("pose.min_confidence", "1.5"),
    ("pose.margin", "-0.5"),
    ("pose.margin", ".inf"),
    ("pose.required_inside", "[nose, tail]"),
    ("pose.required_inside", "[nose, nose]"),
    ("pose.allow_hips_below_frame", "maybe"),
    ("pose.density_quantile", "0"),
    ("pose.density_quantile", "1.01"),
    ("pose.check_midpoint_density", "maybe"),
    ("pose.ratio_mad_k", "0"),
    ("pose.ratio_mad_k", ".inf"),
    ("pose.min_torso_length", "-0.01"),
    ("pose.min_torso_length", "2"),
    ("pose.check_left_right", "maybe"),
    ("pose.max_lr_length_ratio", "0.5"),
    ("pose.lr_min_separation", "-1"),
    ("quality.round_fractions", "[]"),
    ("quality.round_fractions", "[0.05, 0.01]"),
    ("quality.round_fractions", "[0.1, 0.1]"),
    ("quality.round_fractions", "[0, 0.5]"),
    ("quality.round_fractions", "[0.5, 1.5]"),
    ("quality.min_round_size", "0"),
    ("quality.classifier", "xgboost"),
    ("quality.retrain_min_new_labels", "0"),
    ("quality.grid_page_size", "0"),
    ("quality.grid_page_size", "201"),
    ("quality.recheck_fraction", "-0.1"),
    ("quality.recheck_fraction", "0.9"),
    ("quality.verify_fraction", "-0.1"),
    ("quality.verify_fraction", "0.6"),
    ("quality.keep_classes", "[]"),
    ("quality.keep_classes", "[excellent]"),
    ("quality.keep_classes", "[good, good]"),
    *PREFILTER_BAD_VALUES,
    ("dedup.threshold", "0"),
    ("dedup.threshold", "1.01"),
    ("dedup.threshold", ".nan"),
    ("dedup.threshold", "0.8"),  # below the floor candidate pairs are stored at
    ("dedup.phash_max_distance", "-1"),
    ("dedup.phash_max_distance", "9"),  # beyond the distance candidate pairs are stored at
    ("dedup.phash_max_distance", "6.5"),
    ("dedup.parent_child", "maybe"),
]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_set_refuses_a_meaningless_value(key: str, value: str):
    with pytest.raises(SettingsError) as exc:
        set_setting(CurationSettings(), key, value)
    assert str(exc.value).startswith(f"{key}={value}: {key}")
    assert exc.value.key in (key, f"{key}[0]", f"{key}[1]")  # a list item's own index where it has one
    assert "\n" not in str(exc.value)


def test_every_value_field_is_covered_by_a_bad_value():
    sections = {"clip", "clip.image_rules", "pose", "quality", "prefilter", "prefilter.exclude_tags",
                "prefilter.require_tags", "dedup"}
    assert {k for k in setting_keys() if k not in sections} == {key for key, _ in BAD_VALUES}


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_file_refuses_what_set_refuses(tmp_path: Path, key: str, value: str):
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * depth}{name}:\n" for depth, name in enumerate(sections))
    text += f"{'  ' * len(sections)}{leaf}: {value}\n"
    error = load_error(write(tmp_path, text))
    assert error.key in (key, f"{key}[0]", f"{key}[1]")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("clip.keep_fracton", "0.3", "clip.keep_fracton: unknown key (did you mean clip.keep_fraction?)"),
        ("keep_fraction", "0.3", "keep_fraction: unknown key (did you mean clip.keep_fraction?)"),
        ("nonexistent.key", "3", "nonexistent: unknown key; valid sections: clip, pose, quality"),
        ("clip.foo", "3", "clip.foo: unknown key; valid keys under clip: positive_prompts"),
        ("clip.keep_fraction", "[1", "clip.keep_fraction: not a YAML value"),
        ("clip..x", "1", "'clip..x' is not a key"),
        ("clip.keep_fraction.x", "1", "clip.keep_fraction is a value, not a section"),
        ("pose.required_inside", "[nose, hip_lef]", "unknown keypoint 'hip_lef' (did you mean hip_left?)"),
        ("quality.keep_classes", "[excellent]", "unknown label class 'excellent'; valid: good, questionable, bad"),
        ("clip.positive_prompts", "[]", "an empty list; use null for the built-in defaults"),
    ],
)
def test_set_names_the_key_and_the_closest_valid_one(key: str, value: str, expected: str):
    with pytest.raises(SettingsError) as exc:
        set_setting(CurationSettings(), key, value)
    assert expected in str(exc.value)


@pytest.mark.parametrize(
    "key, value, attribute, expected",
    [
        ("clip.keep_fraction", "1", lambda s: s.clip.keep_fraction, 1.0),
        ("clip.fixed_threshold", "0", lambda s: s.clip.fixed_threshold, 0.0),
        ("clip.fixed_threshold", "null", lambda s: s.clip.fixed_threshold, None),
        ("clip.positive_prompts", "['  a cat  ']", lambda s: s.clip.positive_prompts, ["a cat"]),
        ("pose.margin", "-0.1", lambda s: s.pose.margin, -0.1),
        ("pose.required_inside", "[]", lambda s: s.pose.required_inside, []),
        ("pose.check_left_right", "false", lambda s: s.pose.check_left_right, False),
        ("quality.round_fractions", "[0.5, 1]", lambda s: s.quality.round_fractions, [0.5, 1.0]),
        ("quality.classifier", "mlp", lambda s: s.quality.classifier, "mlp"),
        ("quality.keep_classes", "[good]", lambda s: s.quality.keep_classes, ["good"]),
        ("clip", "null", lambda s: s.clip, CurationSettings().clip),
    ],
)
def test_set_accepts_edge_values(key, value, attribute, expected):
    assert attribute(set_setting(CurationSettings(), key, value)) == expected


def test_pose_rules_in_run_config_meet_the_same_constraints():
    with pytest.raises(ValueError, match="unknown keypoint 'tail'"):
        PoseRules(required_inside=["tail"])
    with pytest.raises(ValueError, match="finite"):
        PoseRules.model_validate({"ratio_mad_k": float("nan")})
    with pytest.raises(ValueError, match="Extra inputs"):
        PoseRules.model_validate({"ratio_mad": 3})


def test_resource_failure_names_file_and_key(tmp_path: Path):
    path = write(tmp_path, "clip:\n  keep_fraction: 7\n")
    resource = SettingsResource(path=str(path))
    with pytest.raises(dg.Failure) as exc:
        resource.load()
    assert exc.value.description.startswith(f"settings file {path}: clip.keep_fraction:")
    assert exc.value.metadata["key"].value == "clip.keep_fraction"


def test_dagster_run_failure_message_names_file_and_key(tmp_path: Path):
    path = write(tmp_path, "quality:\n  classifier: xgboost\n")

    @dg.asset
    def reads_settings(settings: SettingsResource):
        return settings.load().quality.classifier

    result = dg.materialize(
        [reads_settings], resources={"settings": SettingsResource(path=str(path))}, raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message
    assert f"settings file {path}: quality.classifier: Input should be 'logreg' or 'mlp' (got 'xgboost')" in message


def test_materialization_says_where_its_settings_came_from(tmp_path: Path):
    from danbooru_assets.devtools.sandbox import Sandbox

    sandbox = Sandbox(tmp_path / "dataset", tmp_path)
    path = sandbox.settings_path

    def source() -> str:
        return sandbox.metadata(sandbox.materialize(["prompt_embeddings"]), "prompt_embeddings")["settings_source"]

    assert source() == f"defaults (no file at {path})"
    path.write_text("# nothing set yet\n")
    assert source() == f"defaults ({path} holds no settings)"
    save_settings(path, set_setting(CurationSettings(), "clip.positive_prompts", "[a dancer]"))
    assert source() == "settings file"
    path.write_text("clip:\n  positive_prompts: []\n")
    result = sandbox.materialize(["prompt_embeddings"], raise_on_error=False)
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert f"settings file {path}: clip.positive_prompts: an empty list" in failure.step_failure_data.error.message


def test_settings_file_at_a_url_round_trips(tmp_path):
    # memory:// stands for s3://: the settings next to tables that several machines share.
    import fsspec

    from danbooru_assets.settings import CurationSettings, load_settings, save_settings, set_setting, settings_source

    url = f"memory://settings-{tmp_path.name}/settings.yaml"
    assert settings_source(url) == f"defaults (no file at {url})"
    save_settings(url, set_setting(CurationSettings(), "clip.keep_fraction", "0.3"))
    fs = fsspec.filesystem("memory")
    assert [p for p in fs.ls(f"/settings-{tmp_path.name}", detail=False) if "tmp" in p] == []  # no temporary left
    assert load_settings(url).clip.keep_fraction == 0.3
    assert settings_source(url) == "settings file"
    fs.pipe(url, b"clip:\n  keep_fraction: 7\n")
    with pytest.raises(SettingsError, match=rf"settings file {url}: clip.keep_fraction"):
        load_settings(url)


def _number_keys() -> list[str]:
    """Every dotted key whose value is a number or a list of numbers."""
    from danbooru_assets.settings import _takes_numbers

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from walk(field.annotation, f"{prefix}{name}.")
            elif _takes_numbers(field.annotation):
                yield prefix + name

    return list(walk(CurationSettings))


@pytest.mark.parametrize("key", _number_keys())
@pytest.mark.parametrize("value", ["true", "yes", "false", "off"])
def test_numbers_refuse_booleans(key: str, value: str, tmp_path: Path):
    # YAML reads these as booleans; pydantic's lax mode would save 1.0 and 0.0.
    shown = f"[{value}]" if key == "quality.round_fractions" else value
    with pytest.raises(SettingsError) as exc:
        set_setting(CurationSettings(), key, shown)
    assert f"{key}: Input should be a number, not a boolean" in str(exc.value)
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * depth}{name}:\n" for depth, name in enumerate(sections))
    assert load_error(write(tmp_path, text + f"{'  ' * len(sections)}{leaf}: {shown}\n")).key == key


def test_number_keys_cover_the_known_cases():
    assert {"clip.keep_fraction", "dedup.threshold", "pose.min_confidence", "quality.round_fractions",
            "prefilter.min_score", "clip.image_rules.min_side"} <= set(_number_keys())
    assert "pose.check_left_right" not in _number_keys()


class _CountingStr(str):
    comparisons = 0

    def __eq__(self, other):
        type(self).comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_prompt_validation_is_linear():
    from danbooru_assets.settings import _checked_names

    names = [_CountingStr(f"prompt {i}") for i in range(2000)]
    _CountingStr.comparisons = 0
    assert _checked_names(names, list(names), "prompt") == names
    # One set and one count: a few comparisons per name, not one per pair (4 million).
    assert _CountingStr.comparisons <= 10 * len(names)
    with pytest.raises(ValueError, match="prompt listed twice: prompt 7"):
        _checked_names([*names, "prompt 7"], [*names, "prompt 7"], "prompt")


def test_a_step_reads_the_file_once_for_settings_and_source(tmp_path, monkeypatch):
    """Issue 19: load() and source() each read the file, so a step could see two versions."""
    from danbooru_assets import settings as settings_module
    from danbooru_assets.orchestration.resources import SettingsResource
    from danbooru_assets.settings import CurationSettings, save_settings

    path = tmp_path / "settings.yaml"
    save_settings(path, CurationSettings())
    reads = []
    real = settings_module.read_settings_data
    monkeypatch.setattr(settings_module, "read_settings_data", lambda p: reads.append(p) or real(p))
    read = SettingsResource(path=str(path)).read()
    assert reads == [str(path)] and read.source == "settings file"
    rules, source = read.resolve(read.settings.pose, {"min_confidence": 0.5})
    assert rules.min_confidence == 0.5 and source == "run config" and len(reads) == 1
