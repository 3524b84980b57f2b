"""Writing PEFT adapter folders, all-or-nothing.

Every output is built in a temporary sibling folder and moved into place only when complete,
so an interrupted run (Ctrl-C, kill, full disk) leaves either the old state or the whole new
output, never a part. A run killed with SIGKILL cannot clean up its hidden temporary sibling
(`.NAME.<pid>.<random>.partial`); the next run that writes NAME removes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from flexlora_cli.errors import OutputError

MODEL_CARD_NAME = "README.md"
# Test hook: seconds to sleep after each file written, so that tests/test_atomic.py can kill a
# real run in the middle of writing.
_PAUSE_ENV = "FLEXLORA_TEST_PAUSE_WRITES"


def check_output(target: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse, before any work, an output that would clobber data or cannot be written."""
    resolved = target.resolve()
    for source in inputs:
        source = source.resolve()
        if resolved == source or source in resolved.parents:
            raise OutputError(target, f"is inside the input {source}; inputs are never modified")
        if resolved in source.parents:
            raise OutputError(target, f"contains the input {source}; choose another output folder")
    if target.exists():
        if not target.is_dir():
            raise OutputError(target, "exists and is not a folder")
        if any(target.iterdir()) and not overwrite:
            raise OutputError(target, "exists and is not empty", hint="pass --overwrite to replace it")
    parent = _existing_ancestor(resolved.parent)
    if not parent.is_dir():
        raise OutputError(target, f"cannot write: {parent} is a file, not a folder")
    try:  # a real probe: permission bits say nothing for root, read-only mounts or ACLs
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe.", dir=parent))
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise OutputError(target, f"cannot write in {parent} ({reason})") from None


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `target` only if the block completes.

    OS errors while writing (full disk, permissions) become OutputError, with nothing left behind.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(target)
        staging = _hidden_sibling(target, "partial")
    except OSError as error:
        raise OutputError(target, f"cannot write: {error.strerror or error}") from None
    try:
        yield staging
        _sync_tree(staging)  # some file systems report a full disk only when flushing
        _move_into_place(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(target, f"cannot write: {error.strerror or error}; nothing was written") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_adapter(
    folder: Path, config: LoraConfig, tensors: dict[str, torch.Tensor], card: str | None = None
) -> None:
    """A standard PEFT adapter folder: adapter_config.json + adapter_model.safetensors (+ card)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(config_json(config), encoding="utf-8")
    _pause_for_tests()
    contiguous = {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}
    save_file(contiguous, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    _pause_for_tests()
    if card is not None:
        (folder / MODEL_CARD_NAME).write_text(card, encoding="utf-8")


def config_json(config: LoraConfig) -> str:
    """PEFT's adapter_config.json text, with sets sorted so that reruns write identical bytes.

    (PEFT's own save_pretrained writes sets in hash order, which changes from run to run.)
    """
    fields = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    return json.dumps(fields, indent=2, sort_keys=True)


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(staging, target)  # onto nothing or an empty folder: one atomic rename
    elif _exchange(staging, target):  # target is now the new output; staging holds the old one
        shutil.rmtree(staging, ignore_errors=True)
    else:
        # No atomic exchange here (not Linux, or a file system without it): two renames. A crash
        # between them leaves the old output whole in a hidden sibling, and no partial output.
        retired = _hidden_sibling(target, "old")
        os.replace(target, retired / target.name)
        try:
            os.replace(staging, target)
        except OSError:
            os.replace(retired / target.name, target)  # put the old output back
            raise
        finally:
            shutil.rmtree(retired, ignore_errors=True)
    with contextlib.suppress(OSError):  # make the rename durable; the output is complete either way
        _sync_folder(target.parent)


def _hidden_sibling(target: Path, kind: str) -> Path:
    """A new folder `.NAME.<pid>.<random>.<kind>` beside target (the pid lets a later run see it is stale).

    Made with mkdir rather than tempfile.mkdtemp, whose 0700 mode would become the output's.
    """
    for _ in range(100):
        folder = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # libc older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _remove_stale_staging(target: Path) -> None:
    """Delete temporary siblings of `target` left by runs that were killed (their process is gone)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]+\.(partial|old)")
    for leftover in target.parent.glob(f".{target.name}.*"):
        match = pattern.fullmatch(leftover.name)
        if match and leftover.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or a platform without signal 0
        return True
    return True


def _sync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        _sync_folder(path)


def _sync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder to flush it
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _pause_for_tests() -> None:
    seconds = os.environ.get(_PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
