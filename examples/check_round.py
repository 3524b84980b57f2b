"""Load every adapter of a finished round with PEFT and compare it with the exact update.

    python examples/check_round.py round-2/

For each client output, PeftModel.from_pretrained loads it onto the example base model; the delta
PEFT applies is compared with the best rank-r approximation of the fp64 weighted update
sum_i w_i s_i B_i A_i computed here independently from the client files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

from make_clients import CLIENTS, HERE, NUM_SAMPLES, base_model


def lora_deltas(model) -> dict[str, torch.Tensor]:
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            B, A = module.lora_B["default"].weight.double(), module.lora_A["default"].weight.double()
            deltas[name] = module.scaling["default"] * B @ A
    return deltas


def main(round_dir: Path) -> None:
    total = sum(NUM_SAMPLES.values())
    merged: dict[str, torch.Tensor] = {}
    for name in CLIENTS:
        client = PeftModel.from_pretrained(base_model(), str(HERE / "clients" / name))
        for module, delta in lora_deltas(client).items():
            merged[module] = merged.get(module, 0) + NUM_SAMPLES[name] / total * delta
    print(f"{'client':8} {'rank':>5} {'modules':>8} {'rel. error vs best rank-r':>27}")
    for name in CLIENTS:
        model = PeftModel.from_pretrained(base_model(), str(round_dir / name))
        deltas = lora_deltas(model)
        errors = []
        for module, delta in deltas.items():
            rank = model.base_model.model.get_submodule(module).r["default"]
            U, S, Vh = torch.linalg.svd(merged[module], full_matrices=False)
            best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
            errors.append(float(torch.linalg.norm(delta - best) / torch.linalg.norm(best)))
        ranks = sorted({model.base_model.model.get_submodule(m).r["default"] for m in deltas})
        print(f"{name:8} {','.join(map(str, ranks)):>5} {len(deltas):>8} {max(errors):>27.2e}")
    assert load_file(str(round_dir / "alice" / "adapter_model.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "round-2"))
