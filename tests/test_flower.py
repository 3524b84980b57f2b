"""FlexLoRA on Flower: the strategy's rounds equal `flexlora aggregate` on the same client adapters.

Needs the `flower` extra (flwr[simulation], which brings Ray); skipped without it, a failure under CI=true.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import raw_factors, reference_delta, relative_error, require

require("flwr", 'the flower extra: pip install -e ".[flower]"')
require("ray", 'the flower extra: pip install -e ".[flower]"')

from flwr.app import ArrayRecord, ConfigRecord  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402

from flexlora_cli.cli.app import app as cli  # noqa: E402
from flexlora_cli.flower import FlexLoRA, from_array_record, to_array_record  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower"
RANKS = {0: 2, 1: 4, 2: 8}  # partition-id -> LoRA rank
DTYPES = {0: torch.float32, 1: torch.float32, 2: torch.bfloat16}  # one node trains in bf16
EXAMPLES_PER_RANK = 6  # a node of rank r reports r * 6 samples


def over_the_wire(record: ArrayRecord) -> ArrayRecord:
    """The record as a receiver rebuilds it from the bytes Flower transmits (deflated objects)."""
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(record).items()}
    return inflate_object_from_contents(record.object_id, contents)


def test_tensors_survive_flower_transport_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"layer.{dtype}".replace("torch.", ""): torch.randn(5, 3, generator=generator).to(dtype)
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    }
    tensors["bf16.extremes"] = torch.tensor([[0.0, -0.0, 1e-38, -3e38], [float("inf"), 1.0, -1.0, 65504.0]]).bfloat16()
    received = from_array_record(over_the_wire(to_array_record(tensors)))
    assert set(received) == set(tensors)
    for key, tensor in tensors.items():
        assert received[key].dtype == tensor.dtype, key
        assert received[key].shape == tensor.shape, key
        assert torch.equal(received[key].view(torch.uint8), tensor.contiguous().view(torch.uint8)), key


@pytest.fixture(scope="module")
def flower_rounds(tmp_path_factory):
    """A 2-round Flower simulation of the example app: 3 nodes at ranks 2/4/8, one in bf16."""
    from flwr.simulation import run_simulation

    save_dir = tmp_path_factory.mktemp("flower") / "rounds"
    strategy = FlexLoRA(min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0, save_dir=save_dir)
    settings = {
        "ranks": ",".join(str(RANKS[p]) for p in sorted(RANKS)),
        "dtypes": ",".join(str(DTYPES[p]).removeprefix("torch.") for p in sorted(DTYPES)),
        "local-steps": 2,
        "examples-per-rank": EXAMPLES_PER_RANK,
    }
    server = ServerApp()

    @server.main()
    def main(grid, context):
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=2, train_config=ConfigRecord(settings))

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLWR_TELEMETRY_ENABLED", "0")
        # The ClientApps run in Ray worker processes, which import the example app by name.
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLE), os.environ.get("PYTHONPATH")])))
        patch.syspath_prepend(str(EXAMPLE))
        from flexlora_app.client_app import app as client_app

        run_simulation(
            server, client_app, num_supernodes=3,
            backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0}, "init_args": {"num_cpus": 2}},
        )
    return save_dir, strategy


def adapter_folders(folder: Path) -> list[Path]:
    """The per-node adapter folders in a round's folder (files beside them, such as a manifest, are not nodes)."""
    return sorted(path for path in folder.iterdir() if path.is_dir())


def node_rank(folder: Path) -> int:
    return json.loads((folder / "adapter_config.json").read_text())["r"]


def deltas(folder: Path) -> dict[str, torch.Tensor]:
    return {name: scaling * (B @ A) for name, (B, A, scaling) in raw_factors(folder).items()}


@pytest.mark.parametrize("server_round", [1, 2])
def test_each_flower_round_equals_flexlora_aggregate(flower_rounds, server_round, tmp_path):
    save_dir, _ = flower_rounds
    round_dir = save_dir / f"round-{server_round}"
    # In the strategy's order (by node id), so that even bf16 outputs agree to the last bit.
    received = sorted(adapter_folders(round_dir / "received"), key=lambda folder: int(folder.name.removeprefix("node-")))
    assert sorted(node_rank(folder) for folder in received) == [2, 4, 8]
    samples = [EXAMPLES_PER_RANK * node_rank(folder) for folder in received]

    specs = [f"{folder.name}={folder}" for folder in received]
    result = CliRunner().invoke(
        cli, ["aggregate", *specs, "--num-samples", ",".join(map(str, samples)), "-o", str(tmp_path / "cli"), "--json"]
    )
    assert result.exit_code == 0, result.output

    for folder in received:
        strategy_out, cli_out = round_dir / "nodes" / folder.name, tmp_path / "cli" / folder.name
        assert node_rank(strategy_out) == node_rank(folder)  # each node keeps its own rank
        expected = deltas(cli_out)
        actual = deltas(strategy_out)
        assert set(actual) == set(expected) and expected
        for name in expected:
            assert relative_error(actual[name], expected[name]) <= 1e-5, (folder.name, name)

    # The global update: the exact weighted sum of the nodes' updates (fp64 reference).
    reference = reference_delta(received, samples)
    merged = deltas(round_dir / "global")
    assert set(merged) == set(reference)
    for name, delta in reference.items():
        assert relative_error(merged[name], delta) <= 1e-5, name


def test_bf16_node_trains_and_receives_bf16(flower_rounds):
    save_dir, strategy = flower_rounds
    for stage in ("received", "nodes"):
        for server_round in (1, 2):
            for folder in adapter_folders(save_dir / f"round-{server_round}" / stage):
                expected = torch.bfloat16 if node_rank(folder) == 8 else torch.float32
                tensors = load_file(folder / "adapter_model.safetensors")
                assert tensors and {tensor.dtype for tensor in tensors.values()} == {expected}, folder
    assert sorted(map(str, (layout.dtype for layout in strategy.layouts.values()))) == sorted(map(str, DTYPES.values()))


def test_second_round_starts_from_each_nodes_own_share(flower_rounds):
    """Round 2's uploads are the adapters sent after round 1 plus two local AdamW steps (lr 0.01).

    A is the orthonormal Vh the server sent (||A||_F = sqrt(r)). Adam's first step moves every entry by
    exactly lr; its second, with the default betas, by at most 1.0013 lr (Cauchy-Schwarz on the
    bias-corrected moments); AdamW's decay adds lr * 0.01 * |a|. So the relative change is at most
    2 lr (1.0013 sqrt(d_in) + 0.01), plus bf16 rounding of each step for the bf16 node (half an ulp of
    the largest entry per entry). A fresh LoRA initialization would be about 1.15 away.
    """
    save_dir, _ = flower_rounds
    steps, lr = 2, 0.01
    for sent in adapter_folders(save_dir / "round-1" / "nodes"):
        returned = save_dir / "round-2" / "received" / sent.name
        before, after = raw_factors(sent), raw_factors(returned)
        assert set(before) == set(after)
        dtype = DTYPES[{r: p for p, r in RANKS.items()}[node_rank(sent)]]
        for name, (_, A_sent, _) in before.items():
            change = relative_error(after[name][1], A_sent)
            d_in = A_sent.shape[1]
            rounding = torch.finfo(dtype).eps / 2 * float(A_sent.abs().max()) if dtype != torch.float32 else 0.0
            limit = steps * (lr * (1.0013 * d_in**0.5 + 0.01) + rounding * d_in**0.5)
            assert 0 < change <= limit, (sent.name, name, change, limit)
