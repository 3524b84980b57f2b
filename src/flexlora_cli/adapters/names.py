"""Client names: each becomes one folder of the round's output (OUT/<name>/), so each must be one
safe folder name, and no two may end up in the same folder.

A name is letters, digits, `.`, `_` and `-`, does not start with a dot, and has at most 96
characters (a Hub template such as `org/client-{name}` then stays a valid repo name). `global` is
reserved for the round's global output folder. Pure Python: no torch, no files written.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable
from pathlib import Path

from flexlora_cli.errors import AdapterError, IncompatibleAdaptersError

MAX_NAME_LENGTH = 96
GLOBAL_FOLDER = "global"  # the folder of a method's global output (e.g. FLoRA's stacked adapter)
_SAFE = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}", re.ASCII)
NAME_RULE = (
    "a client name is letters, digits, '.', '_' and '-', does not start with '.', and has at most "
    f"{MAX_NAME_LENGTH} characters; name a client explicitly with NAME=PATH"
)


def check_client_name(name: str, source: object) -> str:
    """Return `name` if it is one safe folder name; otherwise raise AdapterError against `source`."""
    if not isinstance(name, str) or not _SAFE.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) <= 2 * MAX_NAME_LENGTH else f"{str(name)[:40]}..."
        problem = f"client name {shown!r} is not a safe folder name"
        if isinstance(name, str) and len(name) > MAX_NAME_LENGTH and _SAFE.fullmatch(name[:MAX_NAME_LENGTH]):
            problem = f"client name is {len(name)} characters long, more than {MAX_NAME_LENGTH}"
        raise AdapterError(source, problem, hint=NAME_RULE)
    if name.lower() == GLOBAL_FOLDER:
        raise AdapterError(
            source,
            f"client name {name!r} is reserved for the round's global output folder",
            hint="name the client otherwise with NAME=PATH",
        )
    return name


def name_from(reference: str | Path | object) -> str:
    """The default client name of an input, refused (AdapterError) if it is not a safe folder name.

    A local folder gives its resolved last component (`round-1/alice/` and `round-1/alice/.` give
    `alice`); a Hub reference (a HubRef, or text naming one) gives its subfolder's last part, else
    its repo's name, after resolving `.` and `..` inside the subfolder (`org/fed/sub/..` gives `fed`).
    """
    repo_id = getattr(reference, "repo_id", None)
    if repo_id is None and isinstance(reference, str) and not os.path.lexists(reference):
        from flexlora_cli.adapters import hub  # only for text that is not a local path

        repo_id = getattr(hub.parse_ref(reference), "repo_id", None)
        if repo_id is not None:
            reference = hub.parse_ref(reference)
    if repo_id is not None:
        subfolder = posixpath.normpath(getattr(reference, "subfolder", "") or ".")
        if subfolder == ".." or subfolder.startswith("../") or subfolder.startswith("/"):
            raise AdapterError(reference, "its folder lies outside the repo", hint=NAME_RULE)
        name = (subfolder if subfolder != "." else repo_id).rsplit("/", 1)[-1]
    else:
        name = Path(reference).resolve().name
    return check_client_name(name, reference)


def check_distinct(names_with_sources: Iterable[tuple[str, object]]) -> None:
    """Refuse two clients whose output folders would coincide, also on case-insensitive file systems."""
    seen: dict[str, tuple[str, object]] = {}
    for name, source in names_with_sources:
        key = name.lower()  # names are ASCII (see check_client_name); macOS and Windows fold case
        if key in seen:
            other, other_source = seen[key]
            if other == name:
                problem = f"client name {name!r} is already used by {other_source}"
            else:
                problem = (
                    f"client name {name!r} and {other!r} (of {other_source}) would share one output folder "
                    "on case-insensitive file systems"
                )
            raise IncompatibleAdaptersError(source, problem, hint="name clients explicitly with NAME=PATH")
        seen[key] = (name, source)


def check_client_names(names_with_sources: Iterable[tuple[str, object]]) -> None:
    """Every name safe (check_client_name) and no two sharing a folder (check_distinct): call this
    before any work wherever client names become folders (the aggregate round)."""
    pairs = list(names_with_sources)
    for name, source in pairs:
        check_client_name(name, source)
    check_distinct(pairs)
