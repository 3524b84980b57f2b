"""The differential-privacy ledger: a small JSON file carrying a federation's private rounds from round
to round, so that each round reports the (epsilon, delta) of all rounds so far.

    {"format": "flexlora-dp-ledger", "version": 1,
     "federation": {"id": "<random hex>", "base_model": "...", "modules": "<sha256 of the module layout>"},
     "rounds": [{"noise_multiplier": 1.1, "sampling_rate": 1.0, "time": "2026-11-30T12:00:00Z"}, ...],
     "sha256": "<sha256 of the rest, canonical JSON>"}

It holds public facts only (no clients, norms or seeds). A federation is one base model and one set of
adapted modules (names and shapes): a round of another is refused, as is a file that is not a ledger,
whose checksum does not match (edited or damaged), or that changed while the round ran.

Writing (`Ledger.commit`): the new content goes to a hidden temporary sibling, is flushed, and replaces
the file with one atomic rename. The round calls it before its output is released (pushed or moved into
place), so a crash after it over-counts one round and never under-counts; `Ledger.restore` puts the old
content back when the round failed without releasing anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flexlora_cli.adapters.files import parse_json, read_bounded
# The output folder's helpers for the same jobs: liveness of a temporary's writer, durable renames, time.
from flexlora_cli.adapters.filesystem import process_alive, sync_folder, timestamp
from flexlora_cli.errors import OptionError, OutputError

LEDGER_FORMAT = "flexlora-dp-ledger"
LEDGER_VERSION = 1
MAX_LEDGER_BYTES = 16 * 2**20
_NEW_FEDERATION_HINT = "each federation keeps its own ledger: give this federation's, or a new path to start one"


def federation_fingerprint(base_model: str | None, modules: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """What identifies a federation in its ledger: the base model and a hash of the module layout."""
    layout = "\n".join(f"{name}\t{shape[0]}\t{shape[1]}" for name, shape in sorted(modules.items()))
    return {"base_model": base_model, "modules": hashlib.sha256(layout.encode()).hexdigest()}


class Ledger:
    """One federation's ledger, read and checked before a round's work (`open`), written with its output."""

    def __init__(self, path: Path, federation: dict[str, Any], rounds: list[dict[str, Any]], seen: bytes | None):
        self.path, self.federation, self.rounds = path, federation, rounds
        self._seen = seen  # the file's bytes when read; None: there was no ledger yet
        self.committed = False

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict[str, Any], *, output: Path, inputs: Iterable[Path] = ()) -> Ledger:
        """The ledger at `path` (a new one if the file does not exist), checked to be this federation's."""
        path = Path(path)
        _check_location(path, output, inputs)
        _remove_stale_temporaries(path)
        if not os.path.lexists(path):
            return cls(path, {"id": secrets.token_hex(8), **fingerprint}, [], None)
        if path.is_symlink():
            raise OptionError(path, "is a symbolic link; the ledger is replaced atomically each round, so give the file itself")
        raw = read_bounded(path, max_bytes=MAX_LEDGER_BYTES, error=OptionError)
        document = parse_json(raw, path, error=OptionError)
        federation, rounds = _checked(document, path)
        if {k: federation.get(k) for k in fingerprint} != fingerprint:
            raise OptionError(
                path, f"this ledger belongs to another federation (base model {federation.get('base_model')!r}, module layout "
                f"{str(federation.get('modules'))[:12]}); this round has base model {fingerprint['base_model']!r}, module layout "
                f"{fingerprint['modules'][:12]}", hint=_NEW_FEDERATION_HINT,
            )
        return cls(path, federation, rounds, raw)

    @property
    def new(self) -> bool:
        return self._seen is None

    def commit(self, entry: dict[str, Any]) -> None:
        """Append this round and replace the file atomically; OutputError if it changed since `open`."""
        self._recheck()
        document = _document(self.federation, [*self.rounds, {**entry, "time": timestamp()}])
        _replace(self.path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
        self.committed = True

    def restore(self) -> None:
        """Undo `commit` (the round failed before releasing anything): the old content, or no file."""
        if not self.committed:
            return
        if self._seen is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
                sync_folder(self.path.parent)
        else:
            _replace(self.path, self._seen)
        self.committed = False

    def _recheck(self) -> None:
        try:
            now = self.path.read_bytes() if os.path.lexists(self.path) else None
        except OSError as error:
            raise OutputError(self.path, f"cannot read: {error.strerror or error}") from None
        if now != self._seen:
            raise OutputError(
                self.path, "changed while this round ran (another round used this ledger?); nothing was written",
                hint="run the rounds of one federation one after another",
            )


def rounds_of(ledger: Ledger | None) -> list[tuple[float, float]]:
    """(noise multiplier, sampling rate) of every round recorded so far."""
    return [(r["noise_multiplier"], r["sampling_rate"]) for r in ledger.rounds] if ledger is not None else []


# --- the file --------------------------------------------------------------------------------------


def _document(federation: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    body = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "federation": federation, "rounds": rounds}
    return {**body, "sha256": _checksum(body)}


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _checked(document: object, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(federation, rounds) of a ledger document; OptionError naming what is wrong otherwise."""
    if not isinstance(document, dict) or document.get("format") != LEDGER_FORMAT:
        raise OptionError(path, f"is not a flexlora DP ledger (no \"format\": \"{LEDGER_FORMAT}\")", hint=_NEW_FEDERATION_HINT)
    if document.get("version") != LEDGER_VERSION:
        raise OptionError(path, f"is a ledger of version {document.get('version')!r}; this flexlora reads version {LEDGER_VERSION}")
    body = {k: v for k, v in document.items() if k != "sha256"}
    if document.get("sha256") != _checksum(body):
        raise OptionError(path, "is corrupt: its checksum does not match its content (edited or damaged)")
    federation, rounds = document.get("federation"), document.get("rounds")
    if not isinstance(federation, dict) or not isinstance(rounds, list) or not all(_valid_round(r) for r in rounds):
        raise OptionError(path, "is corrupt: its federation or rounds are not what flexlora writes")
    return federation, rounds


def _valid_round(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    sigma, rate = entry.get("noise_multiplier"), entry.get("sampling_rate")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (sigma, rate))
    return numbers and sigma > 0 and 0 < rate <= 1


def _check_location(path: Path, output: Path, inputs: Iterable[Path]) -> None:
    """The ledger outlives rounds: not inside the output (replaced every round) nor inside an input."""
    real = path.resolve()
    for folder, what in ((output, "the output folder, which each round replaces"), *((i, "an input") for i in inputs)):
        if folder.resolve() in real.parents:
            raise OptionError(path, f"is inside {what}; keep the ledger beside the rounds")
    if not real.parent.is_dir():
        raise OptionError(path, f"cannot be created: {path.parent} is not a folder")
    if os.path.isdir(path):
        raise OptionError(path, "is a folder; the ledger is a file, e.g. rounds.json")


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to a hidden temporary sibling, flush it, and rename it over `path` (atomic)."""
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        sync_folder(path.parent)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary siblings left by runs that were killed while writing the ledger."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            match = pattern.fullmatch(entry.name)
            if match and not process_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
