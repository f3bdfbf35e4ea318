"""Small Lightning modules and data for parity tests: a user's own module (not this project's
model) and fixed token data whose global batches are known."""
from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class FixedTokens(Dataset):
    """`n` fixed random token windows; item i is the same in every process."""

    def __init__(self, n: int = 64, seq_len: int = 16, vocab: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.randint(vocab, (n, seq_len + 1), generator=gen)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i, :-1], "labels": self.data[i, 1:]}


class UserModule(L.LightningModule):
    """A user's own model: embedding, two-layer MLP, head; plain SGD with momentum."""

    def __init__(self, vocab: int = 64, dim: int = 32, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                 nn.Linear(4 * dim, dim), nn.LayerNorm(dim), nn.Linear(dim, vocab))
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        logits = self.net(batch["input_ids"])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader(dataset: Dataset, batch_size: int, replicas: int = 1, rank: int = 0) -> DataLoader:
    """In order, no shuffling; with replicas > 1, rank r gets items r, r + replicas, ... so the
    union of the ranks' k-th batches is the single process's k-th batch. Always a
    DistributedSampler, which Lightning keeps instead of inserting a shuffling one."""
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().cpu().clone()
    return out


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class MixedLengthTokens(FixedTokens):
    """FixedTokens whose item i is cut to `lengths[(i // group) % len(lengths)]` tokens, so every
    run of `group` consecutive items (one global batch) shares a length."""

    def __init__(self, lengths: list[int], group: int, **kwargs) -> None:
        super().__init__(seq_len=max(lengths), **kwargs)
        self.lengths, self.group = lengths, group

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = self.lengths[(i // self.group) % len(self.lengths)]
        item = super().__getitem__(i)
        return {k: v[:n] for k, v in item.items()}


class LossRecorder(L.Callback):
    """Every micro-batch's loss and the parameters when training starts (after a checkpoint has
    been restored). `average_over_ranks`: the loss averaged over all ranks, which is the
    one-process loss of the global batch when every rank holds as many sequences (the MoE balance
    loss is a mean over sequences too); otherwise this rank's own."""

    def __init__(self, average_over_ranks: bool = False) -> None:
        self.average_over_ranks = average_over_ranks
        self.losses: list[float] = []
        self.start_params: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_params = params_of(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if self.average_over_ranks and dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(float(loss))


class PackedDocumentWindows(FixedTokens):
    """FixedTokens as packed documents: every run of `group` consecutive items (one global batch)
    shares the document lengths `patterns[(i // group) % len(patterns)]` (summing to seq_len);
    positions restart per document and nothing is predicted across documents."""

    def __init__(self, patterns: list[list[int]], group: int, **kwargs) -> None:
        super().__init__(seq_len=sum(patterns[0]), **kwargs)
        self.patterns, self.group = patterns, group

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        lengths = self.patterns[(i // self.group) % len(self.patterns)]
        ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])
        labels = item["labels"].clone()
        labels[torch.tensor(lengths).cumsum(0) - 1] = -100
        return {**item, "labels": labels, "document_ids": ids,
                "positions": torch.cat([torch.arange(n) for n in lengths])}


def fp64_causal_lm(model: dict, total_steps: int) -> "L.LightningModule":
    """The project's CausalLMModule of `model` (ModelConfig fields) built in fp64 from seed 0
    (AdamW lr 1e-2, one warm-up step): the reference and the parallel runs of a parity test build
    the same one. Switches torch's default dtype (conftest switches it back after each test)."""
    import lightning_attn_parallel as lap
    from lightning_attn_parallel.models import ModelConfig

    L.seed_everything(0, verbose=False)
    torch.set_default_dtype(torch.float64)
    module = lap.CausalLMModule(ModelConfig(**model), lr=1e-2, warmup_steps=1, total_steps=total_steps)
    module.configure_model()
    return module
