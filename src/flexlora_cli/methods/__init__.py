"""Aggregation methods: one registry (registry.METHODS), one small math module per method.

    from flexlora_cli.methods import METHODS, get
    update = get("hetlora").aggregate(clients, settings)   # clients: base.ModuleClients
"""

from flexlora_cli.methods.registry import DEFAULT_METHOD, METHODS, Method, get

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "get"]
