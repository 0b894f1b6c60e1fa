"""What the CPU and GPU benchmarks share: their output options, where the JSON goes, and
what goes to stdout (the table, or with --json the result as JSON; progress on stderr)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_FOLDER = Path("benchmarks") / "results"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as the rest of the command line
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_common_args(ap: argparse.ArgumentParser, kind: str, losses) -> None:
    ap.add_argument("--losses", nargs="+", default=list(losses), choices=list(losses),
                    metavar="LOSS", help=f"the losses to time (default all: "
                    f"{', '.join(losses)})")
    ap.add_argument("--out", metavar="PATH", default=None,
                    help=f"where the JSON result goes: a file ending in .json, or a folder "
                         f"that gets {kind}-<machine>-<date>.json (default: the folder "
                         f"{DEFAULT_FOLDER}/ under the current one)")
    ap.add_argument("--json", action="store_true",
                    help="print the result as JSON on stdout instead of the table")


def output_path(out: str | None, name: str) -> Path:
    """The JSON file to write: `out` itself when it names a .json file, else `name` in the
    folder `out` (default benchmarks/results/), created if missing."""
    path = Path(out) if out else DEFAULT_FOLDER
    if path.suffix.lower() != ".json":
        path = path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def progress(row: dict) -> None:
    """One line per finished case, on stderr: stdout stays the table or the JSON."""
    print(json.dumps(row), file=sys.stderr, flush=True)


def finish(result: dict, path: Path, as_json: bool, table) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")
    if as_json:
        print(json.dumps(result))
    else:
        table()
        print(f"wrote {path.resolve()}")
