"""The `merge --dense` file is in the base weights' own layout: `W[key] += delta[key]` is PEFT's merge.

The reference is PEFT itself: each client adapter loaded with `PeftModel.from_pretrained` on the base
model and merged with `merge_and_unload()`; its weights minus the base weights, weighted, are the
update in the layout the model stores (Conv1D weights are in x out, embeddings vocab x hidden).
Nothing here reads flexlora's layout metadata, so a transpose dropped on the way out is caught.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import BASES, relative_error, write_client
from flexlora_cli.cli.app import app

WEIGHTS = (3.0, 1.0)

# GPT-2's Conv1D (fan_in_fan_out; c_attn 48x144, c_fc 48x192, mlp.c_proj 192x48 are not square) and
# an embedding LoRA (80x96) next to plain Linear layers (down_proj 96x128, v_proj 48x96) on Llama.
CASES = {
    "gpt2-conv1d": dict(base="gpt2", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, base_model_name="tiny-gpt2"),
    "llama-embedding": dict(base="llama", target_modules=["embed_tokens", "down_proj", "v_proj"], base_model_name="tiny-llama"),
}


def peft_update(folder, base: str) -> dict[str, torch.Tensor]:
    """Weight name -> what PEFT's merge_and_unload adds to that base weight (fp64)."""
    from peft import PeftModel

    before = {key: value.double() for key, value in BASES[base]().state_dict().items()}
    after = PeftModel.from_pretrained(BASES[base](), str(folder)).merge_and_unload().state_dict()
    assert set(after) == set(before)
    return {key: after[key].double() - before[key] for key in before if not torch.equal(after[key].double(), before[key])}


@pytest.fixture(scope="module", params=sorted(CASES))
def dense_case(request, tmp_path_factory):
    """(base, the --dense file's tensors, the PEFT reference) for two clients at ranks 4 and 8."""
    options = dict(CASES[request.param])
    base = options["base"]
    root = tmp_path_factory.mktemp(request.param)
    folders = [write_client(root / f"client{rank}", rank, seed=rank, **options) for rank in (4, 8)]
    result = CliRunner().invoke(app, ["merge", *map(str, folders), "--weights", "3,1", "--dense", "-o", str(root / "merged")])
    assert result.exit_code == 0, result.output
    with safe_open(str(root / "merged" / "flexlora_delta.safetensors"), "pt") as handle:
        dense = {key: handle.get_tensor(key) for key in handle.keys()}
    reference: dict[str, torch.Tensor] = {}
    for folder, weight in zip(folders, WEIGHTS):
        for key, update in peft_update(folder, base).items():
            reference[key] = reference.get(key, 0) + weight / sum(WEIGHTS) * update
    return base, dense, reference


def test_dense_keys_and_shapes_are_the_base_weights(dense_case):
    base, dense, reference = dense_case
    weights = BASES[base]().state_dict()
    assert set(dense) == set(reference) and dense  # exactly the weights PEFT's merge changes
    for key, delta in dense.items():
        assert tuple(delta.shape) == tuple(weights[key].shape), key


def test_dense_values_are_pefts_merged_update(dense_case):
    """fp32 compute and storage: a relative error of a few fp32 ulps (1e-5 leaves headroom)."""
    _, dense, reference = dense_case
    for key, expected in reference.items():
        assert tuple(dense[key].shape) == tuple(expected.shape), key
        assert relative_error(dense[key].double(), expected) <= 1e-5, key

