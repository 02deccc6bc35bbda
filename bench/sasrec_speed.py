"""One SASRec training epoch: this project's loop against a straightforward PyTorch loop, side by side.

    python bench/sasrec_speed.py --dataset data/Beauty.txt --threads 2 --repeats 3

Both train the same model size (dim 64, 2 blocks, 1 head, max length 50) on every user once per
epoch with batch 128, one random negative per position and Adam. The straightforward loop is the
shape most SASRec ports have (SASRec.pytorch): nn.MultiheadAttention, every batch padded to 50,
negatives drawn per position in Python with a rejection loop. Ours: length-bucketed batches trimmed to
their longest sequence, negatives drawn as one tensor, SDPA attention; also timed without bucketing.
Prints seconds per epoch (median and all repeats) and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import command, emit, machine
from e4srec import contracts as c
from e4srec.sasrec import SASRec, SASRecConfig
from e4srec.stages import prepare_data, pretrain_sasrec
from torch import nn


class PlainSASRec(nn.Module):
    """SASRec as most ports write it: fixed width 50, nn.MultiheadAttention, timeline masking."""

    def __init__(self, n_items: int, dim: int = 64, blocks: int = 2, max_len: int = 50, dropout: float = 0.5):
        super().__init__()
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-8) for _ in range(blocks))
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, 1, dropout) for _ in range(blocks))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-8) for _ in range(blocks))
        self.ffns = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout), nn.ReLU(), nn.Linear(dim, dim), nn.Dropout(dropout))
            for _ in range(blocks)
        )
        self.last_norm = nn.LayerNorm(dim, eps=1e-8)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        x = self.item_emb(seqs) * self.item_emb.embedding_dim**0.5
        x = x + self.pos_emb(torch.arange(seqs.shape[1]).expand_as(seqs))
        x = self.drop(x)
        pad = (seqs == 0).unsqueeze(-1)
        x = x * ~pad
        T = seqs.shape[1]
        mask = ~torch.tril(torch.ones(T, T, dtype=torch.bool))
        for norm, attn, fnorm, ffn in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns):
            x = x.transpose(0, 1)
            q = norm(x)
            out, _ = attn(q, x, x, attn_mask=mask)
            x = (q + out).transpose(0, 1)
            h = fnorm(x)
            x = (h + ffn(h)) * ~pad
        return self.last_norm(x)


def plain_batch(train: list[list[int]], users: np.ndarray, n_items: int, max_len: int, rng: np.random.Generator):
    """Per-user Python sampling, as SASRec.pytorch's WarpSampler does it."""
    seqs, poss, negs = (np.zeros((len(users), max_len), dtype=np.int64) for _ in range(3))
    for b, u in enumerate(users):
        items = train[u]
        seen = set(items)
        nxt, idx = items[-1], max_len - 1
        for i in reversed(items[:-1]):
            seqs[b, idx], poss[b, idx] = i, nxt
            t = int(rng.integers(1, n_items + 1))
            while t in seen:
                t = int(rng.integers(1, n_items + 1))
            negs[b, idx] = t
            nxt, idx = i, idx - 1
            if idx == -1:
                break
    return torch.as_tensor(seqs), torch.as_tensor(poss), torch.as_tensor(negs)


def plain_epoch(model: PlainSASRec, opt: torch.optim.Optimizer, train: list[list[int]], n_items: int,
                batch_size: int, rng: np.random.Generator) -> float:
    bce = nn.BCEWithLogitsLoss()
    order = rng.permutation(len(train))
    t0 = time.perf_counter()
    for s in range(0, len(order), batch_size):
        seq, pos, neg = plain_batch(train, order[s : s + batch_size], n_items, 50, rng)
        h = model(seq)
        pl, nl = (h * model.item_emb(pos)).sum(-1), (h * model.item_emb(neg)).sum(-1)
        keep = pos != 0
        loss = bce(pl[keep], torch.ones_like(pl[keep])) + bce(nl[keep], torch.zeros_like(nl[keep]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def our_epoch(model: SASRec, opt: torch.optim.Optimizer, batches: pretrain_sasrec.Batches) -> float:
    t0 = time.perf_counter()
    for inputs, targets, negatives in batches:
        loss = model.loss(inputs, targets, negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=Path("data/Beauty.txt"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per loop")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_data.run(prepare_data.PrepareDataConfig(), args.dataset, Path(tmp) / "d")
        data = c.load_sequence_data(Path(tmp) / "d")
    matrix = data.train_matrix()
    train = [row[row > 0].tolist() for row in matrix]
    rng = np.random.default_rng(0)
    device = torch.device("cpu")
    times: dict[str, list[float]] = {}

    plain = PlainSASRec(data.n_items)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3, betas=(0.9, 0.98))
    times["plain PyTorch loop"] = [plain_epoch(plain, opt, train, data.n_items, 128, rng) for _ in range(args.repeats)]
    for bucket in (True, False):
        config = pretrain_sasrec.PretrainSasrecConfig(bucket_by_length=bucket, device="cpu")
        ours = SASRec(SASRecConfig(n_items=data.n_items, max_len=data.max_len)).train()
        opt = torch.optim.Adam(ours.parameters(), lr=1e-3, betas=(0.9, 0.98))
        batches = pretrain_sasrec.Batches(matrix, data.n_items, config, device)
        name = "e4srec, length-bucketed" if bucket else "e4srec, mixed lengths"
        times[name] = [our_epoch(ours, opt, batches) for _ in range(args.repeats)]

    base = statistics.median(times["plain PyTorch loop"])
    result = {
        "command": command(),
        "machine": machine("cpu"),
        "dataset": args.dataset.name, "users": data.n_users, "repeats": args.repeats,
        "seconds_per_epoch": {k: {"median": round(statistics.median(v), 2), "all": [round(x, 2) for x in v]}
                              for k, v in times.items()},
        "speedup_vs_plain": {k: round(base / statistics.median(v), 2) for k, v in times.items()},
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
