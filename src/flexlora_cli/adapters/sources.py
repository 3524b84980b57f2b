"""Turning what the user typed (a folder, or NAME=FOLDER) into validated adapters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flexlora_cli.adapters import hub
from flexlora_cli.adapters.load import load_adapter
from flexlora_cli.adapters.model import Adapter
from flexlora_cli.adapters.names import check_client_name, name_from


def split_name(spec: str) -> tuple[str | None, str]:
    """'alice=path/to/adapter' -> ('alice', 'path/to/adapter'); a plain path keeps its own name.

    A path that exists locally is always taken as a path, even if it contains '='.
    """
    if "=" in spec and not Path(spec).exists():
        name, _, location = spec.partition("=")
        if name and location:
            return name, location
    return None, spec


def open_adapter(spec: str | Path | Adapter) -> Adapter:
    """Load one adapter from a folder, a Hub reference, or NAME=either (loaded adapters pass through).

    A path that exists locally always wins; otherwise org/name[@rev] or hf://org/name[@rev][/folder]
    is fetched from the Hub (see adapters/hub.py).
    """
    if isinstance(spec, Adapter):
        return spec
    name, location = split_name(str(spec))
    if name is not None:
        check_client_name(name, spec)
    ref = None if Path(location).exists() else hub.parse_ref(location)
    if ref is None:
        return load_adapter(location, name=name)
    name = name or name_from(ref)  # before the download: `hf://org/x/sub/..` must not be named '..'
    folder, provenance = hub.download(ref, location)
    adapter = load_adapter(folder, name=name)
    adapter.source, adapter.provenance = location, provenance
    return adapter


def open_adapters(specs: Sequence[str | Path | Adapter]) -> list[Adapter]:
    return [open_adapter(spec) for spec in specs]
