"""`lalm <command>`: dispatch to one module per command.

Each command module defines `add_arguments(parser)` and `run(args) -> int | None`; its
docstring is the command's help. Modules are imported only when their command runs, so
`lalm chat` never pays for FastAPI and `lalm serve` never pays for the corpus builder.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lalm.errors import LalmError

COMMANDS = {
    "chat": "lalm.cli.chat",
    "generate": "lalm.cli.generate",
    "data": "lalm.data.cli",
    "train": "lalm.train.cli",
    "eval": "lalm.eval.cli",
    "serve": "lalm.serve.cli",
    "demo": "lalm.demo",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lalm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _usage() -> str:
    lines = ["usage: lalm <command> [options]   (lalm --version: the installed version)", "", "commands:"]
    for name in COMMANDS:
        lines.append(f"  {name:<10} (lalm {name} --help)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"lalm {_version()}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"lalm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(
        prog=f"lalm {name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except LalmError as e:
        # Bad input is the user's to fix: one line, non-zero exit, no traceback.
        print(f"lalm {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
