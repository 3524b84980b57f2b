"""flexlora: federated LoRA aggregation across heterogeneous client ranks (FlexLoRA, NeurIPS 2024).

    from flexlora_cli import merge, split, aggregate, inspect, load_adapter

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
    "push_outputs": "flexlora_cli.api",
    "load_adapter": "flexlora_cli.adapters",
    "Adapter": "flexlora_cli.adapters",
    "Compute": "flexlora_cli.engine",
    "FlexLoraError": "flexlora_cli.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flexlora_cli' has no attribute {name!r}")
