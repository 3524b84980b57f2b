"""Inputs beyond plain Linear LoRA: embeddings, modules_to_save, .bin files, partial module sets."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import peft_deltas, reference_delta, relative_error, run_json, write_client
from flexlora_cli import load_adapter





def test_embedding_lora_and_modules_to_save_are_merged(tmp_path):
    folders = [
        write_client(tmp_path / f"c{i}", rank, seed=i, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"])
        for i, rank in enumerate((4, 8))
    ]
    assert load_adapter(folders[0]).modules["model.embed_tokens"].kind == "embedding"
    run_json("merge", *folders, "--weights", "1,3", "-o", tmp_path / "merged")
    expected = reference_delta(folders, [1, 3])
    actual = peft_deltas(tmp_path / "merged")
    assert "model.embed_tokens" in actual
    for name, delta in expected.items():
        assert relative_error(actual[name], delta) <= 1e-5, name
    heads = [load_file(str(f / "adapter_model.safetensors"))["base_model.model.lm_head.weight"] for f in folders]
    merged = load_file(str(tmp_path / "merged" / "adapter_model.safetensors"))
    assert torch.allclose(merged["base_model.model.lm_head.weight"], 0.25 * heads[0] + 0.75 * heads[1], atol=1e-6)


def test_bin_weights_are_read_without_unpickling_code(tmp_path):
    folders = [write_client(tmp_path / "safe", 4, seed=1), write_client(tmp_path / "bin", 8, seed=2, safe_serialization=False)]
    assert (folders[1] / "adapter_model.bin").exists()
    run_json("merge", *folders, "-o", tmp_path / "merged")
    expected = reference_delta([folders[0]])  # the .bin client is checked through PEFT's own loader
    bin_deltas = peft_deltas(folders[1])
    actual = peft_deltas(tmp_path / "merged")
    for name in expected:
        assert relative_error(actual[name], 0.5 * expected[name] + 0.5 * bin_deltas[name]) <= 1e-5


def test_clients_with_different_module_sets_contribute_zero_where_absent(tmp_path):
    a = write_client(tmp_path / "a", 4, seed=1, target_modules=["q_proj", "v_proj"])
    b = write_client(tmp_path / "b", 8, seed=2, target_modules=["q_proj", "down_proj"])
    report = run_json("aggregate", a, b, "-o", tmp_path / "round")
    missing = {m["name"]: m["missing_from"] for m in report["modules"]}
    assert missing["model.layers.0.self_attn.v_proj"] == ["b"]
    assert missing["model.layers.0.mlp.down_proj"] == ["a"]
    assert missing["model.layers.0.self_attn.q_proj"] == []
    # each client gets back only the modules it adapts, with half-weight updates where it is alone
    a_out = peft_deltas(tmp_path / "round" / "a")
    assert set(a_out) == set(peft_deltas(a))
    own = peft_deltas(a)["model.layers.0.self_attn.v_proj"]
    assert relative_error(a_out["model.layers.0.self_attn.v_proj"], 0.5 * own) <= 1e-5


def test_merged_config_records_per_module_rank(tmp_path):
    folders = [write_client(tmp_path / "a", 2, seed=1, target_modules=["q_proj", "down_proj"]), write_client(tmp_path / "b", 3, seed=2, target_modules=["q_proj"])]
    run_json("merge", *folders, "-o", tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["r"] == 5 and config["lora_alpha"] == 5  # q_proj: rank 2 + 3, scaling 1
    assert config["rank_pattern"] == {"model.layers.0.mlp.down_proj": 2, "model.layers.1.mlp.down_proj": 2}
    assert config["alpha_pattern"] == config["rank_pattern"]
