"""`fold`: base model + adapter delta, checked tensor by tensor against PEFT's merge_and_unload.

Bases are tiny transformers models saved with save_pretrained (a sharded Llama, a GPT-2 with Conv1D
layers and tied embeddings, a GPT-2 checkpoint without the "transformer." prefix, bf16/fp16 Llamas);
adapters are real PEFT folders. Two independent references: PEFT's merge_and_unload at the base's dtype
(what users compare with), and the same merge done by PEFT entirely in fp64, rounded to the base's
dtype by a nearest-value search written here (what "rounded once" means).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_gpt2, tiny_llama, write_client
from flexlora_cli import fold as fold_module
from flexlora_cli.adapters.output import MANIFEST_NAME
from flexlora_cli.errors import AdapterError, IncompatibleAdaptersError, OutputError
from flexlora_cli.fold import add_low_rank, fold, round_once

TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}', "special_tokens_map.json": "{}"}


# -- building bases and adapters ----------------------------------------------------------------------------


def save_base(model, folder: Path, *, dtype: torch.dtype | None = None, max_shard_size: str | None = None) -> Path:
    """save_pretrained as a user would, plus tokenizer-like files that fold must copy."""
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    for name, text in TOKENIZER_FILES.items():
        (folder / name).write_text(text)
    return folder


def perturb_saved_tensors(folder: Path, seed: int = 7) -> Path:
    """Make the tensors an adapter saves whole (modules_to_save, embedding base layers) differ from the base:
    as saved by PEFT they are the base's own values, and a fold that ignored them would pass unnoticed."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for key, tensor in tensors.items():
        if "lora_" not in key:
            tensors[key] = tensor + 0.5 * torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bases (named as the adapters record them) and adapters, written once for this module."""
    root = tmp_path_factory.mktemp("fold")
    llama = save_base(tiny_llama(seed=11), root / "sharded" / "tiny-llama", max_shard_size="100KB")
    gpt2 = save_base(tiny_gpt2(seed=12), root / "single" / "tiny-gpt2")
    llama_kw = {"base_model_name": "tiny-llama"}
    gpt2_kw = {"base": "gpt2", "base_model_name": "tiny-gpt2"}
    return {
        "llama": llama,
        "gpt2": gpt2,
        "plain": write_client(root / "plain", 8, seed=1, **llama_kw),
        "patterns": write_client(
            root / "patterns", 8, seed=2, lora_alpha=16, use_rslora=True,
            rank_pattern={"layers.1.self_attn.q_proj": 4, "down_proj": 12}, alpha_pattern={"v_proj": 3.0}, **llama_kw,
        ),
        "saved": perturb_saved_tensors(write_client(
            root / "saved", 4, seed=3, target_modules=("embed_tokens", "q_proj"), modules_to_save=["lm_head"], **llama_kw,
        )),
        "conv1d": write_client(root / "conv1d", 4, seed=4, target_modules=("c_attn", "c_proj", "c_fc"), **gpt2_kw),
        "gpt2_embedding": write_client(root / "gpt2-embedding", 6, seed=5, target_modules=("wte", "c_attn"), **gpt2_kw),
    }


# -- independent references ---------------------------------------------------------------------------------


def folded_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def peft_merged(base: Path, adapter: Path, *, fp64: bool = False):
    """PEFT's merge_and_unload on the base as transformers loads it; with fp64, the whole merge in fp64."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64 if fp64 else "auto")
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    if fp64:
        peft_model = peft_model.double()  # LoRA factors too: the delta is computed in fp64
    return peft_model.merge_and_unload().eval()


def nearest(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 values rounded to the nearest `dtype` value, ties to even, by trying the neighbours of a guess."""
    guess = values.to(dtype)
    candidates = torch.stack([torch.nextafter(guess, torch.full_like(guess, -math.inf)), guess,
                              torch.nextafter(guess, torch.full_like(guess, math.inf))])
    distance = (candidates.double() - values).abs()
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[guess.element_size()]
    odd = (candidates.view(int_type) & 1).int()
    penalty = torch.where(distance == distance.min(0).values, odd, 2)  # among the nearest, the even one
    return candidates.gather(0, penalty.argmin(0, keepdim=True))[0]


def ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of values' dtype at |values|, in fp64."""
    magnitude = values.abs()
    return (torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)).double() - magnitude.double())


def check_against_peft(base: Path, adapter: Path, output: Path) -> dict[str, torch.Tensor]:
    """Every folded tensor has the base's shape and dtype, equals PEFT's merge done in fp64 and rounded once to
    that dtype, and is within one unit in the last place of PEFT's own merge at that dtype, plus the rounding
    error PEFT's fp32 delta may carry (zero for tensors without LoRA)."""
    folded = folded_tensors(output)
    base_tensors = folded_tensors(base)
    exact = peft_merged(base, adapter, fp64=True).state_dict()
    native = peft_merged(base, adapter).state_dict()
    bounds = peft_rounding_bounds(base, adapter)
    assert folded.keys() == base_tensors.keys()
    for key, tensor in folded.items():
        name = state_key(native, key)
        assert tensor.dtype == base_tensors[key].dtype and tensor.shape == base_tensors[key].shape, key
        expected = nearest(exact[name], tensor.dtype)
        assert torch.equal(tensor, expected), f"{key}: {int((tensor != expected).sum())} elements not rounded once"
        gap = (tensor.double() - native[name].double()).abs()
        allowed = torch.maximum(ulp(tensor), ulp(native[name])) + bounds.get(name, 0)
        assert bool((gap <= allowed).all()), f"{key}: {float((gap / allowed).max())} times the allowed difference from PEFT"
    return folded


def peft_rounding_bounds(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Per adapted weight, the worst-case error of PEFT's fp32 delta and sum: (r + 2) u (|W| + s |B| |A|)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64), str(adapter))
    model = model.double()
    bounds = {}
    for name, module in model.base_model.model.named_modules():
        if not isinstance(getattr(module, "scaling", None), dict):  # LoRA layers (attention has a float one)
            continue
        for parameter_name, parameter in module.named_parameters():
            if parameter_name.startswith("lora_"):
                parameter.data.abs_()
        magnitude = module.get_delta_weight("default")  # s |B| |A|, in the weight's layout (PEFT's transposes)
        weight = module.get_base_layer().weight
        bounds[name + ".weight"] = (module.r["default"] + 2) * 2.0**-24 * (weight.abs() + magnitude)
    return bounds


def peft_lora_layers(base: Path, adapter: Path):
    """(name, module) of every LoRA layer PEFT creates for this adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    return [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(getattr(m, "scaling", None), dict)]


def state_key(state: dict, key: str) -> str:
    """The model's name for a checkpoint key (a checkpoint may lack the base-model prefix, e.g. "transformer.")."""
    if key in state:
        return key
    (match,) = [name for name in state if name.endswith("." + key)]
    return match


def logits(model, vocab: int = 80) -> torch.Tensor:
    tokens = torch.arange(24).reshape(2, 12) % vocab
    with torch.no_grad():
        return model(input_ids=tokens).logits.double()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file, flexlora's manifest aside (it records when and from what the output was made)."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME]
    return {str(p.relative_to(folder)): sha256(p) for p in files}


# -- accuracy against PEFT ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, adapter",
    [("llama", "plain"), ("llama", "patterns"), ("llama", "saved"), ("gpt2", "conv1d"), ("gpt2", "gpt2_embedding")],
)
def test_fold_equals_peft_merge_and_unload(files, tmp_path, base, adapter):
    before = tree_hashes(files[base]) | tree_hashes(files[adapter])
    report = fold(files[base], files[adapter], tmp_path / "out")
    check_against_peft(files[base], files[adapter], tmp_path / "out")
    assert tree_hashes(files[base]) | tree_hashes(files[adapter]) == before  # inputs untouched

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    torch.testing.assert_close(logits(reloaded), logits(peft_merged(files[base], files[adapter])), rtol=1e-5, atol=1e-5)
    assert not torch.equal(logits(reloaded), logits(AutoModelForCausalLM.from_pretrained(str(files[base])).eval()))

    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(files[adapter]))
    assert sorted(m["name"] for m in report["modules"]) == sorted(
        name for name, _ in peft_lora_layers(files[base], files[adapter])
    )
    assert {m["transposed"] for m in report["modules"] if m["kind"] == "linear"} == {bool(config.fan_in_fan_out)}


def test_modules_to_save_and_embedding_layers_replace_the_base(files, tmp_path):
    report = fold(files["llama"], files["saved"], tmp_path / "out")
    saved = load_file(str(files["saved"] / "adapter_model.safetensors"))
    folded = folded_tensors(tmp_path / "out")
    # lm_head is replaced outright; the embedding gets the saved base layer plus its LoRA update.
    assert torch.equal(folded["lm_head.weight"], saved["base_model.model.lm_head.weight"])
    assert {r["weight"] for r in report["modules_to_save"]} == {"lm_head.weight", "model.embed_tokens.weight"}
    embedding = next(m for m in report["modules"] if m["kind"] == "embedding")
    assert embedding == {**embedding, "weight": "model.embed_tokens.weight", "transposed": True}


def test_rank_and_alpha_patterns_and_rslora_scale_each_module(files, tmp_path):
    report = fold(files["llama"], files["patterns"], tmp_path / "out")
    by_name = {m["name"]: m for m in report["modules"]}
    assert by_name["model.layers.1.self_attn.q_proj"]["rank"] == 4
    assert by_name["model.layers.0.self_attn.q_proj"]["scaling"] == pytest.approx(16 / math.sqrt(8))
    assert by_name["model.layers.0.self_attn.v_proj"]["scaling"] == pytest.approx(3 / math.sqrt(8))
    assert by_name["model.layers.0.mlp.down_proj"]["scaling"] == pytest.approx(16 / math.sqrt(12))
    for name, module in peft_lora_layers(files["llama"], files["patterns"]):
        assert by_name[name]["scaling"] == pytest.approx(module.scaling["default"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_is_rounded_once_within_one_ulp_of_peft(files, tmp_path, dtype):
    base = save_base(tiny_llama(seed=11), tmp_path / "half" / "tiny-llama", dtype=dtype, max_shard_size="60KB")
    fold(base, files["patterns"], tmp_path / "out")
    folded = check_against_peft(base, files["patterns"], tmp_path / "out")
    assert {t.dtype for t in folded.values()} == {dtype}
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {dtype}
    index = "model.safetensors.index.json"
    assert (tmp_path / "out" / index).read_bytes() == (base / index).read_bytes()


def test_gpt2_checkpoint_without_the_transformer_prefix(files, tmp_path):
    """The Hub's gpt2 weights are saved from GPT2Model: "h.0.attn.c_attn.weight", while the adapter (trained
    on GPT2LMHeadModel) names "transformer.h.0.attn.c_attn"."""
    base = save_base(tiny_gpt2(seed=12).transformer, tmp_path / "bare" / "tiny-gpt2")
    with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
        assert "h.0.attn.c_attn.weight" in handle.keys()
    report = fold(base, files["conv1d"], tmp_path / "out")
    assert report["modules"][0]["weight"] == report["modules"][0]["name"].removeprefix("transformer.") + ".weight"
    check_against_peft(base, files["conv1d"], tmp_path / "out")


# -- layout: shards, index, other files ---------------------------------------------------------------------


def test_shard_layout_index_and_other_files_are_kept(files, tmp_path):
    base, out = files["llama"], tmp_path / "out"
    calls = []
    report = fold(base, files["plain"], out, progress=lambda *args: calls.append(args))
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards) >= 4 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert [r["file"] for r in report["shards"]] == shards
    assert calls == [(i + 1, len(shards), name) for i, name in enumerate(shards)]
    for name in ["model.safetensors.index.json", "config.json", "generation_config.json", *TOKENIZER_FILES]:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    copied = ["config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES]
    assert sorted(report["copied"]) == sorted(copied)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for record in report["shards"]:
        with safe_open(str(out / record["file"]), framework="pt") as handle:
            keys, metadata = set(handle.keys()), handle.metadata()
        assert keys == {k for k, shard in index["weight_map"].items() if shard == record["file"]}
        if record["edited"]:
            assert metadata == {"format": "pt"}
        else:  # nothing to change: the very same bytes
            assert (out / record["file"]).read_bytes() == (base / record["file"]).read_bytes()
    edited = {key for record in report["shards"] for key in record["edited"]}
    assert edited == {m["weight"] for m in report["modules"]} and len(edited) == 6
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in folded_tensors(out).values()
    )


def test_other_weight_formats_and_subfolders_are_not_copied(files, tmp_path):
    base = tmp_path / "tiny-gpt2"
    shutil.copytree(files["gpt2"], base)
    torch.save({"stale": torch.zeros(2)}, base / "pytorch_model.bin")
    (base / "original").mkdir()
    (base / "original" / "consolidated.pth").write_bytes(b"x")
    (base / ".cache").mkdir()
    report = fold(base, files["conv1d"], tmp_path / "out")
    assert report["skipped"] == ["original/", "pytorch_model.bin"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["model.safetensors", "config.json", "generation_config.json", *TOKENIZER_FILES, MANIFEST_NAME]
    )


# -- the Hub cache --------------------------------------------------------------------------------------------


def test_base_from_the_offline_hub_cache(files, tmp_path, monkeypatch):
    from test_hub import cache_repo, commit_id

    base = files["llama"]
    commit = commit_id("tiny-llama")
    repo_files = {p.name: p for p in base.iterdir()}
    repo_files["original/consolidated.pth"] = tmp_path / "big.pth"  # a file fold must not need
    repo_files["original/consolidated.pth"].write_bytes(b"x")
    cache_repo(tmp_path / "home" / "hub", "org/tiny-llama", {commit: repo_files}, {"main": commit})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    report = fold("org/tiny-llama", files["plain"], tmp_path / "from-hub")
    fold(base, files["plain"], tmp_path / "local")
    assert report["base_provenance"] == {
        "repo_id": "org/tiny-llama", "repo_type": "model", "revision": "main", "commit": commit, "subfolder": None,
    }
    assert tree_hashes(tmp_path / "from-hub") == tree_hashes(tmp_path / "local")

    with pytest.raises(AdapterError) as error:
        fold("org/never-downloaded", files["plain"], tmp_path / "never", allow_base_mismatch=True)
    assert "not in the Hub cache" in str(error.value) and "HF_HUB_OFFLINE is set" in str(error.value)
    assert not (tmp_path / "never").exists()


def test_base_from_the_hub_downloads_only_what_fold_uses(files, tmp_path, monkeypatch):
    """Over real HTTP (the loopback Hub): a model in a repo's subfolder, beside weights in other formats."""
    from huggingface_hub import HfApi, constants

    from hub_server import HubServer

    repo = tmp_path / "repo"
    shutil.copytree(files["llama"], repo / "base")
    torch.save({"stale": torch.zeros(2)}, repo / "base" / "pytorch_model.bin")
    (repo / "base" / "original").mkdir()
    (repo / "base" / "original" / "params.json").write_text("{}")  # a subfolder: not part of the model
    save_file({"x": torch.zeros(2)}, str(repo / "base" / "consolidated.safetensors"))
    with HubServer(token="hf_foldTEST") as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's offline mode, read at import
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_foldTEST")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        api = HfApi(endpoint=server.url, token="hf_foldTEST")
        api.create_repo("org/tiny-llama")
        commit = api.upload_folder(repo_id="org/tiny-llama", folder_path=str(repo), commit_message="base").oid
        report = fold(f"hf://org/tiny-llama@{commit}/base", files["plain"], tmp_path / "from-hub")
        fetched = {r.path.rsplit(f"/{commit}/", 1)[-1] for r in server.requests if r.method == "GET" and "/resolve/" in r.path}
    fold(files["llama"], files["plain"], tmp_path / "local")
    assert tree_hashes(tmp_path / "from-hub") == tree_hashes(tmp_path / "local")
    assert report["base_provenance"]["subfolder"] == "base" and report["base_provenance"]["commit"] == commit
    expected = {f"base/{p.name}" for p in files["llama"].iterdir()}
    assert fetched == expected  # not pytorch_model.bin, original/, consolidated.safetensors, nor ../.gitattributes


# -- bad inputs: one line, nothing written --------------------------------------------------------------------


def fold_error(tmp_path, base, adapter, kind=AdapterError, **kwargs) -> str:
    with pytest.raises(kind) as error:
        fold(base, adapter, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_base_without_weights(files, tmp_path):
    base = tmp_path / "tiny-llama"
    base.mkdir()
    shutil.copy(files["llama"] / "config.json", base)
    message = fold_error(tmp_path, base, files["plain"])
    assert message == f"{base}: no safetensors weights (model.safetensors or model.safetensors.index.json)"
    torch.save({}, base / "pytorch_model.bin")
    message = fold_error(tmp_path, base, files["plain"])
    assert "found only pytorch_model.bin" in message and "save_pretrained" in message


def test_adapter_for_another_architecture(files, tmp_path):
    message = fold_error(tmp_path, files["llama"], files["conv1d"], allow_base_mismatch=True)
    assert message == (
        f"{files['conv1d']}: module transformer.h.0.attn.c_attn: the base model {files['llama']} has no weight "
        "transformer.h.0.attn.c_attn.weight (hint: is the adapter for another model?)"
    )


def test_adapter_for_another_size(files, tmp_path):
    narrow = save_base(tiny_llama(seed=0, hidden=64), tmp_path / "narrow" / "tiny-llama")
    message = fold_error(tmp_path, narrow, files["plain"])
    assert message == (
        f"{files['plain']}: module model.layers.0.mlp.down_proj: its update is 96x128 but the base weight "
        f"model.layers.0.mlp.down_proj.weight is 64x128 in {narrow} (hint: is the adapter for another model?)"
    )


def test_lora_on_a_tied_output_layer(files, tmp_path):
    adapter = write_client(tmp_path / "head", 4, base="gpt2", target_modules=("lm_head",), base_model_name="tiny-gpt2")
    message = fold_error(tmp_path, files["gpt2"], adapter)
    assert "has no weight lm_head.weight (it is tied to the input embeddings" in message


def test_adapter_recorded_for_another_base(files, tmp_path):
    other = tmp_path / "some-other-llama"
    shutil.copytree(files["llama"], other)
    message = fold_error(tmp_path, other, files["plain"], kind=IncompatibleAdaptersError)
    assert message == (
        f"{files['plain']}: was trained on 'tiny-llama', not on the base model {other} "
        "(hint: pass --allow-base-mismatch if it is the same model)"
    )
    fold(other, files["plain"], tmp_path / "allowed", allow_base_mismatch=True)


def test_quantized_or_integer_weight_is_refused(files, tmp_path):
    base = tmp_path / "tiny-gpt2"
    shutil.copytree(files["gpt2"], base)
    tensors = load_file(str(base / "model.safetensors"))
    key = "transformer.h.1.attn.c_attn.weight"
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    message = fold_error(tmp_path, base, files["conv1d"])
    assert message == f"{base}: weight {key} is I8; fold needs float16, bfloat16, float32 or float64 weights"


def test_a_failure_while_writing_leaves_nothing(files, tmp_path):
    """A NaN in the last shard's factors is found only when that shard is written: nothing is left."""
    adapter = tmp_path / "nan"
    shutil.copytree(files["plain"], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][0, 0] = math.nan
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    before = sorted(p.name for p in tmp_path.iterdir())
    message = fold_error(tmp_path, files["llama"], adapter)
    assert message.endswith("tensor base_model.model.model.layers.1.mlp.down_proj.lora_B.weight contains NaN or Inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no hidden staging folder either


def test_output_rules_are_those_of_every_command(files, tmp_path):
    out = tmp_path / "out"
    fold(files["gpt2"], files["conv1d"], out)
    with pytest.raises(OutputError, match="--overwrite"):
        fold(files["gpt2"], files["conv1d"], out)
    (out / "stale.txt").write_text("x")
    fold(files["gpt2"], files["conv1d"], out, overwrite=True)  # a folder fold wrote before: replaced whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep").write_text("x")
    with pytest.raises(OutputError, match="not written by flexlora"):
        fold(files["gpt2"], files["conv1d"], foreign, overwrite=True)
    with pytest.raises(OutputError, match="inside the input"):
        fold(files["gpt2"], files["conv1d"], files["gpt2"] / "folded")


# -- rounding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_once_is_the_nearest_value(dtype):
    generator = torch.Generator().manual_seed(0)
    anchors = (torch.randn(4000, generator=generator, dtype=torch.float64) * 3).to(dtype)
    above = torch.nextafter(anchors, torch.full_like(anchors, math.inf))
    midpoints = (anchors.double() + above.double()) / 2
    nudge = torch.randn(4000, generator=generator, dtype=torch.float64) * midpoints.abs() * 2.0**-40
    for values in (midpoints, midpoints + nudge, midpoints - nudge, torch.randn(4000, dtype=torch.float64)):
        assert torch.equal(round_once(values, dtype), nearest(values, dtype))
    if dtype != torch.float32:  # torch's own cast goes through fp32 and rounds twice
        assert not torch.equal((midpoints + nudge).to(dtype), nearest(midpoints + nudge, dtype))


def test_add_low_rank_in_row_blocks(monkeypatch):
    """Blocks smaller than a row, a row, and several rows (the tiny models above fit in one block)."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(37, 11, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    left = torch.randn(37, 5, generator=generator, dtype=torch.float64)
    right = torch.randn(5, 11, generator=generator, dtype=torch.float64)
    expected = nearest(weight.double() + left @ right, torch.bfloat16)
    for block in (3, 11, 40, 1 << 22):
        monkeypatch.setattr(fold_module, "_FP64_BLOCK", block)
        assert torch.equal(add_low_rank(weight.clone(), left, right), expected), block
    with pytest.raises(ValueError, match="cannot add"):
        add_low_rank(weight, right, left)


def test_fold_through_the_cli_runs_a_flora_round(files, tmp_path):
    """`flexlora aggregate --method flora` then `flexlora fold`: the base plus the exact weighted update of
    both clients (FLoRA's round), equal to PEFT merging the stacked adapter, with a manifest."""
    from conftest import invoke_flexlora

    clients = [files["plain"], write_client(tmp_path / "second", 4, seed=9, base_model_name="tiny-llama")]
    assert invoke_flexlora(["aggregate", *clients, "--method", "flora", "-o", tmp_path / "round"]).exit_code == 0
    result = invoke_flexlora(["fold", files["llama"], tmp_path / "round" / "global", "-o", tmp_path / "next", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["command"] == "fold" and len(report["shards"]) > 1
    check_against_peft(files["llama"], tmp_path / "round" / "global", tmp_path / "next")
    manifest = json.loads((tmp_path / "next" / "flexlora_manifest.json").read_text())
    assert manifest["command"] == "fold" and manifest["written_by"] == "flexlora"
    again = invoke_flexlora(["fold", files["llama"], tmp_path / "round" / "global", "-o", tmp_path / "next"])
    assert again.exit_code == 2 and again.stderr.startswith("Error: ")  # not empty, no --overwrite
