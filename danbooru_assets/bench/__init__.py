"""Benchmarks: ``python -m danbooru_assets.bench <name> --help``.

Each benchmark measures the project's code against a naive baseline side by side in one
run and prints both figures and their ratio. Performance targets are checked here, never
in timed unit tests.
"""
