"""flexlora: federated LoRA aggregation across heterogeneous client ranks (FlexLoRA, NeurIPS 2024).

    from flexlora_cli import merge, split, aggregate, inspect, fold, load_adapter

Imports are lazy so that the CLI's --help does not pay for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "merge": "flexlora_cli.api",
    "split": "flexlora_cli.api",
    "aggregate": "flexlora_cli.api",
    "inspect": "flexlora_cli.api",
    "Push": "flexlora_cli.api",
    "fold": "flexlora_cli.fold",
    "load_adapter": "flexlora_cli.adapters",
    "Adapter": "flexlora_cli.adapters",
    "Compute": "flexlora_cli.compute",
    "METHODS": "flexlora_cli.methods.registry",
    "FlexLoraError": "flexlora_cli.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flexlora_cli' has no attribute {name!r}")
