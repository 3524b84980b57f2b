"""FlexLoRA on Flower: nodes fine-tune LoRA adapters of different ranks on one tiny local model."""
