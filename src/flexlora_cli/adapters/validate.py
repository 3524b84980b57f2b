"""Checks across adapters, run before any work: can these clients be merged faithfully?"""

from __future__ import annotations

from collections.abc import Sequence

from flexlora_cli.adapters.model import Adapter
from flexlora_cli.adapters.names import check_distinct
from flexlora_cli.errors import IncompatibleAdaptersError


def check_compatible(adapters: Sequence[Adapter], allow_base_mismatch: bool = False) -> None:
    """Raise IncompatibleAdaptersError naming the adapter and the problem."""
    if not adapters:
        raise IncompatibleAdaptersError(None, "no adapters given")
    _check_unique(adapters)
    first = adapters[0]
    for other in adapters[1:]:
        if not allow_base_mismatch and first.base_model and other.base_model and first.base_model != other.base_model:
            raise IncompatibleAdaptersError(
                other.source,
                f"base model {other.base_model!r} differs from {first.base_model!r} ({first.source})",
                hint="pass --allow-base-mismatch if they are really the same model",
            )
    seen: dict[str, tuple[Adapter, object]] = {}
    for adapter in adapters:
        for name, module in adapter.modules.items():
            layout = (module.kind, module.d_out, module.d_in, adapter.fan_in_fan_out)
            if name not in seen:
                seen[name] = (adapter, layout)
                continue
            owner, expected = seen[name]
            if layout[:3] != expected[:3]:
                raise IncompatibleAdaptersError(
                    adapter.source,
                    f"module {name} is {_describe(layout)} here but {_describe(expected)} in {owner.source}",
                )
            if layout[3] != expected[3]:
                raise IncompatibleAdaptersError(
                    adapter.source,
                    f"fan_in_fan_out={layout[3]} but {owner.source} has fan_in_fan_out={expected[3]}",
                )
    if len(adapters) > 1 and not set.intersection(*(set(a.modules) for a in adapters)):
        raise IncompatibleAdaptersError(
            adapters[-1].source,
            "shares no adapted module with the other adapters",
            hint="are these adapters for the same base model and target modules?",
        )


def _check_unique(adapters: Sequence[Adapter]) -> None:
    paths: dict[object, Adapter] = {}
    for adapter in adapters:
        key = adapter.path.resolve()
        if key in paths:
            raise IncompatibleAdaptersError(
                adapter.source, f"given twice (also as {paths[key].source}); each client counts once"
            )
        paths[key] = adapter
    check_distinct((adapter.name, adapter.source) for adapter in adapters)


def _describe(layout) -> str:
    kind, d_out, d_in, _ = layout
    return f"{kind} {d_out}x{d_in}"
