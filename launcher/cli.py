"""The `sdarts` command: dispatch only. Each subcommand lives in `launcher/commands/<name>.py`
and exposes `add_parser(subparsers)` and `run(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.common import fail_cleanly, setup_logging  # noqa: E402

COMMANDS = ("summary", "nb201", "export", "plot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdarts", description="Single-DARTS tools")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"launcher.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"launcher.commands.{name}":
                raise
            continue
        mod.add_parser(sub)
        modules[name] = mod
    args = parser.parse_args(argv)
    setup_logging()
    with fail_cleanly():
        return int(modules[args.command].run(args) or 0)
    return 2


if __name__ == "__main__":
    sys.exit(main())
