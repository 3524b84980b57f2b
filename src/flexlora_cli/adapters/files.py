"""PEFT's adapter file names, and reading an adapter folder's small JSON files with bounds.

Pure Python (no torch, no PEFT): the CLI reads configs before it needs anything heavy.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from flexlora_cli.errors import AdapterError, FlexLoraError

# The names PEFT's save_pretrained writes (peft.utils.constants; a test checks they still agree).
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

# An adapter_config.json is a few KB; these bounds only stop hostile or broken files early.
MAX_JSON_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 64  # PEFT's configs nest 3 levels; deep nesting would only exhaust the stack later

_NOT_REGULAR = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def read_json(
    path: str | Path,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    error: type[FlexLoraError] = AdapterError,
) -> object:
    """A small JSON file, read with bounds: a regular file of at most `max_bytes`, UTF-8, nested at
    most `max_depth` deep. Any problem raises `error(path, ...)` with a one-line reason."""
    return parse_json(read_bounded(path, max_bytes=max_bytes, error=error), path, max_depth=max_depth, error=error)


def read_bounded(path: str | Path, *, max_bytes: int = MAX_JSON_BYTES, error: type[FlexLoraError] = AdapterError) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; never blocks on a FIFO or reads a device."""
    try:
        _check_regular(path, os.stat(path), max_bytes, error)
        # O_NONBLOCK: should the path be swapped for a FIFO after the check, open does not wait for
        # a writer, and the fstat below refuses it.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        _check_regular(path, os.fstat(fd), max_bytes, error)
        chunks, remaining = [], max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 2**20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise error(path, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:  # it grew after the size check
        raise error(path, f"is larger than {_size(max_bytes)}; expected a small JSON file")
    return data


def parse_json(
    data: bytes | str,
    source: object,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    error: type[FlexLoraError] = AdapterError,
) -> object:
    """JSON text (UTF-8 bytes or str) parsed with bounded nesting; problems raise `error(source, ...)`."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise error(source, "cannot read: not UTF-8 text") from None
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise error(source, f"invalid JSON: {exc}") from None
    except RecursionError:
        raise error(source, f"JSON nested more than {max_depth} levels deep") from None
    except ValueError as exc:  # Python's limit on digits in an integer literal
        digits = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else None
        limit = f"more than {digits} digits" if digits else "too many digits"
        raise error(source, f"invalid JSON: a number with {limit} ({type(exc).__name__})") from None
    check_depth(value, source, max_depth=max_depth, error=error)
    return value


def check_depth(
    value: object, source: object, *, max_depth: int = MAX_JSON_DEPTH, error: type[FlexLoraError] = AdapterError
) -> None:
    """Refuse JSON-like data (dicts and lists) nested more than `max_depth` deep, without recursing."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise error(source, f"JSON nested more than {max_depth} levels deep")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _check_regular(path, info: os.stat_result, max_bytes: int, error: type[FlexLoraError]) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise error(path, "is a folder, not a JSON file")
    if not stat.S_ISREG(info.st_mode):
        kind = _NOT_REGULAR.get(stat.S_IFMT(info.st_mode))
        raise error(path, f"is {kind}, not a regular file" if kind else "is not a regular file")
    if info.st_size > max_bytes:
        raise error(path, f"is {_size(info.st_size)}; expected a small JSON file (at most {_size(max_bytes)})")


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count} bytes"
