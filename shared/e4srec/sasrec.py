"""SASRec (Kang & McAuley, ICDM 2018): self-attentive sequential recommendation.

Read top to bottom: blocks, config, model. Two architectures share everything else (learned absolute
positions, causal attention over non-padding keys, shared item embeddings for input and output):

- `kang`: the paper's reference code. Item embeddings scaled by sqrt(d), pre-norm blocks whose
  attention queries are normalised but keys and values are not, a d -> d ReLU feed-forward, a final
  LayerNorm, Xavier initialisation.
- `s3rec`: the SASRec of the S3-Rec code (Zhou et al. 2020, reused by CL4SRec and its successors),
  which produced the published full-ranking numbers on the Amazon files. A LayerNorm over item +
  position embeddings, post-norm BERT blocks (residual, then LayerNorm), a d -> 4d -> d GELU
  feed-forward, N(0, 0.02) initialisation.

Two losses: `bce` (one sampled negative per position, the paper's) and `ce` (softmax over all items,
which ranks far better on sparse data).

Files (a pretrain-sasrec output folder): `model.safetensors` (weights), `config.json` (architecture,
training settings, item-map hash) and `item_embeddings.safetensors`, the (N+1, dim) table E4SRec
reads, with the item-map hash in its header; `save_model`/`load_model` and
`save_item_embeddings`/`load_item_embeddings` at the end of this file write and read them.

Sequences are left-padded with item 0, so the last column is always the most recent item. Batches
may be trimmed to their longest sequence: positions count from the right end of the `max_len`
window and padded keys are masked, so a trimmed batch gives exactly the outputs of a full-width one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import safe_open, save_file
from torch import nn

from e4srec import contracts as c
from e4srec.errors import E4SRecError
from e4srec.settings import SASREC_ARCHITECTURES as ARCHITECTURES


class CausalSelfAttention(nn.Module):
    """Multi-head attention where position t sees positions <= t that are not padding."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = query.shape
        h = self.n_heads
        q = self.q(query).view(B, T, h, D // h).transpose(1, 2)  # (B, h, T, D/h)
        k, v = self.kv(keys).view(B, T, 2, h, D // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, T, D/h)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, T, D/h)
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class FeedForward(nn.Module):
    """Point-wise two-layer network (the paper's 1x1 convolutions), with its own residual."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.Dropout(dropout), nn.ReLU(), nn.Linear(dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Block(nn.Module):
    """One `kang` block. Queries are normalised, keys/values are not, as in the reference code."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.attn = CausalSelfAttention(dim, n_heads, dropout)  # dropout on the attention weights only
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = FeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        x = q + self.attn(q, x, mask)
        return self.ffn(self.ffn_norm(x)) * keep  # padding positions stay zero


class PostNormBlock(nn.Module):
    """One `s3rec` block: attention and a 4x GELU feed-forward, each added to its input then normalised."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(dim, n_heads, dropout)
        self.attn_drop = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(dim, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_drop(self.attn(x, x, mask)))
        return self.ffn_norm(x + self.ffn(x)) * keep  # padding positions stay zero




@dataclass
class SASRecConfig:
    """Architecture and objective; saved as `config.json` beside the weights."""

    n_items: int  # N: real items are 1..N, index 0 is padding
    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    max_len: int = 50
    dropout: float = 0.5
    loss: str = "bce"
    arch: str = "kang"  # configs saved before `s3rec` existed name no arch: they are `kang`

    def __post_init__(self) -> None:
        if self.n_items < 1:
            raise E4SRecError(f"SASRecConfig.n_items={self.n_items}: need at least one item")
        if self.dim % self.n_heads:
            raise E4SRecError(f"SASRecConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.loss not in ("bce", "ce"):
            raise E4SRecError(f"SASRecConfig.loss={self.loss!r}: expected 'bce' or 'ce'")
        if self.arch not in ARCHITECTURES:
            raise E4SRecError(f"SASRecConfig.arch={self.arch!r}: expected one of {', '.join(ARCHITECTURES)}")

    def to_dict(self) -> dict:
        return asdict(self)


class SASRec(nn.Module):
    """Causal transformer over item sequences; item embeddings double as the output layer."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        # Row 0 is padding: zero and never trained, so left padding contributes nothing.
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.emb_drop = nn.Dropout(config.dropout)
        kang = config.arch == "kang"
        block = Block if kang else PostNormBlock
        self.blocks = nn.ModuleList(block(d, config.n_heads, config.dropout) for _ in range(config.n_blocks))
        # kang: items scaled by sqrt(d), a LayerNorm after the last pre-norm block; s3rec: a LayerNorm
        # over item + position embeddings before the first post-norm block. Identity has no weights, so
        # each arch's saved state holds only its own norm.
        self.emb_scale = math.sqrt(d) if kang else 1.0
        self.emb_norm = nn.Identity() if kang else nn.LayerNorm(d, eps=1e-12)
        self.final_norm = nn.LayerNorm(d, eps=1e-8) if kang else nn.Identity()
        # kang: Xavier for every matrix, as its reference code does; it trains markedly better than
        # PyTorch's defaults (N(0, 1) embeddings swamp the positions). s3rec: BERT's N(0, 0.02).
        self._init_weight = nn.init.xavier_normal_ if kang else (lambda w: nn.init.normal_(w, std=0.02))
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            self._init_weight(m.weight)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Hidden state after each position: seqs (B, T) left-padded, T <= max_len -> (B, T, d)."""
        B, T = seqs.shape
        if T > self.config.max_len:
            raise E4SRecError(f"sequence width {T} exceeds max_len {self.config.max_len}; cut histories first")
        keep = (seqs > 0).unsqueeze(-1)  # (B, T, 1)
        positions = torch.arange(self.config.max_len - T, self.config.max_len, device=seqs.device)  # (T,)
        x = self.emb_norm(self.item_emb(seqs) * self.emb_scale + self.pos_emb(positions))  # (B, T, d)
        x = self.emb_drop(x) * keep
        causal = torch.ones(T, T, dtype=torch.bool, device=seqs.device).tril()  # (T, T)
        # A padded query would see no key at all (NaN softmax): let every position see itself.
        mask = (causal & keep.transpose(1, 2)) | torch.eye(T, dtype=torch.bool, device=seqs.device)  # (B, T, T)
        mask = mask.unsqueeze(1)  # (B, 1, T, T), broadcast over heads
        for block in self.blocks:
            x = block(x, mask, keep)
        return self.final_norm(x)  # (B, T, d)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-item loss over non-padding positions.

        inputs, targets (B, T): targets[:, t] is the item after inputs[:, t], 0 where there is none.
        negatives (B, T): one sampled item per position, required for `bce`, ignored by `ce`.
        """
        h = self.forward(inputs)  # (B, T, d)
        valid = targets > 0  # (B, T)
        if self.config.loss == "ce":
            hv = h[valid]  # (M, d)
            logits = hv @ self.item_emb.weight[1:].T  # (M, N): the padding item is never a class
            return F.cross_entropy(logits, targets[valid] - 1)
        if negatives is None:
            raise ValueError("bce loss needs one negative item per position")
        pos = (h * self.item_emb(targets)).sum(-1)[valid]  # (M,)
        neg = (h * self.item_emb(negatives)).sum(-1)[valid]  # (M,)
        return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
            neg, torch.zeros_like(neg)
        )

    @torch.no_grad()
    def score_all_items(self, histories: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each left-padded history (B, T) -> (B, N+1); column 0 is -inf."""
        last = self.forward(histories)[:, -1]  # (B, d): the most recent position
        scores = last @ self.item_emb.weight.T  # (B, N+1)
        scores[:, 0] = float("-inf")
        return scores

    def item_embeddings(self) -> torch.Tensor:
        """The (N+1, d) item table, row 0 = padding (zeros): what E4SRec consumes."""
        return self.item_emb.weight.detach().clone()


# Files ---------------------------------------------------------------------------------------------

WRITER = "pretrain-sasrec"  # the stage that writes these folders (config.json "stage")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
EMBEDDINGS = "item_embeddings.safetensors"
EMBEDDINGS_KEY = "item_embeddings"


def save_model(out: Path, model: SASRec, item_map_sha256: str, extra: dict[str, Any]) -> None:
    """Write weights, config.json (architecture, item-map hash and `extra`) and the item-embedding table."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    c.write_json(out / CONFIG, {"stage": WRITER, "model": model.config.to_dict(), **extra,
                                "item_map_sha256": item_map_sha256})
    save_item_embeddings(out / EMBEDDINGS, model.item_embeddings(), item_map_sha256, "sasrec")


def load_model(model_dir: Path | str, data: c.SequenceData | None = None, meta: dict[str, Any] | None = None
               ) -> SASRec:
    """Rebuild a trained SASRec; with `data`, check it was trained on the same item map.

    `meta`: the folder's config.json when the caller has read it already.
    """
    model_dir = Path(model_dir)
    meta = meta or c.read_model_config(model_dir / CONFIG, WRITER)
    if data is not None:
        c.check_item_map_hash(meta.get("item_map_sha256"), data.item_map_sha256, str(model_dir / CONFIG),
                              "evaluate it on the data it was trained on, or re-run pretrain-sasrec")
        if meta["model"]["max_len"] != data.max_len:
            raise E4SRecError(f"{model_dir / CONFIG}: max_len {meta['model']['max_len']} differs from the data's "
                              f"{data.max_len}; re-run pretrain-sasrec on this data")
    try:
        model = SASRec(SASRecConfig(**meta["model"]))
    except (TypeError, ValueError, KeyError) as e:
        raise E4SRecError(f"{model_dir / CONFIG}: field 'model' is not a SASRec configuration ({e}); "
                          f"point at a pretrain-sasrec output") from None
    weights = c.read_safetensors(model_dir / WEIGHTS)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise E4SRecError(f"{model_dir / WEIGHTS}: does not fit the model its config.json describes ({first}); "
                          f"point at a pretrain-sasrec output") from None
    return model.eval()


def save_item_embeddings(path: Path, embeddings: torch.Tensor, item_map_sha256: str, source: str) -> None:
    """(N+1, d) float32 table with the item-map hash in the safetensors header."""
    save_file({EMBEDDINGS_KEY: embeddings.detach().float().cpu().contiguous()}, str(path), metadata={
        "item_map_sha256": item_map_sha256, "n_items": str(embeddings.shape[0] - 1),
        "dim": str(embeddings.shape[1]), "source": source,
    })


def load_item_embeddings(path: Path | str, expected_item_map_sha256: str) -> torch.Tensor:
    """Read an item-embedding table (a file, or the folder holding it), refusing one of another item map."""
    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDINGS
    if not path.is_file():
        raise E4SRecError(f"{path}: embeddings file not found; point at a pretrain-sasrec output")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            table = f.get_tensor(EMBEDDINGS_KEY)
    except Exception as e:  # safetensors raises its own error types
        raise E4SRecError(f"{path}: not a readable safetensors embedding table ({e})") from None
    c.check_item_map_hash(meta.get("item_map_sha256"), expected_item_map_sha256, str(path),
                          "re-run pretrain-sasrec on this data")
    if table.ndim != 2 or not table.is_floating_point():
        raise E4SRecError(f"{path}: {EMBEDDINGS_KEY} is a {tuple(table.shape)} {table.dtype} tensor, not a "
                          f"(items + 1, dim) float table; point at a pretrain-sasrec output")
    bad = (~torch.isfinite(table)).any(1).nonzero().flatten()
    if len(bad):
        raise E4SRecError(f"{path}: row {int(bad[0])} of {EMBEDDINGS_KEY} is not finite (NaN or inf; {len(bad)} rows "
                          f"in all); re-run pretrain-sasrec")
    return table
