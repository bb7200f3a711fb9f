"""``danbooru-assets``: the command line.

- ``danbooru-assets sample-data DIR``: generate the bundled sample dataset.
- ``danbooru-assets run``: the main job — materialize the whole graph for every shard
  that has data, stage by stage, recorded in the Dagster instance (``$DAGSTER_HOME``).
- ``danbooru-assets label``: the labeling page for the current ``labeling_queue``.
- ``danbooru-assets export DIR``: the curated dataset as a manifest, keypoint JSON and
  WebDataset shards.
- ``danbooru-assets settings show|set``: the durable curation settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import time
from pathlib import Path


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show Dagster's debug event log")
    parser.add_argument(
        "--force", action="store_true",
        help="run every stage, even one whose inputs, settings and code are unchanged since its last successful run",
    )
    parser.add_argument(
        "--shards",
        help="comma-separated shard keys (e.g. 0042,0107); default: every shard folder that has images",
    )
    parser.add_argument(
        "--image-folder", choices=("original", "512px"),
        help="image folder under the root (sets DANBOORU_IMAGE_FOLDER); default: the only one there is",
    )


def _materialized_summary(result) -> str:
    """``asset=rows`` once per asset, summed over its shards (a range run records one
    materialization per shard, each with that shard's row count)."""
    rows: dict[str, object] = {}
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        value = mat.metadata.get("dagster/row_count")
        name = mat.asset_key.to_user_string()
        if value is None:
            rows.setdefault(name, None)
        else:
            rows[name] = (rows.get(name) or 0) + value.value
    return ", ".join(f"{k}={v}" if v is not None else k for k, v in rows.items())


def failed_check_lines(result) -> list[str]:
    """One line per failed asset check of a run (what the UI shows on the asset's checks)."""
    lines = []
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.passed:
            continue
        severity = getattr(evaluation.severity, "value", str(evaluation.severity)).lower()
        why = evaluation.description or ", ".join(
            f"{k}={getattr(v, 'value', v)}" for k, v in list(evaluation.metadata.items())[:3]
        )
        lines.append(f"    check {evaluation.asset_key.to_user_string()}:{evaluation.check_name} failed ({severity}): {why}")
    return lines


class ProgressBar(logging.Handler):
    """Draws the shard loop's progress records (``danbooru_assets.progress``) as one line
    that updates in place on a terminal, and as a line every few seconds elsewhere."""

    def __init__(self, stream=None, width: int = 30):
        super().__init__(logging.INFO)
        self.stream = stream or sys.stdout
        self.width = width
        self.tty = self.stream.isatty()
        self.last_print = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        done, total = getattr(record, "done", 0), getattr(record, "total", 0)
        seconds, images = getattr(record, "seconds", 0.0), getattr(record, "images", 0)
        finished = done == total
        if not self.tty and not finished and time.monotonic() - self.last_print < 5:
            return
        self.last_print = time.monotonic()
        filled = int(self.width * done / total) if total else self.width
        rate = images / seconds if seconds > 0 else 0.0
        eta = seconds / done * (total - done) if done else 0.0
        line = (
            f"    {getattr(record, 'stage', '')} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{done}/{total} shards, {rate:,.0f}/s, ETA {eta:.0f}s"
        )
        self.stream.write(("\r" + line + ("\n" if finished else "")) if self.tty else line + "\n")
        self.stream.flush()


def run_main_job(args: argparse.Namespace) -> int:
    from danbooru_assets import config
    from danbooru_assets.core.shards import parse_shard_list

    try:  # checked before anything is generated or started
        chosen = parse_shard_list(args.shards) if args.shards is not None else None
    except ValueError as exc:
        print(f"error: --shards {args.shards}: {exc}", file=sys.stderr)
        return 2

    if args.image_folder:  # before definitions load: the dataset resource reads the variable
        import os

        os.environ["DANBOORU_IMAGE_FOLDER"] = args.image_folder
    home = config.ensure_dagster_home()
    config.set_planned_events_default()
    if config.using_sample_data():
        from danbooru_assets.devtools.sample_data import (
            RUN_SAMPLE_IMAGES,
            generate_sample_dataset,
            write_sample_settings,
        )

        root = config.dataset_root()
        print(f"DANBOORU_ROOT is not set: using the bundled sample dataset at {root}")
        summary = generate_sample_dataset(root, n_images=RUN_SAMPLE_IMAGES)
        print(f"  sample dataset: {summary.n_images_written} images in {len(summary.shards)} shards")
        if write_sample_settings(config.settings_path()):
            print(f"  wrote the sample's demo settings to {config.settings_path()} (clip.keep_fraction=0.8)")

    import dagster as dg

    from danbooru_assets.dataset.layout import DatasetLayout, DatasetRootError, resolve_image_folder
    from danbooru_assets.definitions import RUN_STAGES, defs
    from danbooru_assets.orchestration.assets.settings import section_observations
    from danbooru_assets.orchestration.partitions import range_tags, shard_ranges
    from danbooru_assets.orchestration.run_report import (
        curated_note,
        demo_model_note,
        output_asset_keys,
        stage_summary,
        warning_lines,
    )
    from danbooru_assets.orchestration.shard_runs import progress_logger
    from danbooru_assets.settings import SettingsError, load_settings

    try:  # a bad settings file stops the run here, in one line, before any job starts
        settings = load_settings(config.settings_path())
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        dataset = DatasetLayout(config.dataset_root(), resolve_image_folder(config.dataset_root(), config.image_folder()))
        dataset.check_root()
    except DatasetRootError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shards = chosen if chosen is not None else dataset.shards_with_images()
    if not shards:
        print(f"error: no shard folders with images under {dataset.root_path / dataset.image_folder}", file=sys.stderr)
        return 2
    ranges = shard_ranges(shards)
    print(
        f"dataset {dataset.root_path}: {len(shards)} shards in {len(ranges)} range{'s' if len(ranges) > 1 else ''}; "
        f"Dagster instance in {home}"
    )
    if note := demo_model_note():
        print(note)
    instance = dg.DagsterInstance.get()
    asset_keys = output_asset_keys(defs.assets or [])
    outputs: dict[str, dict] = {}
    from danbooru_assets.orchestration.stale_runs import (
        cli_run_tags,
        new_run_id,
        recover_dead_runs,
        reporting_pool_waits,
    )

    # A killed earlier run must not keep its pool slot: nothing else frees it here.
    recover_dead_runs(instance, say=print)
    # The settings sections' data versions, so the UI can tell when a later edit makes
    # these materializations stale.
    for observation in section_observations(settings, "danbooru-assets run"):
        instance.report_runless_asset_event(observation)
    progress_logger.setLevel(logging.INFO)
    progress_logger.propagate = False
    bar = ProgressBar()
    progress_logger.addHandler(bar)
    started = time.perf_counter()
    # Warnings are printed after each run, one line per kind (run_report); --verbose: all, live.
    log_level = "DEBUG" if args.verbose else "ERROR"
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    from danbooru_assets.definitions import IMAGE_FREE_STAGES, JOB_ASSETS, PER_SHARD_STAGES
    from danbooru_assets.orchestration.stage_fingerprints import Stage, StageFingerprints

    fingerprints = StageFingerprints(
        home, config.storage_base(), dataset.root_path, settings, shards, instance, image_folder=dataset.image_folder
    )
    skipped: list[str] = []
    try:
        for index, job in enumerate(RUN_STAGES):
            earlier = [j.name for j in RUN_STAGES[:index]]
            stage = Stage.of(job.name, JOB_ASSETS[job.name], reads_images=job.name not in IMAGE_FREE_STAGES)
            decision = fingerprints.check(stage, earlier) if not args.force else None
            if decision is not None and decision.skip:
                skipped.append(job.name)
                done = decision.record.get("summary", {})
                outputs.update(done.get("outputs", {}))
                print(f"== {job.name}: skipped, {decision.reason} ({done.get('line', '')})", flush=True)
                continue
            why = f": {decision.reason}" if decision is not None else ": --force"
            job_def = defs.resolve_job_def(job.name)
            stage_ranges = ranges
            if decision is not None and job.name in PER_SHARD_STAGES:
                changed = fingerprints.changed_shards(stage, earlier, shards)
                if changed is not None and len(changed) < len(shards):
                    stage_ranges = shard_ranges(changed)
                    why += f"; only the {len(changed)} shard{'s' if len(changed) > 1 else ''} whose inputs changed"
            runs: list[dict[str, str]] = [range_tags(a, b) for a, b in stage_ranges] if job_def.partitions_def else [{}]
            print(f"== {job.name} ({len(runs)} run{'s' if len(runs) > 1 else ''}){why}", flush=True)
            previous = fingerprints.read(job.name)
            before = fingerprints.storage_files()
            fingerprints.forget(job.name)
            lines: list[str] = []
            stage_outputs: dict[str, dict] = {}
            for tags in runs:
                t0 = time.perf_counter()
                run_id = new_run_id()
                with reporting_pool_waits(instance, run_id, say=lambda line: print(line, flush=True)):
                    result = job_def.execute_in_process(
                        run_config=run_config, instance=instance, tags={**tags, **cli_run_tags()},
                        raise_on_error=False, run_id=run_id,
                    )
                label = f"shards {tags['dagster/asset_partition_range_start']}..{tags['dagster/asset_partition_range_end']}" if tags else job.name
                took = time.perf_counter() - t0
                checks = failed_check_lines(result)  # printed whether the run failed or not
                if not result.success:
                    failure = next((e for e in result.all_events if e.is_step_failure), None)
                    reason = failure.step_failure_data.error.message.strip() if failure else "see the run in the UI"
                    print(f"  {label}: FAILED after {took:.1f}s (run {result.run_id})\n{reason}", *checks, sep="\n")
                    return 1
                summary = stage_summary(result, asset_keys)
                outputs.update(summary.metadata)
                stage_outputs.update(summary.metadata)
                lines.append(summary.line() or _materialized_summary(result))
                print(f"  {label}: {summary.line() or _materialized_summary(result)} ({took:.1f}s)", *checks, sep="\n", flush=True)
                if not args.verbose:
                    for line in warning_lines(instance, result.run_id):
                        print(f"    {line}")
            fingerprints.record(stage, earlier, before, previous, {"line": "; ".join(lines), "outputs": stage_outputs})
    finally:
        progress_logger.removeHandler(bar)
    if note := curated_note(outputs):
        print(note)
    if skipped:
        print(f"skipped {len(skipped)} of {len(RUN_STAGES)} stages (nothing they read had changed; --force runs them all)")
    print(f"done in {time.perf_counter() - started:.1f}s. Browse it: `danbooru-assets ui` (DAGSTER_HOME={home})")
    return 0


def settings_command(args: argparse.Namespace) -> int:
    from danbooru_assets import config
    from danbooru_assets.settings import (
        SettingsError,
        assign,
        describe_change,
        load_settings,
        read_settings_data,
        setting_value,
        validate_settings,
        write_assignments,
    )

    path = config.settings_path()
    if args.settings_action == "show":
        try:
            settings = load_settings(path)
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        import yaml

        print(f"# {path}{'' if path.exists() else ' (not written yet: defaults)'}")
        print(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
        return 0
    try:
        data = read_settings_data(path) or {}
    except SettingsError as exc:
        print(f"error: {exc}; fix or delete the file first", file=sys.stderr)
        return 2
    try:
        before = validate_settings(data, str(path))
    except SettingsError:
        before = None  # a value this set may fix; every section counts as changed
    assigned: list[tuple[str, str]] = []
    for assignment in args.assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            print(f"error: expected KEY=VALUE, got {assignment!r}; {path} unchanged", file=sys.stderr)
            return 2
        try:
            data = assign(data, key.strip(), value)
        except SettingsError as exc:
            print(f"error: {assignment}: {exc}; {path} unchanged", file=sys.stderr)
            return 2
        assigned.append((key.strip(), assignment))
    try:
        settings = validate_settings(data, f"settings file {path}")
        # Only the keys given are written (comments, order and the rest of the file stay).
        write_assignments(path, [(key, setting_value(settings, data, key)) for key, _ in assigned], settings)
    except SettingsError as exc:
        culprit = _blamed_assignment(exc.key or "", assigned)
        message = f"{culprit}: {exc.detail}" if culprit else str(exc)
        print(f"error: {message}; {path} unchanged", file=sys.stderr)
        return 2
    for key in dict.fromkeys(key for key, _ in assigned):
        print(describe_change(key, before, settings))
    changed = report_settings_change(before, settings)
    print(f"saved {path}; changed sections: {', '.join(changed) or 'none'}"
          + (" (observed: the UI marks the assets that read them stale)" if changed else ""))
    return 0


def _blamed_assignment(bad_key: str, assigned: list[tuple[str, str]]) -> str | None:
    """The ``KEY=VALUE`` that set ``bad_key`` (or a key under it, or the section it made);
    ``None`` when the bad key was in the file already."""

    def within(inner: str, outer: str) -> bool:
        return inner == outer or inner.startswith((f"{outer}.", f"{outer}["))

    return next((a for key, a in assigned if within(bad_key, key) or within(key, bad_key)), None)


def report_settings_change(before, after) -> list[str]:
    """Record the new data version of each changed settings section in the Dagster
    instance (``$DAGSTER_HOME``, default ``.dagster_home``), so staleness shows at once."""
    from danbooru_assets import config
    from danbooru_assets.orchestration.assets.settings import section_observations
    from danbooru_assets.settings import section_asset_name, section_hashes

    old, new = (section_hashes(before) if before is not None else {}), section_hashes(after)
    changed = [name for name in new if old.get(name) != new[name]]
    if changed:
        import dagster as dg

        config.ensure_dagster_home()
        names = {section_asset_name(n) for n in changed}
        with dg.DagsterInstance.get() as instance:
            for observation in section_observations(after, "danbooru-assets settings set"):
                if observation.asset_key.to_user_string() in names:
                    instance.report_runless_asset_event(observation)
            # The stale-shard count on each per-shard asset's settings_current check.
            from danbooru_assets.orchestration.staleness import settings_check_evaluations

            for evaluation in settings_check_evaluations(instance, after):
                instance.report_runless_asset_event(evaluation)
    return changed


def export_command(args: argparse.Namespace) -> int:
    """The curated dataset as a manifest, keypoint JSON files (+ tarball) and WebDataset shards."""
    from pathlib import Path

    from danbooru_assets import config
    from danbooru_assets.export.curated import export_curated
    from danbooru_assets.orchestration.resources import StorageResource

    try:
        counts = export_curated(
            StorageResource(base_path=config.storage_base()), config.dataset_root(), Path(args.out), args.samples_per_shard
        )
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"{counts['images']} images → {out / 'manifest.parquet'}")
    print(f"{counts['keypoint_files']} keypoint files → {out / 'keypoints'}/ and {out / 'keypoints.tar.gz'} (seed format, [y, x])")
    print(f"{counts['shards']} WebDataset shards → {out / 'webdataset'}/")
    return 0


def _add_command(
    sub, name: str, func, add_arguments, help: str, description: str | None = None, **parser_options
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description, **parser_options)
    add_arguments(p)
    p.set_defaults(func=func)
    return p


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="WebDataset samples per tar (default 1000)")


def why_command(args: argparse.Namespace) -> int:
    """Why one image was kept or dropped: its row in every stored stage table."""
    from danbooru_assets import config
    from danbooru_assets.why import trace_image

    print("\n".join(trace_image(config.storage_base(), args.image_id).lines()))
    return 0


def shards_command(args: argparse.Namespace) -> int:
    """The shards that have images, as the exact selection to backfill them."""
    from danbooru_assets import config
    from danbooru_assets.dataset.layout import DatasetLayout, DatasetRootError
    from danbooru_assets.orchestration.partitions import shard_selection

    dataset = DatasetLayout(config.dataset_root())
    try:
        dataset.check_root()
    except DatasetRootError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shards = dataset.shards_with_images()
    if not shards:
        print(f"error: no shard folders with images under {dataset.root_path / dataset.image_folder}", file=sys.stderr)
        return 2
    print("\n".join(shard_selection(shards, args.asset)))
    return 0


def ui_launch(host: str, port: int) -> tuple[list[str], dict[str, str], Path]:
    """The ``dg dev`` command line, environment and folder for the UI over the CLI's instance.

    ``dg dev`` started in the project folder warns that the ``dagster.yaml`` there "will not
    be used" whenever ``DAGSTER_HOME`` is another folder (it is the template the CLI copies
    into the instance). Started in ``DAGSTER_HOME`` with the code location named (``-m``),
    it reads the instance's own copy and has nothing to warn about; the working-directory
    defaults are pinned first, so it reads the same sample, tables, settings and labels."""
    from danbooru_assets import config

    home = config.ensure_dagster_home()
    config.set_planned_events_default()
    env = {**os.environ, **config.working_directory_defaults()}
    dg = Path(sys.executable).with_name("dg")
    command = [str(dg) if dg.exists() else "dg", "dev", "-m", "danbooru_assets.definitions",
               "-h", host, "-p", str(port)]
    return command, env, home


def ui_command(args: argparse.Namespace) -> int:
    """Start Dagster's UI (webserver and daemon) over the instance ``run`` wrote to."""
    command, env, home = ui_launch(args.host, args.port)
    print(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home}); Ctrl+C stops it", flush=True)
    os.chdir(home)
    os.execvpe(command[0], command, env)  # the UI's own process from here on: Ctrl+C reaches it
    return 0  # not reached


def _add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=3000, help="port (default 3000)")


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, argparse.SUPPRESS, False):
            text += " (default: %(default)s)"
        return text


def _settings_keys_help() -> str:
    """Every key ``settings set`` takes, with its default."""
    import json

    from danbooru_assets.settings import CurationSettings, setting_keys, setting_value

    defaults = CurationSettings()
    lines = ["keys (default):"]
    for key in setting_keys():
        value = setting_value(defaults, {}, key)
        if not isinstance(value, dict):  # sections are listed through their keys
            shown = json.dumps(value)
            lines.append(f"  {key} ({shown if len(shown) <= 50 else shown[:47] + '...'})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from danbooru_assets.devtools.sample_data import add_sample_data_arguments, run_sample_data
    from danbooru_assets.labels.app import add_label_arguments, run_label

    parser = argparse.ArgumentParser(
        prog="danbooru-assets",
        description="Curate Danbooru-style illustration datasets (a Dagster code location). "
        "Start with `danbooru-assets run` (the sample data when DANBOORU_ROOT is unset), then `danbooru-assets ui` to browse.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_command(
        sub, "sample-data", run_sample_data, add_sample_data_arguments, "generate the deterministic sample dataset in DIR"
    )
    _add_command(
        sub,
        "run",
        run_main_job,
        _add_run_arguments,
        "materialize every asset for every shard with data (the main job)",
        "Materialize the asset graph stage by stage for every shard with data, "
        "recording runs in the Dagster instance at $DAGSTER_HOME (default .dagster_home). "
        "With DANBOORU_ROOT unset, the bundled sample dataset is generated first if absent.",
    )
    _add_command(
        sub,
        "label",
        run_label,
        add_label_arguments,
        "serve the labeling page for the current labeling_queue",
        "Serve the labeling page (localhost by default): keys 1 good, 2 questionable, "
        "3 bad, z undo, s skip, k skeleton (after a conflict: o overwrite, n keep theirs). Each tab is its "
        "own session. Labels go to the label store: a SQLite file, or a Postgres database for several "
        "machines (--store or DANBOORU_LABELS, e.g. postgresql+psycopg2://user@host:5432/labels).",
        formatter_class=_DefaultsHelpFormatter,  # shows --port's default
    )
    _add_command(sub, "export", export_command, _add_export_arguments, "export the curated dataset for training")
    _add_command(
        sub, "ui", ui_command, _add_ui_arguments,
        "open Dagster's UI (dg dev: webserver and daemon) over the instance `run` wrote to",
    )
    _add_command(
        sub, "why", why_command,
        lambda p: p.add_argument("image_id", type=int, help="the post id, e.g. 123042"),
        "why one image was kept or dropped (its row in every stored stage table)",
    )
    _add_command(
        sub, "shards", shards_command,
        lambda p: p.add_argument("--asset", default="clip_subset", help="the asset in the printed commands (default clip_subset)"),
        "the shards that have images, as the exact partition selection to backfill them",
    )

    p = sub.add_parser("settings", help="show or change the durable curation settings")
    settings_sub = p.add_subparsers(dest="settings_action", required=True)
    settings_sub.add_parser("show", help="print the settings in force")
    ps = settings_sub.add_parser(
        "set",
        help="set values, e.g. clip.keep_fraction=0.3",
        description=textwrap.fill(
            "Set the given keys in the settings file ($DANBOORU_SETTINGS, default data/settings.yaml) "
            "and nothing else: comments, key order and other keys stay. VALUE is YAML (0.3, null, [a, b]). "
            "Prints each key's old and new value."
        ),
        epilog=_settings_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    p.set_defaults(func=settings_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
