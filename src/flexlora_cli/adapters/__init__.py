"""The adapters room: PEFT LoRA folders in and out, validated before any work."""

from flexlora_cli.adapters.load import load_adapter
from flexlora_cli.adapters.model import Adapter, LoraModule
from flexlora_cli.adapters.sources import open_adapter, open_adapters

__all__ = ["Adapter", "LoraModule", "load_adapter", "open_adapter", "open_adapters"]
