"""File-system steps the adapters room needs beyond pathlib: atomic renames (Linux renameat2), flushing
to disk, plain file modes, whether a process lives, reproducible timestamps, and a test hook."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from flexlora_cli.errors import OptionError


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):  # someone else's process, or no signal 0 here
        return True
    return True


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


@functools.lru_cache(maxsize=1)
def _renameat2_function():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # libc older than glibc 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def renameat2(first: Path, second: Path, flags: int) -> bool:
    """Linux renameat2 with `flags`; False where the platform or file system does not support it."""
    function = _renameat2_function()
    if function is None:
        return False
    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    return renameat2(first, second, RENAME_EXCHANGE)


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: Path, folder: bool = False, umask: int | None = None) -> None:
    """Give `path` the mode a plain file or folder gets from the umask (0644/0755 under umask 022)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~(_umask() if umask is None else umask))


def plain_modes(root: Path) -> None:
    """Writers that go through a temporary file (safetensors) leave 0600: outputs get plain modes."""
    umask = _umask()
    plain_mode(root, folder=True, umask=umask)
    for folder, subfolders, files in os.walk(root):
        for name in subfolders:
            plain_mode(Path(folder, name), folder=True, umask=umask)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                plain_mode(Path(folder, name), umask=umask)


def sync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())]:
        sync_folder(path)


def sync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder to flush it
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def pause_for_tests(variable: str) -> None:
    """Test hook: sleep for the seconds in the environment variable, or, if it names a file (a gate),
    wait while that file exists (at most 10 minutes), so that a test can act at this exact point."""
    value = os.environ.get(variable)
    if not value:
        return
    try:
        seconds = float(value)
    except ValueError:
        deadline = time.monotonic() + 600
        while os.path.lexists(value) and time.monotonic() < deadline:
            time.sleep(0.02)
        return
    time.sleep(seconds)


def timestamp() -> str:
    """Now, ISO-8601 UTC; SOURCE_DATE_EPOCH (reproducible-builds.org) fixes it when set."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    try:
        if not epoch.isdigit():
            raise ValueError
        moment = datetime.fromtimestamp(int(epoch), timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise OptionError(
            "SOURCE_DATE_EPOCH", f"must be a whole number of seconds since 1970-01-01 UTC, got {epoch[:40]!r}"
        ) from None
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
