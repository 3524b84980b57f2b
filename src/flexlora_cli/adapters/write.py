"""Writing one PEFT adapter folder (adapter_config.json, adapter_model.safetensors, README.md).

Where an output goes, who owns it and how it replaces what was there is adapters/output.py
(OutputFolder): write adapters under `out.staging`, then `out.commit(...)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from flexlora_cli.adapters.config import AdapterConfig
from flexlora_cli.adapters.files import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from flexlora_cli.adapters.filesystem import pause_for_tests, plain_mode

MODEL_CARD_NAME = "README.md"
# Test hook: seconds to sleep after each file written (or a gate file to wait on), so that tests can
# act on a real run in the middle of writing (tests/test_atomic.py, tests/test_output_safety.py).
_PAUSE_ENV = "FLEXLORA_TEST_PAUSE_WRITES"


def write_adapter(
    folder: Path, config: AdapterConfig, tensors: dict[str, torch.Tensor], card: str | None = None
) -> None:
    """A standard PEFT adapter folder: adapter_config.json + adapter_model.safetensors (+ card)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(config.to_json(), encoding="utf-8")
    _pause_for_tests()
    contiguous = {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    save_file(contiguous, str(weights), metadata={"format": "pt"})  # OutputFolder maps its I/O errors
    plain_mode(weights)  # safetensors writes through a private temporary file (mode 0600)
    _pause_for_tests()
    if card is not None:
        (folder / MODEL_CARD_NAME).write_text(card, encoding="utf-8")


def _pause_for_tests() -> None:
    pause_for_tests(_PAUSE_ENV)
