"""Reading inputs and writing outputs for the command line, with size caps; the
`--config FILE` option as every command that reads the config file takes it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from milter_wkd.config import DEFAULT_PATH
from milter_wkd.errors import Refused


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """--config FILE, default None: `config.load` then reads DEFAULT_PATH. A missing file,
    given or default, ends the command: `config.ConfigMissing`, exit 2."""
    parser.add_argument("--config", metavar="FILE",
                        help=f"configuration file (default: {DEFAULT_PATH})")


def read_input(path: str | None, limit: int) -> bytes:
    """Read a file (or stdin for None or '-'), refusing more than limit octets."""
    try:
        if path in (None, "-"):
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with Path(path).open("rb") as handle:
                data = handle.read(limit + 1)
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise Refused(f"input is over the limit of {limit} octets")
    return data


def write_output(path: str | None, data: bytes) -> None:
    if path in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        Path(path).write_bytes(data)
    except OSError as exc:
        raise Refused(f"cannot write {path}: {exc.strerror}") from None
