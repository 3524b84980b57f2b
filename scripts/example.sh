#!/usr/bin/env bash
# Set up (if needed), run one FlexLoRA server round on the shipped example clients, and check
# every output by loading it with PEFT. Writes ./round-2/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1  # everything here is local
set -x
flexlora inspect examples/clients/carol --spectrum 4,8,16
flexlora aggregate examples/clients/alice examples/clients/bob examples/clients/carol \
    --num-samples 120,300,80 -o round-2 --overwrite
python examples/check_round.py round-2
