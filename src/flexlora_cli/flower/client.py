"""ClientApp side: a PEFT model's LoRA adapter into a reply, and the server's adapter back in.

The reply format the FlexLoRA strategy reads:
- one ArrayRecord: the adapter's state dict with PEFT's saved key names (as in
  adapter_model.safetensors), in the adapter's own dtype (bf16 included);
- a ConfigRecord "lora" with "adapter-config": the adapter_config.json text, which carries
  the node's rank, alpha, rank_pattern/alpha_pattern and rsLoRA;
- for train replies, a MetricRecord with the node's sample count ("num-examples").
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from flexlora_cli.adapters.config import AdapterConfig
from flexlora_cli.flower.records import from_array_record, to_array_record

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
LORA_KEY = "lora"
ADAPTER_CONFIG_KEY = "adapter-config"


def adapter_content(
    model: PeftModel, metrics: Mapping[str, int | float] | None = None, adapter_name: str = "default"
) -> RecordDict:
    """A reply's content: the node's current LoRA adapter, its config and (for train) its metrics."""
    # save_embedding_layers=False: only the LoRA tensors travel (the default "auto" may also
    # look the base model up on the Hub and add whole embedding matrices).
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    content = {
        ARRAYS_KEY: to_array_record(state),
        LORA_KEY: ConfigRecord({ADAPTER_CONFIG_KEY: _config_text(model.peft_config[adapter_name])}),
    }
    if metrics is not None:
        content[METRICS_KEY] = MetricRecord(dict(metrics))
    return RecordDict(content)


def load_adapter_arrays(model: PeftModel, arrays: ArrayRecord, adapter_name: str = "default") -> bool:
    """Load the adapter the server sent into `model`; False when it sent none (first round).

    The server sends this node's own rank, so every tensor must fit the node's adapter as is.
    """
    if not len(arrays):
        return False
    result = set_peft_model_state_dict(model, from_array_record(arrays), adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"the server sent tensors this adapter does not have: {sorted(result.unexpected_keys)[:3]}")
    return True


def _config_text(config) -> str:
    """A PEFT LoraConfig as adapter_config.json text, written as flexlora writes every config."""
    raw = json.loads(json.dumps(config.to_dict(), default=sorted))  # sets -> sorted lists
    return AdapterConfig.from_dict(raw, "the node's PEFT config").to_json()
