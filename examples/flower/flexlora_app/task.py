"""The model, data and training of the example: small enough to run many nodes on one CPU.

The base model is a tiny Llama built from a transformers config with a fixed seed, so every
node (and every process) gets the same frozen weights without downloading anything. Each node
learns a different synthetic "language" (token sequences counting up with a node-specific
step), so the nodes' updates differ, as they would with real non-IID data.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

BASE_MODEL_NAME = "flexlora-example/tiny-llama"  # recorded in each adapter's config
VOCAB = 64
SEQUENCE = 16
TARGET_MODULES = ["q_proj", "v_proj", "o_proj", "down_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(rank: int, dtype: str = "float32", seed: int = 0) -> PeftModel:
    """The shared tiny base model with a fresh LoRA adapter of `rank` (PEFT's default init)."""
    torch.manual_seed(0)  # the base weights: identical on every node
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQUENCE,
    )
    base = LlamaForCausalLM(config)
    base.name_or_path = BASE_MODEL_NAME
    torch.manual_seed(seed)  # the LoRA init: this node's own
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES, lora_dropout=0.0)
    return get_peft_model(base, lora).to(DTYPES[dtype])


def load_data(partition: int, count: int) -> torch.Tensor:
    """`count` sequences counting up (mod VOCAB) in steps of partition + 1, random starts."""
    generator = torch.Generator().manual_seed(1234 + partition)
    starts = torch.randint(0, VOCAB, (count, 1), generator=generator)
    return (starts + (partition + 1) * torch.arange(SEQUENCE)) % VOCAB


def train(model: PeftModel, data: torch.Tensor, steps: int, learning_rate: float, batch: int = 8) -> float:
    """A few AdamW steps on the LoRA factors; returns the mean training loss."""
    if steps <= 0:
        return evaluate(model, data)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    generator = torch.Generator().manual_seed(steps)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch,), generator=generator)
        loss = model(input_ids=data[rows], labels=data[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(model: PeftModel, data: torch.Tensor) -> float:
    model.eval()
    return float(model(input_ids=data, labels=data).loss)
