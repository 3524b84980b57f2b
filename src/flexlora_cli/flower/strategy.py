"""FlexLoRA as a Flower strategy: heterogeneous LoRA ranks, one node at a time.

Flower's FedAvg averages arrays key by key, which cannot mix a rank-4 and a rank-16 adapter.
This strategy does one FlexLoRA server round per Flower round, with the code of
`flexlora aggregate`:

- aggregate_train reads each reply's adapter (validated like an adapter folder on disk), weights
  the nodes by their replies' `num-examples`, and runs the round skeleton's compute phase
  (flexlora_cli.round.compute with the flexlora method: the exact SVD of sum_i w_i s_i B_i A_i,
  never the dense matrix). The returned global ArrayRecord is the merged adapter, as `flexlora
  merge` writes it (scaling 1).
- configure_train / configure_evaluate send every node its own adapter: the best rank-r_i
  approximation of the merged update, at the node's own rank, alpha and rsLoRA per module
  (round.output_tensors of a ClientOutput, as `flexlora aggregate`), in the node's own dtype.

Each node's LoRA layout is learnt from its replies. A node the strategy has not heard from yet
while a global update exists (it joined late, or was not sampled before) is asked once with a
`query` message, which the ClientApp answers with its adapter (see flexlora_cli.flower.client).
In the first round there is no global update: nodes receive an empty ArrayRecord and start
from their own fresh LoRA initialization.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log
from safetensors.torch import save_file

from flexlora_cli.adapters.config import AdapterConfig
from flexlora_cli.adapters.files import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from flexlora_cli.adapters.load import load_adapter
from flexlora_cli.adapters.model import Adapter, LoraModule
from flexlora_cli.adapters.validate import check_compatible
from flexlora_cli.adapters.output import OutputFolder
from flexlora_cli.adapters.write import write_adapter
from flexlora_cli.clients import client_weights
from flexlora_cli.compute import Compute, widest_dtype
from flexlora_cli.methods import registry
from flexlora_cli.outputs import ClientOutput, model_output
from flexlora_cli.round import ClientUpdates, RoundResult, compute, output_tensors
from flexlora_cli.store import UpdateStore
from flexlora_cli.flower.client import ADAPTER_CONFIG_KEY, LORA_KEY
from flexlora_cli.flower.records import from_array_record, to_array_record


@dataclass(frozen=True)
class NodeLayout:
    """What the strategy must know to build a node's adapter: its config, modules and dtype."""

    config: AdapterConfig  # written back unchanged with the node's adapter
    modules: dict[str, LoraModule]  # per-module rank, alpha and scaling, as the node has them
    extra_keys: tuple[str, ...]  # modules_to_save and other plain tensors the node holds
    dtype: torch.dtype

    @classmethod
    def of(cls, adapter: Adapter) -> NodeLayout:
        return cls(adapter.config, dict(adapter.modules), tuple(adapter.extra_keys), adapter.dtype)


class FlexLoRA(FedAvg):
    """FlexLoRA (Bai et al., NeurIPS 2024) for Flower's message API; each node keeps its rank.

    Args:
        compute: precision, device and factor balance of the server math (as the CLI's options).
        save_dir: if given, every round writes PEFT adapter folders under save_dir/round-<t>/:
            received/node-<id> (what each node sent), global (the merged update) and
            nodes/node-<id> (what each node gets next). Nothing is written otherwise.
        allow_base_mismatch: merge adapters whose base_model_name_or_path differ.
        query_timeout: seconds to wait for a late node to describe its adapter.
        Other keyword arguments are FedAvg's (sampling, weighted_by_key, record keys, metric
        aggregation); sample counts are read from each reply's MetricRecord[weighted_by_key].
    """

    def __init__(
        self,
        *,
        compute: Compute = Compute(),
        save_dir: str | Path | None = None,
        allow_base_mismatch: bool = False,
        query_timeout: float = 600,
        **fedavg_options,
    ) -> None:
        super().__init__(**fedavg_options)
        self.compute = compute
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.allow_base_mismatch = allow_base_mismatch
        self.query_timeout = query_timeout
        self.layouts: dict[int, NodeLayout] = {}
        self._result: RoundResult | None = None  # the last round's updates, kept in memory
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FlexLoRA: precision %s, balanced factors %s", self.compute.precision, self.compute.balanced)

    # --- sending: each node its own rank ------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        return self._per_node_messages(server_round, arrays, config, grid, self.fraction_train, self.min_train_nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        return self._per_node_messages(
            server_round, arrays, config, grid, self.fraction_evaluate, self.min_evaluate_nodes, MessageType.EVALUATE
        )

    def node_tensors(self, node_id: int) -> dict[str, torch.Tensor]:
        """The adapter this node gets from the current global update (empty before the first)."""
        if self._result is None:
            return {}
        layout = self.layouts[node_id]
        store = self._result.store
        # As `flexlora aggregate`: the node's own rank and scaling (alpha/r or alpha/sqrt(r)), for the
        # modules some node trained in the last round.
        modules = {name: own for name, own in layout.modules.items() if name in store}
        extras = [key for key in layout.extra_keys if key in self._result.extras]
        output = ClientOutput(f"node-{node_id}", f"node-{node_id}", modules, self.compute.output_dtype(layout.dtype), extras, own_config=layout.config)
        for name in modules:
            output.decide(name, store.get(name))
        return output_tensors(self._result, output, self.compute.balanced)

    def _per_node_messages(self, server_round, arrays, config, grid, fraction, min_nodes, message_type) -> list[Message]:
        if len(arrays) and arrays is not self._global:
            raise ValueError(
                "FlexLoRA starts from an empty ArrayRecord (nodes initialize their own LoRA) and then "
                "continues from the global update it returns; it cannot start from other arrays"
            )
        sample_size = max(int(len(list(grid.get_node_ids())) * fraction), min_nodes)
        node_ids, connected = sample_nodes(grid, self.min_available_nodes, sample_size)
        log(INFO, "configure_%s: Sampled %s nodes (out of %s)", message_type, len(node_ids), len(connected))
        config["server-round"] = server_round
        if self._result is not None:
            self._learn_layouts(grid, [node for node in node_ids if node not in self.layouts], server_round)
            node_ids = [node for node in node_ids if node in self.layouts]
        messages = []
        for node in node_ids:
            own = to_array_record(self.node_tensors(node)) if self._result is not None else ArrayRecord()
            content = RecordDict({self.arrayrecord_key: own, self.configrecord_key: config})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def _learn_layouts(self, grid: Grid, node_ids: list[int], server_round: int) -> None:
        """Ask nodes not heard from yet for their adapter, to learn their ranks."""
        if not node_ids:
            return
        log(INFO, "FlexLoRA: asking %s new node(s) for their LoRA layout", len(node_ids))
        query = RecordDict({self.configrecord_key: ConfigRecord({"server-round": server_round})})
        messages = [Message(content=query, message_type=MessageType.QUERY, dst_node_id=node) for node in node_ids]
        replies = list(grid.send_and_receive(messages, timeout=self.query_timeout))
        with tempfile.TemporaryDirectory(prefix="flexlora-flower-") as folder:
            for reply in replies:
                node = reply.metadata.src_node_id
                if reply.has_error():
                    log(WARNING, "FlexLoRA: node %s did not describe its adapter (%s); skipped", node, reply.error.reason)
                    continue
                self.layouts[node] = NodeLayout.of(self._read_adapter(reply, Path(folder) / f"node-{node}"))

    # --- receiving: merge all ranks -------------------------------------------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        # Replies arrive in any order; a fixed order makes the round reproducible to the last bit.
        valid.sort(key=lambda reply: reply.metadata.src_node_id)
        samples = [self._num_examples(reply) for reply in valid]
        with self._received_folder(server_round) as folder:
            adapters = [self._read_adapter(reply, folder / f"node-{reply.metadata.src_node_id}") for reply in valid]
            check_compatible(adapters, self.allow_base_mismatch)
            weights = client_weights(len(adapters), num_samples=samples)
            merged = model_output("global", "global", adapters, self.compute.output_dtype(widest_dtype(a.dtype for a in adapters)))
            # Keep every module at the largest rank any known node will ask for (late nodes included).
            largest = max(m.rank for layout in [*adapters, *self.layouts.values()] for m in layout.modules.values())
            updates = ClientUpdates(adapters, weights, registry.get("flexlora"))
            self._result = compute(updates, [merged], self.compute, store=UpdateStore(), keep_rank=largest)
        for reply, adapter in zip(valid, adapters):
            self.layouts[reply.metadata.src_node_id] = NodeLayout.of(adapter)
        global_tensors = output_tensors(self._result, merged, self.compute.balanced)
        if self.save_dir is not None:
            nodes = {reply.metadata.src_node_id: {"num-examples": n, "weight": w} for reply, n, w in zip(valid, samples, weights)}
            self._save_round(server_round, merged.config(), global_tensors, nodes)
        self._global = to_array_record(global_tensors)
        metrics = self.train_metrics_aggr_fn([reply.content for reply in valid], self.weighted_by_key)
        return self._global, metrics

    def _num_examples(self, reply: Message) -> float:
        metrics = list(reply.content.metric_records.values())
        if len(metrics) != 1 or self.weighted_by_key not in metrics[0]:
            raise InconsistentMessageReplies(
                reason=f"node {reply.metadata.src_node_id}: a train reply needs one MetricRecord with "
                f"{self.weighted_by_key!r} (its sample count)"
            )
        return float(metrics[0][self.weighted_by_key])

    def _read_adapter(self, reply: Message, folder: Path) -> Adapter:
        """A reply's adapter, written as a PEFT folder and validated exactly as the CLI's inputs."""
        node = reply.metadata.src_node_id
        content = reply.content
        arrays = list(content.array_records.values())
        lora = content.config_records.get(LORA_KEY)
        if len(arrays) != 1 or lora is None or ADAPTER_CONFIG_KEY not in lora:
            raise InconsistentMessageReplies(
                reason=f"node {node}: a reply needs one ArrayRecord (the LoRA adapter) and a ConfigRecord "
                f"{LORA_KEY!r} with {ADAPTER_CONFIG_KEY!r}; build it with flexlora_cli.flower.adapter_content"
            )
        folder.mkdir(parents=True)
        (folder / CONFIG_NAME).write_text(str(lora[ADAPTER_CONFIG_KEY]), encoding="utf-8")
        save_file(from_array_record(arrays[0]), str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        return load_adapter(folder, name=f"node-{node}")

    @contextlib.contextmanager
    def _received_folder(self, server_round: int) -> Iterator[Path]:
        if self.save_dir is None:
            with tempfile.TemporaryDirectory(prefix="flexlora-flower-") as folder:
                yield Path(folder)
            return
        folder = self.save_dir / f"round-{server_round}" / "received"
        if folder.exists():
            raise FileExistsError(f"{folder} exists; give FlexLoRA an empty save_dir")
        yield folder

    def _save_round(self, server_round: int, global_config, global_tensors, nodes: dict[int, dict]) -> None:
        """save_dir/round-<t>/: global/ and nodes/node-<id>/, each written whole, beside received/."""
        round_folder = self.save_dir / f"round-{server_round}"
        manifest = {"round": server_round, "nodes": {f"node-{node}": values for node, values in nodes.items()}}
        with OutputFolder(round_folder / "global", command="flower") as out:
            write_adapter(out.staging, global_config, global_tensors)
            out.commit(manifest)
        with OutputFolder(round_folder / "nodes", command="flower") as out:
            for node in nodes:
                write_adapter(out.staging / f"node-{node}", self.layouts[node].config, self.node_tensors(node))
            out.commit(manifest)
        (round_folder / "round.json").write_text(json.dumps(manifest["nodes"], indent=2, sort_keys=True), encoding="utf-8")
