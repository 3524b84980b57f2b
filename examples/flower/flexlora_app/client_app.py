"""ClientApp: fine-tune this node's LoRA adapter at its own rank, starting from what the server sent.

A node's rank and dtype come from its node config (`flower-supernode --node-config
"lora-rank=8 lora-dtype=bfloat16 ..."`), else from the comma-separated `ranks` and `dtypes`
lists indexed by the node's partition-id (simulation). Every setting is looked up in the
server's message config, then the run config ([tool.flwr.app.config]), then DEFAULTS.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexlora_app import task
from flexlora_cli.flower import adapter_content, load_adapter_arrays

DEFAULTS = {"ranks": "2,4,8", "dtypes": "float32", "local-steps": 10, "learning-rate": 0.01, "examples-per-rank": 16}

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = _settings(msg, context)
    partition, rank, dtype = _node(settings, context)
    model = task.build_model(rank, dtype, seed=partition)
    load_adapter_arrays(model, msg.content.array_records["arrays"])
    data = task.load_data(partition, int(settings["examples-per-rank"]) * rank)
    loss = task.train(model, data, int(settings["local-steps"]), float(settings["learning-rate"]))
    return Message(adapter_content(model, {"num-examples": len(data), "train-loss": loss}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    partition, rank, dtype = _node(_settings(msg, context), context)
    model = task.build_model(rank, dtype, seed=partition)
    load_adapter_arrays(model, msg.content.array_records["arrays"])
    data = task.load_data(partition, 32)
    metrics = MetricRecord({"num-examples": len(data), "eval-loss": task.evaluate(model, data)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """The strategy asks nodes it has not heard from for their adapter, to learn their rank."""
    partition, rank, dtype = _node(_settings(msg, context), context)
    return Message(adapter_content(task.build_model(rank, dtype, seed=partition)), reply_to=msg)


def _settings(msg: Message, context: Context) -> dict:
    config = msg.content.config_records.get("config") or {}
    return {key: config.get(key, context.run_config.get(key, default)) for key, default in DEFAULTS.items()}


def _node(settings: dict, context: Context) -> tuple[int, int, str]:
    partition = int(context.node_config.get("partition-id", 0))
    ranks = str(settings["ranks"]).split(",")
    dtypes = str(settings["dtypes"]).split(",")
    rank = int(context.node_config.get("lora-rank", ranks[partition % len(ranks)]))
    dtype = str(context.node_config.get("lora-dtype", dtypes[partition % len(dtypes)]))
    return partition, rank, dtype
