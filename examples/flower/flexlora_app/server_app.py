"""ServerApp: FlexLoRA rounds over all connected nodes, whatever their ranks."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flexlora_cli.flower import FlexLoRA

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    nodes = int(config.get("min-nodes", 3))
    strategy = FlexLoRA(
        min_available_nodes=nodes,
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
        save_dir=str(config.get("save-dir", "")) or None,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),  # round 1: every node starts from its own fresh LoRA
        num_rounds=int(config.get("num-server-rounds", 3)),
    )
    losses = {r: round(float(m["eval-loss"]), 4) for r, m in result.evaluate_metrics_clientapp.items()}
    print(f"FlexLoRA finished: evaluation loss by round {losses}", flush=True)
