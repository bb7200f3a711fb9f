"""The code location: light to load, valid, documented, and the only place Dagster meets
the library."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg

PACKAGE = Path(__file__).resolve().parent.parent / "danbooru_assets"
README = PACKAGE.parent / "README.md"
HEAVY = ("torch", "open_clip", "pandas", "numpy", "pyarrow", "PIL", "sklearn", "matplotlib")
LIBRARY_PACKAGES = ("core", "dataset", "clip", "pose", "quality", "labels", "export", "dedup")


def test_loading_the_code_location_imports_no_heavy_library():
    # A fresh interpreter: this test process has imported them all already.
    code = (
        "import json, sys\n"
        "import danbooru_assets.definitions\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('danbooru_assets.devtools'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    heavy, devtools = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert heavy == []
    assert devtools == []  # production definitions never load the sample-data generator


def test_definitions_validate_and_every_asset_is_described_and_grouped():
    from danbooru_assets.definitions import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = list(graph.get_all_asset_keys())
    # Exactly the public asset keys (a rename or a lost asset fails here, not in a user's UI).
    assert sorted(k.to_user_string() for k in keys) == sorted([
        "danbooru_metadata", "shard_index", "metadata_prefilter", "clip_embeddings", "image_stats",
        "prompt_embeddings", "clip_scores", "clip_threshold", "clip_subset", "near_duplicates",
        "published_keypoints", "pose_keypoints", "pose_statistics", "pose_subset", "labels", "quality_model",
        "quality_predictions", "labeling_queue", "curated_dataset",
        *(f"settings_{s}" for s in ("prompts", "clip_threshold", "image_rules", "prefilter", "pose_rules", "dedup",
                                    "quality")),
    ])
    undescribed = [k.to_user_string() for k in keys if not graph.get(k).description]
    ungrouped = [k.to_user_string() for k in keys if not graph.get(k).group_name or graph.get(k).group_name == "default"]
    assert undescribed == []
    assert ungrouped == []


def test_every_job_the_readme_names_resolves():
    from danbooru_assets.definitions import defs

    named = set(re.findall(r"\b([a-z][a-z_]*_job)\b", README.read_text()))
    # A benchmark named after a job (`python -m danbooru_assets.bench main_job`) is not one.
    named -= {p.stem for p in (Path(__file__).parents[1] / "danbooru_assets" / "bench").glob("*.py")}
    assert {"prepare_job", "shard_job", "rethreshold_job"} <= named
    for job in sorted(named):
        assert defs.resolve_job_def(job).name == job


def test_set_variables_reach_resources_as_env_vars(monkeypatch, tmp_path):
    """A variable that is set is wired as ``dg.EnvVar`` (the UI names it); unset, the default."""
    from danbooru_assets import definitions

    monkeypatch.setenv("DANBOORU_STORAGE", str(tmp_path / "tables"))
    monkeypatch.delenv("DANBOORU_SETTINGS", raising=False)
    storage = definitions.env_or("DANBOORU_STORAGE", "unused")
    assert isinstance(storage, dg.EnvVar) and storage.env_var_name == "DANBOORU_STORAGE"
    assert storage.get_value() == str(tmp_path / "tables")
    assert definitions.env_or("DANBOORU_SETTINGS", "data/settings.yaml") == "data/settings.yaml"
    assert not isinstance(definitions.env_or("DANBOORU_SETTINGS", "x"), dg.EnvVar)


def test_pose_estimator_wiring_follows_the_environment(monkeypatch, tmp_path):
    from danbooru_assets import definitions

    monkeypatch.setenv("DANBOORU_ROOT", str(tmp_path))
    monkeypatch.delenv("DANBOORU_KEYPOINTS", raising=False)
    monkeypatch.setenv("DANBOORU_POSE_BACKEND", "bizarre_pose")
    monkeypatch.setenv("DANBOORU_BIZARRE_POSE_REPO", str(tmp_path / "repo"))
    model = definitions.pose_estimator_resource()
    assert isinstance(model.backend, dg.EnvVar) and model.backend.get_value() == "bizarre_pose"
    assert model.bizarre_pose_repo.get_value() == str(tmp_path / "repo")

    monkeypatch.setenv("DANBOORU_KEYPOINTS", str(tmp_path / "kp.tar.gz"))
    files = definitions.pose_estimator_resource()
    assert files.backend == "keypoint_files"
    assert files.keypoint_files.get_value() == str(tmp_path / "kp.tar.gz")


def _dagster_imports(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "dagster"]
    return found


def test_library_packages_do_not_import_dagster():
    files = [p for pkg in LIBRARY_PACKAGES for p in sorted((PACKAGE / pkg).glob("*.py"))] + [PACKAGE / "settings.py"]
    assert len(files) > len(LIBRARY_PACKAGES)
    offenders = [hit for path in files for hit in _dagster_imports(path)]
    assert offenders == []


def test_the_dagster_import_check_finds_each_form(tmp_path):
    # The check above must be able to fail.
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nimport dagster as dg\nfrom dagster._core import x\n\ndef f():\n    from dagster import asset\n")
    assert _dagster_imports(probe, tmp_path) == ["probe.py:2 dagster", "probe.py:3 dagster._core", "probe.py:6 dagster"]


# Reads that follow a global input's settings only to check it is current (settings_guard):
# quality_predictions checks quality_model against quality.classifier; declaring the
# section would make its eager condition fire on every round-plan edit.
GUARD_ONLY_SETTINGS = {"quality_predictions"}


def test_lineage_declares_every_source_a_step_reads():
    """Issue 19: an asset that opens the label store depends on ``labels``; one that reads the
    settings file depends on the sections it reads (near_duplicates' keep rule prefers labeled
    good, so labeling must mark it stale)."""
    from danbooru_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    checked = {"labels": 0, "settings": 0}
    for key in graph.get_all_asset_keys():
        name = key.to_user_string()
        if name == "labels" or name.startswith("settings_"):
            continue  # the sources themselves
        resources = set(defs.resolve_assets_def(key).required_resource_keys)
        parents = {p.to_user_string() for p in graph.get(key).parent_keys}
        if "label_store" in resources:
            checked["labels"] += 1
            assert "labels" in parents, f"{name} opens the label store but does not depend on labels"
        if "settings" in resources and name not in GUARD_ONLY_SETTINGS:
            checked["settings"] += 1
            assert any(p.startswith("settings_") for p in parents), f"{name} reads settings but declares no section"
    assert checked["labels"] >= 4 and checked["settings"] >= 10  # near_duplicates, quality_model, queue, curated


def test_every_imported_package_is_declared():
    """Issue 19: sqlalchemy, yaml and pydantic were imported but not declared in pyproject.toml."""
    import importlib.metadata
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    declared = {norm(re.split(r"[<>=!\[ ;]", spec)[0]) for spec in specs}
    distributions = importlib.metadata.packages_distributions()
    modules = set()
    for path in (root / "danbooru_assets").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m != "danbooru_assets"}
    undeclared = sorted(
        m for m in third_party if not any(norm(d) in declared for d in distributions.get(m, [m]))
    )
    assert len(third_party) > 15 and undeclared == []
