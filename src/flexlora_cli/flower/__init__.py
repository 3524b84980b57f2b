"""Run FlexLoRA rounds on Flower (https://flower.ai): a server strategy and ClientApp helpers.

Needs the optional extra: `pip install "flexlora-cli[flower]"`. The strategy aggregates with the
same round skeleton as `flexlora aggregate` (flexlora_cli.round), so a Flower run
and a manual file-exchange federation produce the same adapters from the same client updates.
"""

try:
    import flwr  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "flexlora_cli.flower needs Flower; install it with: pip install 'flexlora-cli[flower]'"
    ) from error

from flexlora_cli.flower.client import adapter_content, load_adapter_arrays
from flexlora_cli.flower.records import from_array_record, to_array_record
from flexlora_cli.flower.strategy import FlexLoRA

__all__ = ["FlexLoRA", "adapter_content", "from_array_record", "load_adapter_arrays", "to_array_record"]
