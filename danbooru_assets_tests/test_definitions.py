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
    assert len(keys) >= 20  # the settings sections and every stage
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
