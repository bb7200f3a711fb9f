"""Dispatch ``python -m danbooru_assets.bench <name> [args]`` to ``bench/<name>.py``."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import danbooru_assets.bench as bench_pkg


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in names:
        print("usage: python -m danbooru_assets.bench {%s} [--help]" % ",".join(names))
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(f"danbooru_assets.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
