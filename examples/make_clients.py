"""Regenerate the example client adapters in examples/clients/ (no download needed).

Three clients fine-tuned "a tiny Llama" at different ranks, as a federation would have them after
a local round: alice at r=4, bob at r=8 (rsLoRA), carol at r=16 (with a rank_pattern). The base
model is built from a transformers config with a fixed seed, so `examples/check_round.py` can
rebuild it and load every output with PEFT.

    python examples/make_clients.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base model is local; never look it up

HERE = Path(__file__).parent
CLIENTS = {
    "alice": dict(r=4, lora_alpha=8),
    "bob": dict(r=8, lora_alpha=16, use_rslora=True),
    "carol": dict(r=16, lora_alpha=32, rank_pattern={"layers.1.self_attn.o_proj": 8}),
}
NUM_SAMPLES = {"alice": 120, "bob": 300, "carol": 80}


def base_model():
    """The shared base model: a 2-layer Llama from a config, seeded (stands in for a real checkpoint)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    model.name_or_path = "flexlora-example/tiny-llama"
    return model


def main() -> None:
    from peft import LoraConfig, get_peft_model

    root = HERE / "clients"
    shutil.rmtree(root, ignore_errors=True)
    for seed, (name, options) in enumerate(CLIENTS.items()):
        config = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **options)
        model = get_peft_model(base_model(), config)
        generator = torch.Generator().manual_seed(seed)
        for parameter_name, parameter in model.named_parameters():
            if "lora_" in parameter_name:  # stands in for a local round of training
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.02
        model.save_pretrained(str(root / name))
        print(f"wrote {root / name} (r={options['r']}, {NUM_SAMPLES[name]} samples)")


if __name__ == "__main__":
    main()
