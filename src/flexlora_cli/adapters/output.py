"""Owning and replacing an output folder OUT, all or nothing, one run at a time.

Every verb writes through one context manager::

    with OutputFolder(target, inputs=[folders and files read], overwrite=False, command="aggregate") as out:
        ...                                  # OUT is checked and locked here, before any computation
        write_adapter(out.staging / "alice", ...)   # a hidden sibling of OUT, made on first access
        out.commit({"inputs": [...]})        # manifest, then one atomic move into place

What it promises:

- **Ownership.** flexlora writes `flexlora_manifest.json` at the root of every output. `--overwrite`
  replaces an empty folder or a folder holding that manifest, nothing else; without it, only a
  missing or empty OUT is written.
- **Inputs are never modified.** OUT may not equal, contain or lie inside an input, symlinks resolved
  (an input folder, and every symlink directly inside it, such as a weight file linked into OUT).
- **No lost updates.** A lock (the `filelock` package) in the hidden sibling `.OUT.lock` is held from
  the start checks to the end and removed afterwards; a second run on the same OUT fails at once. The
  final move replaces only what the start check saw: onto a missing OUT it is a no-replace rename
  (Linux renameat2 RENAME_NOREPLACE; elsewhere a mkdir placeholder then a rename, which a folder made
  in between makes fail); onto an existing OUT an atomic exchange (RENAME_EXCHANGE) whose displaced
  folder must be the one seen at the start (same inode, same manifest, or still empty), else it is
  swapped back. Without RENAME_EXCHANGE, two renames: a crash between them leaves the old output
  whole in a hidden sibling, never a partial one.
- **Truthful exits.** Leaving the block without commit(), or with an exception, removes the staging
  folder and anything this run created, and leaves OUT as it was; exceptions passing through carry
  `output_state` = "old" (OUT untouched) or "new" (OUT holds this run's complete output). The move
  and its cleanup run with SIGINT/SIGTERM deferred (main thread, Python-level handlers), so a signal
  cannot split them; `committing()` tells a signal handler that the move has begun.

Runs killed with SIGKILL leave their hidden siblings (`.OUT.<pid>.<hex>.partial`/`.old`) and an
unlocked `.OUT.lock`; the next run on OUT removes the former and reuses the latter.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexlora_cli.adapters.filesystem import (
    RENAME_NOREPLACE,
    exchange,
    pause_for_tests,
    plain_modes,
    process_alive,
    renameat2,
    sync_folder,
    sync_tree,
    timestamp,
)
from flexlora_cli.errors import FlexLoraError, OutputError

MANIFEST_NAME = "flexlora_manifest.json"
MAX_MANIFEST_BYTES = 2**20
WRITTEN_BY = "flexlora"
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
# Hidden siblings are `.STEM.<pid>.<8 hex>.partial` (29 bytes around STEM with a 10-digit pid) or
# `.STEM.lock`; STEM is OUT's name, shortened with a hash when OUT's name leaves less room.
_SIBLING_ROOM = NAME_MAX - 32
_KINDS = ("partial", "old", "probe")
# Test hook: seconds to sleep right after the final move, so that a test can signal a real run there.
_PAUSE_AFTER_MOVE_ENV = "FLEXLORA_TEST_PAUSE_AFTER_MOVE"
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))

_committing = False


def committing() -> bool:
    """True from the moment a commit starts moving its output into place until the process ends.

    A CLI signal handler reads this to ignore SIGINT/SIGTERM from then on: the run then finishes
    and exits 0 with OUT complete, instead of reporting an interruption after OUT was replaced.
    (Reset only if that move fails, OUT being left as it was.)
    """
    return _committing


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest flexlora wrote at the root of `folder`, or None if there is none that is ours.

    Bounded: a symlink, a non-regular or oversized file, or damaged JSON counts as not ours.
    """
    raw = _manifest_bytes(Path(folder))
    return None if raw is None else json.loads(raw)


@dataclass(frozen=True)
class _State:
    """What OUT was at the start check: absent, an empty folder, or a folder holding our manifest."""

    kind: str
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the folder
    manifest: str | None = None  # sha256 of its manifest's bytes


class OutputFolder:
    """Check, lock and atomically replace the output folder `target`; see the module docstring.

    Args:
        target: OUT, as the user gave it (messages name it so).
        inputs: folders and files the run reads; OUT may not equal, contain or lie inside any of them.
        overwrite: allow replacing a folder that holds flexlora's manifest.
        command: recorded in the manifest (e.g. "aggregate").
    """

    def __init__(
        self, target: str | Path, inputs: Iterable[str | Path] = (), *, overwrite: bool = False, command: str | None = None
    ):
        self.given = str(target)
        self.inputs = [Path(item) for item in inputs]
        self.overwrite, self.command = overwrite, command
        self.target = _absolute(Path(target), self.given)
        self._stem = _sibling_stem(self.target.name)
        self._lock: tuple[Any, Path, int | None] | None = None
        self._staging: Path | None = None
        self._start: _State | None = None
        self._created: list[Path] = []
        self._committed = False

    # --- the checks, before any work ------------------------------------------------------------

    def check(self) -> None:
        """Run every start check (and take and drop the lock once) without holding OUT.

        For callers that cannot hold the lock across their work: entering the block later re-checks,
        and refuses an OUT that changed in between.
        """
        with self:
            pass

    def __enter__(self) -> OutputFolder:
        try:
            self._open()
        except BaseException:
            self._close()
            raise
        return self

    def _open(self) -> None:
        if self._lock is not None:
            raise RuntimeError("this OutputFolder is already in use")
        timestamp()  # a malformed SOURCE_DATE_EPOCH fails now, not after the work
        if self.target.parent == self.target:
            raise OutputError(self.given, "is the root of the file system", hint="choose an output folder")
        self._check_inputs()
        self._make_parent()
        self._take_lock()
        _remove_stale_siblings(self.target.parent, self._stem)
        if self._start is None:
            self._start = self._state()
        else:  # check() ran before the work: what it saw must still hold
            self._recheck()
        self._committed = False

    def _check_inputs(self) -> None:
        out = self.target.resolve()
        for shown, real in _input_paths(self.inputs):
            via = f" (linked from {shown})" if shown.is_symlink() else ""
            if real == out or real in out.parents:
                raise OutputError(self.given, f"is inside the input {real}{via}; inputs are never modified")
            if out in real.parents:
                raise OutputError(
                    self.given, f"contains the input {real}{via}; inputs are never modified",
                    hint="choose another output folder",
                )

    def _make_parent(self) -> None:
        parent = self.target.parent
        ancestor = parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(self.given, f"cannot write: {ancestor} is a file, not a folder")
        missing = [parent, *parent.parents][: len(parent.parts) - len(ancestor.parts)]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            # A real probe: permission bits say nothing for root, read-only mounts or ACLs.
            os.rmdir(self._sibling("probe"))
        except OSError as error:
            where = self._created[-1] if self._created else ancestor
            raise OutputError(self.given, f"cannot write in {where} ({_reason(error)})") from None

    def _take_lock(self) -> None:
        from filelock import FileLock, Timeout

        path = self.target.parent / f".{self._stem}.lock"
        for attempt in range(20):
            holder = _lock_holder(path)  # before trying: filelock 3.x truncates the file when it opens it
            lock = FileLock(str(path), timeout=0)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                if not os.path.lexists(path) and attempt < 19:  # its holder just finished and removed it
                    continue
                pid = f" (pid {holder})" if holder else ""
                raise OutputError(
                    self.given, f"another flexlora run is writing this output folder{pid}",
                    hint="wait for it to finish, or choose another output folder",
                ) from None
            except OSError as error:
                raise OutputError(self.given, f"cannot write in {path.parent} ({_reason(error)})") from None
            context = getattr(lock, "_context", None)
            fd = None if getattr(context, "soft_fallback", False) else getattr(context, "lock_file_fd", None)
            if fd is None or _names(path, fd):
                self._lock = (lock, path, fd)
                if fd is not None and os.name == "posix":
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)
                        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return
            lock.release()  # a finishing run removed this file after we opened it: lock the new one
        raise OutputError(self.given, f"cannot lock {path}: it keeps being replaced")

    def _state(self) -> _State:
        try:
            info = os.lstat(self.target)
        except FileNotFoundError:
            return _State("absent")
        except OSError as error:
            raise OutputError(self.given, f"cannot read: {_reason(error)}") from None
        if stat.S_ISLNK(info.st_mode):
            raise OutputError(
                self.given, "is a symbolic link; an output replaces a folder, it does not follow links",
                hint="give the folder it points to, or another output folder",
            )
        if not stat.S_ISDIR(info.st_mode):
            raise OutputError(self.given, "exists and is not a folder")
        identity = (info.st_dev, info.st_ino)
        if _is_empty(self.target, self.given):
            state = _State("empty", identity)
        else:
            raw = _manifest_bytes(self.target)
            if raw is None and self.overwrite:
                raise OutputError(
                    self.given, f"exists and was not written by flexlora (no {MANIFEST_NAME})",
                    hint="choose another output folder or empty it",
                )
            if raw is None:
                raise OutputError(self.given, "exists and is not empty", hint="choose another output folder or empty it")
            if not self.overwrite:
                raise OutputError(self.given, "exists and is not empty", hint="pass --overwrite to replace it")
            state = _State("ours", identity, hashlib.sha256(raw).hexdigest())
        cwd = _cwd()
        if state.kind != "ours" and cwd is not None and (cwd == self.target or self.target in cwd.parents):
            where = "is the current folder" if cwd == self.target else "contains the current folder"
            raise OutputError(self.given, f"{where}, which flexlora did not write", hint="choose another output folder")
        return state

    # --- writing --------------------------------------------------------------------------------

    @property
    def staging(self) -> Path:
        """The hidden sibling folder to write the output into (created on first access)."""
        if self._lock is None:
            raise RuntimeError("OutputFolder.staging is only available inside its `with` block")
        if self._committed:
            raise RuntimeError("this output was already committed")
        if self._staging is None:
            try:
                self._staging = self._sibling("partial")
            except OSError as error:
                raise OutputError(self.given, f"cannot write: {_reason(error, capital=True)}") from None
        return self._staging

    def commit(self, manifest: dict[str, Any] | None = None, before_move: Callable[[Path], None] | None = None) -> None:
        """Write the manifest, run `before_move(staging)`, flush, and move the output into place.

        The manifest is `manifest` plus written_by, version, command and time (ISO-8601 UTC, from
        SOURCE_DATE_EPOCH when set). Raises OutputError, with OUT untouched, if OUT changed since the
        start check (created, replaced or filled by someone else).
        """
        from flexlora_cli import __version__

        staging = self.staging
        self._recheck()  # fail before before_move (e.g. a push) if OUT already changed
        record = {**(manifest or {}), "written_by": WRITTEN_BY, "version": __version__, "command": self.command, "time": timestamp()}
        (staging / MANIFEST_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if before_move is not None:
            before_move(staging)
        plain_modes(staging)
        sync_tree(staging)  # some file systems report a full disk only when flushing
        self._move(staging)
        with contextlib.suppress(OSError):  # make the rename durable; the output is complete either way
            sync_folder(self.target.parent)

    def _move(self, staging: Path) -> None:
        global _committing
        with _signals_deferred(lambda: "new" if self._committed else "old"):
            _committing = True
            try:
                if self._start.kind == "absent" or not os.path.lexists(self.target):
                    self._place(staging)
                    retired = None
                else:
                    retired = self._swap(staging)
                self._committed, self._staging = True, None
            finally:
                if not self._committed:
                    _committing = False
            pause_for_tests(_PAUSE_AFTER_MOVE_ENV)
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
            _follow_current_folder(self.target, retired)

    def _place(self, staging: Path) -> None:
        """Move staging onto a missing OUT without ever replacing what may have appeared there."""
        try:
            if not renameat2(staging, self.target, RENAME_NOREPLACE):
                if os.name == "nt":  # Windows' rename never replaces an existing folder
                    os.rename(staging, self.target)
                else:  # claim the name, then replace our own empty placeholder
                    os.mkdir(self.target)
                    try:
                        os.rename(staging, self.target)
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.rmdir(self.target)  # only while it is still our empty placeholder
                        raise
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise self._created_error() from None
            raise

    def _swap(self, staging: Path) -> Path:
        """Exchange staging and OUT; return where the old OUT now is (to delete)."""
        self._recheck()
        if exchange(staging, self.target):
            if self._state_of(staging) == self._start:
                return staging
            try:
                exchange(staging, self.target)  # not what we checked: put it back
            except OSError:
                self._committed, self._staging = True, None  # OUT holds our output; keep what we found
                raise OutputError(
                    self.given, f"was changed by someone else during the run; this run's output is in place and "
                    f"the folder found there is kept in {staging}",
                ) from None
            raise self._changed_error()
        retired = self._sibling("old")
        old = retired / "previous"
        os.rename(self.target, old)
        if self._state_of(old) != self._start:
            os.rename(old, self.target)
            shutil.rmtree(retired, ignore_errors=True)
            raise self._changed_error()
        try:
            self._place(staging)
        except BaseException:
            try:
                os.rename(old, self.target)  # put the old output back
                shutil.rmtree(retired, ignore_errors=True)
            except OSError:
                raise OutputError(
                    self.given, f"was created by another program while being replaced; the previous output is in {old}"
                ) from None
            raise
        return retired

    def _recheck(self) -> None:
        """Refuse (OutputError) if OUT is no longer what the start check saw (a vanished OUT is fine)."""
        if self._start.kind == "absent":
            if os.path.lexists(self.target):
                raise self._created_error()
        elif os.path.lexists(self.target) and self._state_of(self.target) != self._start:
            raise self._changed_error()

    def _state_of(self, folder: Path) -> _State | None:
        """`folder` described as the start check describes OUT (None if it is not a folder)."""
        try:
            info = os.lstat(folder)
        except OSError:
            return None
        if not stat.S_ISDIR(info.st_mode):
            return None
        identity = (info.st_dev, info.st_ino)
        if self._start.kind == "empty":
            return _State("empty", identity) if _is_empty(folder, self.given) else None
        raw = _manifest_bytes(folder)
        return _State("ours", identity, hashlib.sha256(raw).hexdigest()) if raw is not None else None

    # --- leaving --------------------------------------------------------------------------------

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            self._close()
        except BaseException as late:  # e.g. a second Ctrl-C while cleaning up
            _mark(late, "new" if self._committed else "old")
            raise
        if error is None:
            return False
        _mark(error, "new" if self._committed else "old")
        if not self._committed and _is_write_error(error, self.target.parent, self._stem):
            reason = _write_reason(error)
            raise OutputError(self.given, f"cannot write: {reason}; nothing was written") from None
        return False

    def _close(self) -> None:
        try:
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None
        finally:
            try:
                self._drop_lock()
            finally:
                if not self._committed:
                    for folder in reversed(self._created):
                        try:
                            os.rmdir(folder)
                        except OSError:
                            break
                self._created = []

    def _drop_lock(self) -> None:
        if self._lock is None:
            return
        lock, path, fd = self._lock
        self._lock = None
        try:
            # Remove the file while still holding it: a run that opened it meanwhile finds it
            # unlinked after locking, and retries on the path's new file.
            if fd is not None and _names(path, fd):
                os.unlink(path)
        except OSError:
            pass
        finally:
            lock.release()

    # --- helpers --------------------------------------------------------------------------------

    def _sibling(self, kind: str) -> Path:
        return _hidden_sibling(self.target.parent, self._stem, kind)

    def _created_error(self) -> OutputError:
        return OutputError(
            self.given, "was created by someone else while this run was working; it was left untouched and nothing was written",
            hint="choose another output folder, or move that folder away and run again",
        )

    def _changed_error(self) -> OutputError:
        return OutputError(
            self.given, "was changed by someone else while this run was working; it was left untouched and nothing was written",
            hint="run again once nothing else writes there",
        )


# --- paths and names ---------------------------------------------------------------------------------


def _absolute(target: Path, given: str) -> Path:
    """OUT as an absolute path with its parent resolved (its own last component kept as given)."""
    try:
        path = target if target.is_absolute() else Path.cwd() / target
    except OSError as error:
        raise OutputError(given, f"cannot resolve: the current folder is gone ({_reason(error)})") from None
    if path.name in ("", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def _sibling_stem(name: str) -> str:
    """OUT's name, or a shortened one plus a hash when hidden siblings would exceed NAME_MAX."""
    if len(os.fsencode(name)) <= _SIBLING_ROOM:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    prefix = ""
    for char in name:
        if len(os.fsencode(prefix + char)) > _SIBLING_ROOM - len(digest) - 1:
            break
        prefix += char
    return f"{prefix}~{digest}"


def _hidden_sibling(parent: Path, stem: str, kind: str) -> Path:
    """A new folder `.STEM.<pid>.<random>.<kind>` in parent (the pid lets a later run see it is stale).

    Made with mkdir rather than tempfile.mkdtemp, whose 0700 mode would become the output's.
    """
    for _ in range(100):
        folder = parent / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent))


def _remove_stale_siblings(parent: Path, stem: str) -> None:
    """Delete hidden siblings of OUT left by runs that were killed (their process is gone)."""
    pattern = re.compile(rf"\.{re.escape(stem)}\.(\d+)\.[0-9a-f]+\.({'|'.join(_KINDS)})")
    prefix, leftovers = f".{stem}.", []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        leftovers = [e for e in entries if e.name.startswith(prefix) and pattern.fullmatch(e.name)]
    for entry in leftovers:
        pid = int(pattern.fullmatch(entry.name).group(1))
        if entry.is_dir(follow_symlinks=False) and not process_alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)


def _input_paths(inputs: Iterable[Path]) -> Iterator[tuple[Path, Path]]:
    """(as given, resolved) for each input, and for each symlink directly inside an input folder."""
    for item in inputs:
        yield item, item.resolve()
        links = []
        if item.is_dir():
            with contextlib.suppress(OSError), os.scandir(item) as entries:
                links = [Path(entry.path) for entry in entries if entry.is_symlink()]
            for link in links:
                yield link, link.resolve()


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:
        return None


def _follow_current_folder(target: Path, retired: Path | None) -> None:
    """If this process worked inside the old OUT (`-o .`), step into the new one: the old is gone."""
    if retired is not None and _cwd() is None:
        with contextlib.suppress(OSError):
            os.chdir(target)


def _is_empty(folder: Path, given: str) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError as error:
        raise OutputError(given, f"cannot read: {_reason(error)}") from None


def _manifest_bytes(folder: Path) -> bytes | None:
    """Our manifest's bytes in `folder`, or None: missing, a symlink, not ours, or damaged."""
    from flexlora_cli.adapters.files import parse_json, read_bounded

    path = folder / MANIFEST_NAME
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        raw = read_bounded(path, max_bytes=MAX_MANIFEST_BYTES, error=OutputError)
        value = parse_json(raw, path, error=OutputError)
    except (OSError, FlexLoraError):
        return None
    return raw if isinstance(value, dict) and value.get("written_by") == WRITTEN_BY else None


# --- the lock --------------------------------------------------------------------------------------


def _names(path: Path, fd: int) -> bool:
    """Does `path` still name the (linked) file open as `fd`?"""
    try:
        held = os.fstat(fd)
        return held.st_nlink > 0 and os.path.samestat(os.lstat(path), held)
    except OSError:
        return False


def _lock_holder(path: Path) -> int | None:
    """The pid a running flexlora wrote into the lock file, if any."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else None


# --- moving ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _signals_deferred(state: Callable[[], str]) -> Iterator[None]:
    """Hold SIGINT/SIGTERM (their Python handlers) for the block, then deliver them, marking the
    exception they raise with the output's state. Only the main thread can set handlers; signals
    never interrupt other threads' Python code anyway."""
    caught: list[tuple[int, Any]] = []
    previous: dict[int, Callable] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            handler = signal.getsignal(signum)
            if callable(handler):
                previous[signum] = handler
                signal.signal(signum, lambda number, frame: caught.append((number, frame)))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum, frame in caught:
            try:
                previous[signum](signum, frame)
            except BaseException as interrupt:
                _mark(interrupt, state())
                raise


def _mark(error: BaseException, state: str) -> None:
    """Tell whoever catches `error` what OUT holds: "old" (untouched) or "new" (this run's output)."""
    if getattr(error, "output_state", None) is None:
        with contextlib.suppress(AttributeError):
            error.output_state = state


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_SAFETENSORS_OS_ERROR = re.compile(r"Error while serializing: I/O error: (.*?)(?: \(os error (\d+)\))?$")


def _is_write_error(error: BaseException, parent: Path, stem: str) -> bool:
    """Is `error` the file system refusing our writes (not, say, an input that cannot be read)?"""
    if type(error).__name__ == "SafetensorError":
        return bool(_SAFETENSORS_OS_ERROR.match(str(error)))
    if not isinstance(error, OSError):
        return False
    if error.errno in _WRITE_ERRNOS:
        return True
    ours = str(parent / f".{stem}.")
    return any(name is not None and str(name).startswith(ours) for name in (error.filename, error.filename2))


def _write_reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    match = _SAFETENSORS_OS_ERROR.match(str(error))
    code = match.group(2) if match else None
    return os.strerror(int(code)) if code else (match.group(1) if match else str(error))


def _reason(error: OSError, capital: bool = False) -> str:
    text = error.strerror or str(error)
    return text if capital else text.lower()
