"""A stand-in for a model server or a worker process in tests of the start script.

It records how it was started (argv, environment, pid, process group) in `<record>/started.json`,
prints the `--say` lines, then either exits at once (`--exit-code`) or waits for SIGTERM/SIGINT,
appending each signal's name to `<record>/signals`.

    python fake_process.py --record DIR [--say LINE]... [--exit-code N] [--ignore-term]
                           [--term-exit-code N] [--usr1-exit-code N] [ARGS...]

SIGUSR1 makes it exit with `--usr1-exit-code`: a test's way to make it die on cue.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", type=Path, required=True, help="folder for what it saw")
    parser.add_argument("--say", action="append", default=[], help="a line to print")
    parser.add_argument("--exit-code", type=int, help="exit with this status right away")
    parser.add_argument("--ignore-term", action="store_true", help="record SIGTERM, keep going")
    parser.add_argument("--term-exit-code", type=int, default=0, help="status after SIGTERM")
    parser.add_argument("--usr1-exit-code", type=int, default=1, help="status after SIGUSR1")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="recorded, otherwise unused")
    return parser.parse_args(argv)


def record_start(folder: Path, args: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    started = {
        "args": args,
        "env": dict(os.environ),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
    }
    partial = folder / "started.json.partial"
    partial.write_text(json.dumps(started))
    partial.replace(folder / "started.json")  # atomic: a reader never sees half a file


def main(argv: list[str]) -> int:
    options = parse(argv)
    signals_file = options.record / "signals"

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        with signals_file.open("a") as file:
            file.write(name + "\n")
        if not (options.ignore_term and signum == signal.SIGTERM):
            sys.exit(options.term_exit_code)

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        sys.exit(options.usr1_exit_code)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, on_usr1)
    record_start(options.record, options.args)
    for line in options.say:
        print(line, flush=True)
    if options.exit_code is not None:
        return int(options.exit_code)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
