"""The GPU path (`--device cuda`) against the fp64 CPU reference, on real PEFT adapters.

Skipped without a CUDA device; with FLEXLORA_REQUIRE_CUDA=1 (scripts/gpu_check.sh sets it) a
missing device is a failure, so a GPU check cannot pass by skipping. Tolerances: fp32 merges on
any device agree with the fp64 truncation to about 1e-5 relative (the factored SVD's documented
accuracy); the outputs must be the same PEFT adapters whichever device computed them.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import peft_deltas, reference_delta, relative_error, run, truncated, write_client

if not torch.cuda.is_available():
    if os.environ.get("FLEXLORA_REQUIRE_CUDA") == "1":
        pytest.fail("FLEXLORA_REQUIRE_CUDA=1 but torch sees no CUDA device", pytrace=False)
    pytest.skip("no CUDA device (set FLEXLORA_REQUIRE_CUDA=1 to make this a failure)", allow_module_level=True)


@pytest.fixture(scope="module")
def gpu_clients(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-clients")
    return [write_client(root / name, rank, seed=seed) for name, rank, seed in (("a", 4, 1), ("b", 8, 2), ("c", 16, 3))]


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_cuda_aggregate_matches_the_fp64_reference(gpu_clients, tmp_path, svd):
    out = tmp_path / "out"
    run("aggregate", *gpu_clients, "-o", out, "--device", "cuda", "--svd", svd)
    reference = reference_delta(gpu_clients)
    for folder, rank in zip(gpu_clients, (4, 8, 16)):
        deltas = peft_deltas(out / folder.name)
        for name, delta in deltas.items():
            expected = truncated(reference[name], rank)
            assert relative_error(delta, expected) <= 1e-5, (folder.name, name, svd)


def test_cuda_and_cpu_write_the_same_adapters(gpu_clients, tmp_path):
    run("aggregate", *gpu_clients, "-o", tmp_path / "cpu", "--device", "cpu")
    run("aggregate", *gpu_clients, "-o", tmp_path / "cuda", "--device", "cuda")
    for folder in gpu_clients:
        cpu, cuda = peft_deltas(tmp_path / "cpu" / folder.name), peft_deltas(tmp_path / "cuda" / folder.name)
        assert cpu.keys() == cuda.keys()
        for name in cpu:
            assert relative_error(cuda[name], cpu[name]) <= 1e-5, name


@pytest.mark.parametrize("method", ["hetlora", "fedavg", "flora", "raflora"])
def test_every_method_runs_on_cuda_and_agrees_with_cpu(gpu_clients, tmp_path, method):
    run("aggregate", *gpu_clients, "-o", tmp_path / "cpu", "--device", "cpu", "--method", method, "--global")
    run("aggregate", *gpu_clients, "-o", tmp_path / "cuda", "--device", "cuda", "--method", method, "--global")
    cpu, cuda = peft_deltas(tmp_path / "cpu" / "global"), peft_deltas(tmp_path / "cuda" / "global")
    for name in cpu:
        assert relative_error(cuda[name], cpu[name]) <= 1e-5, (method, name)


def test_merge_on_cuda(gpu_clients, tmp_path):
    run("merge", *gpu_clients, "-o", tmp_path / "merged", "--device", "cuda", "--rank", "8")
    deltas = peft_deltas(tmp_path / "merged")
    reference = reference_delta(gpu_clients)
    for name, delta in deltas.items():
        assert relative_error(delta, truncated(reference[name], 8)) <= 1e-5, name
