"""Shared fixtures: real PEFT adapters written from tiny transformers models (no downloads)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLEXLORA_WIDTH", "200")  # stable rich tables in tests


# No test may touch a real Hugging Face cache or the network: set before any fixture runs.
_HF_HOME = tempfile.mkdtemp(prefix="flexlora-test-hf-")
os.environ.update(HF_HOME=_HF_HOME, HF_HUB_CACHE=os.path.join(_HF_HOME, "hub"), HF_HUB_OFFLINE="1")
os.environ.pop("HF_TOKEN", None)


def tiny_llama(seed: int = 0, hidden: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=80, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=80, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def write_client(
    folder: Path,
    rank: int = 8,
    *,
    base: str = "llama",
    seed: int = 0,
    lora_alpha: float | None = None,
    target_modules=("q_proj", "v_proj", "down_proj"),
    dtype: torch.dtype = torch.float32,
    safe_serialization: bool = True,
    base_model_name: str = "tiny-llama",
    **lora_kwargs,
) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) factors, as a client would after training."""
    from peft import LoraConfig, get_peft_model

    model = BASES[base]()
    model.name_or_path = base_model_name  # what PEFT records as base_model_name_or_path
    config = LoraConfig(
        r=rank, lora_alpha=lora_alpha if lora_alpha is not None else 2 * rank,
        target_modules=list(target_modules), init_lora_weights=False, **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1000 + seed)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
    peft_model.to(dtype)
    peft_model.save_pretrained(str(folder), safe_serialization=safe_serialization)
    return folder


def raw_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(B, A, scaling) per module, read straight from the files (independent of flexlora)."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    result = {}
    for key, A in state.items():
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_suffix):
                name = key[len("base_model.model.") : -len(a_suffix)]
                B = state[key[: -len(a_suffix)] + b_suffix]
                r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"], name), config["r"])
                alpha = config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"], name), config["lora_alpha"])
                scaling = alpha / (r**0.5 if config["use_rslora"] else r)
                result[name] = (B.double(), A.double(), scaling)
    return result


def reference_delta(folders, weights=None) -> dict[str, torch.Tensor]:
    """fp64 dense reference: dW_m = sum_i w_i s_i B_i A_i."""
    weights = weights or [1.0] * len(folders)
    total = sum(weights)
    deltas: dict[str, torch.Tensor] = {}
    for folder, weight in zip(folders, weights):
        for name, (B, A, scaling) in raw_factors(Path(folder)).items():
            deltas[name] = deltas.get(name, 0) + (weight / total) * scaling * (B @ A)
    return deltas


def peft_deltas(folder: Path, base: str = "llama") -> dict[str, torch.Tensor]:
    """Load an output with PeftModel.from_pretrained and return each module's delta as PEFT scales it."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(BASES[base](), str(folder))
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            B, A = module.lora_B["default"].weight, module.lora_A["default"].weight
        elif hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
            B, A = module.lora_embedding_B["default"], module.lora_embedding_A["default"]
        else:
            continue
        deltas[name] = module.scaling["default"] * (B.double() @ A.double())
    return deltas


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual - expected) / max(float(torch.linalg.norm(expected)), 1e-300))


def truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """fp64 best rank-`rank` approximation by a dense SVD (the reference for every truncation)."""
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def energy_shares(deltas: dict[str, torch.Tensor], ranks: dict[str, int] | int) -> tuple[float, dict[str, float]]:
    """fp64 share of the squared Frobenius norm kept at rank r: overall (summed over modules) and per module.

    sum_j sigma_j^2 = ||dW||_F^2, so the total comes from the matrix itself, not from its singular values.
    """
    kept, total, shares = 0.0, 0.0, {}
    for name, delta in deltas.items():
        rank = ranks if isinstance(ranks, int) else ranks[name]
        S = torch.linalg.svdvals(delta.double())
        energy = float(torch.linalg.norm(delta.double()) ** 2)
        shares[name] = float((S[:rank] ** 2).sum()) / energy
        kept, total = kept + shares[name] * energy, total + energy
    return kept / total, shares


def require(module_name: str, reason: str | None = None):
    """Import an optional dependency, or skip the calling test module without it.

    Under CI=true a missing module is a failure: a broken install must not turn into a green run.
    """
    import importlib

    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        message = f"{module_name} is not importable ({error})" + (f": {reason}" if reason else "")
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{message}; CI=true, so a missing dependency fails the run", pytrace=False)
        pytest.skip(message, allow_module_level=True)


@pytest.fixture(scope="session")
def clients(tmp_path_factory) -> list[Path]:
    """Three llama clients at ranks 8, 16, 64 (one with rank_pattern, one with rsLoRA)."""
    root = tmp_path_factory.mktemp("clients")
    return [
        write_client(root / "alice", 8, seed=1),
        write_client(root / "bob", 16, seed=2, rank_pattern={"layers.1.self_attn.q_proj": 4}, alpha_pattern={"v_proj": 3.0}),
        write_client(root / "carol", 64, seed=3, use_rslora=True, lora_alpha=16),
    ]


class FlexloraCommand:
    """The `flexlora` console entry point (flexlora_cli.cli.app.run) for typer's CliRunner: unlike invoking
    the typer app itself, usage errors come out as the one line users see."""

    name = "flexlora"

    def main(self, args=(), prog_name=None, **extra):
        from flexlora_cli.cli.app import run

        raise SystemExit(run(list(args)))


def run(*args, code: int = 0):
    """`flexlora ARGS` as users run it; asserts the exit code."""
    result = invoke_flexlora(args)
    assert result.exit_code == code, result.output
    return result


def run_json(*args) -> dict:
    """The `--json` report of `flexlora ARGS` (which must exit 0)."""
    return json.loads(run(*args, "--json").stdout)


def padded(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad a LoRA factor to `rank` along its rank dimension (dim 1 for B, 0 for A)."""
    pad = [0, 0, 0, 0]
    pad[1 if dim == 1 else 3] = rank - tensor.shape[dim]
    return torch.nn.functional.pad(tensor, pad)


def invoke_flexlora(args, **kwargs):
    """CliRunner's result of `flexlora ARGS` run as the console entry point runs it."""
    from typer.testing import CliRunner

    runner = CliRunner()
    return super(CliRunner, runner).invoke(FlexloraCommand(), [str(a) for a in args], **kwargs)  # click's invoke
