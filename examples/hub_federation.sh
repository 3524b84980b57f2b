#!/usr/bin/env bash
# Two FlexLoRA rounds with the Hugging Face Hub as the only shared place.
#
# Each client has its own repo, $ORG/$PREFIX-<name>. A client pushes its trained LoRA adapter there;
# the server aggregates straight from the repos and pushes every client's next adapter back into
# that client's repo (one commit each, with a model card naming the inputs' commits and hashes).
#
#   HF_TOKEN=hf_... ORG=my-user bash examples/hub_federation.sh alice=runs/a bob=runs/b carol=runs/c
#
# Settings (environment): ORG (required), PREFIX (default flexlora-demo), NUM_SAMPLES (e.g. 120,300,80;
# default: equal weights), WORK (local scratch, default ./hub-federation), PRIVATE=1 for private repos,
# HF_ENDPOINT (default https://huggingface.co; the tests point it at a loopback Hub).
set -euo pipefail

: "${ORG:?set ORG to your Hub user or organization}"
PREFIX=${PREFIX:-flexlora-demo}
ENDPOINT=${HF_ENDPOINT:-https://huggingface.co}
WORK=${WORK:-./hub-federation}
if [ "$#" -lt 2 ]; then
    echo "usage: ORG=... $0 NAME=ADAPTER_FOLDER NAME=ADAPTER_FOLDER [...]" >&2
    exit 2
fi
weighting=()
[ -n "${NUM_SAMPLES:-}" ] && weighting=(--num-samples "$NUM_SAMPLES")
privacy=()
[ -n "${PRIVATE:-}" ] && privacy=(--private)
mkdir -p "$WORK"

# Round 1, client side: every client pushes the adapter it trained (any Hub tool will do; here the hf CLI).
clients=()
for spec in "$@"; do
    name=${spec%%=*}
    folder=${spec#*=}
    hf upload "$ORG/$PREFIX-$name" "$folder" . "${privacy[@]}" \
        --include adapter_config.json --include adapter_model.safetensors \
        --commit-message "client $name: locally trained adapter" >/dev/null
    clients+=("$name=$ORG/$PREFIX-$name")
done

for round in 1 2; do
    # Server side: pull the clients' latest adapters from their repos, run one FlexLoRA round,
    # and push each client's next adapter (at the client's own rank) back into its repo.
    flexlora aggregate "${clients[@]}" "${weighting[@]}" -o "$WORK/round-$round" --overwrite \
        --push-to-hub "$ORG/$PREFIX-{name}" "${privacy[@]}" --commit-message "FlexLoRA round $round"
    # Client side, between rounds: pull $ORG/$PREFIX-<name>, train locally from it, push the result.
    # (This demo has no training step: round 2 aggregates the adapters that round 1 handed out.)
done
echo "each client's next adapter: $ENDPOINT/$ORG/$PREFIX-<name> (see its README.md for what produced it)" >&2
