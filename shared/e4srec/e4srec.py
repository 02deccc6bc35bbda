"""E4SRec (Li et al. 2023): a frozen decoder LLM that ranks the whole catalog in one forward pass.

Read top to bottom: prompt layout, config, model. The prompt for a user is

    [instruction tokens] [Linear(64 -> hidden)(SASRec embedding of each history item)] [response prefix]

and the hidden state of its last position goes through a bias-free `Linear(hidden -> N+1)` item head,
trained with cross-entropy over all items. Only LoRA (gate/up/down projections by default), the input
projection and the head train; the LLM and the SASRec table stay frozen.

Why the whole prompt is left-padded: every row must end on the response prefix so that position -1 is
the one the head reads, and position ids must start at 0 on each row's first real token, so a short
history sees exactly the positions it would see alone in a batch of one.

Why a prefix cache helps: the instruction tokens are the same for every user, come first, and (with
position ids from 0) produce the same keys and values in every row. Scoring computes them once (batch
1) and reuses them for every batch; the items and the response prefix then follow, with the padding
between them masked, which gives the same attention as the left-padded layout. Training does the same
per step (`shared_prefix=True`): LoRA changes the prefix's keys and values, so they are recomputed
once per batch, with gradients, instead of once per row. The prefix is most of a Beauty prompt (54 of
about 70 tokens), so this is most of the work saved; the only difference is that LoRA dropout on the
instruction tokens is drawn once per batch rather than once per row.

Files (a train-e4srec output folder), written by `save_model` and read by `load_model` at the end:
  adapter/                     PEFT adapter of the decoder (PeftModel.from_pretrained(decoder, "adapter"))
  head_proj.safetensors        input projection (64 -> hidden) and item head (hidden -> N+1)
  item_embeddings.safetensors  the frozen SASRec table (copied, so the model is self-contained)
  item_map.parquet             original item ids of rows 1..N
  instruct_adapter/            the instruction adapter the backbone carried, when there was one
  config.json                  architecture, backbone fields, prompt, item-map hash, training settings
No backbone weights: config.json names the backbone, and its fingerprint must match on loading.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from e4srec import contracts as c
from e4srec.backbones import BackboneOptions, fingerprint, load_backbone
from e4srec.errors import E4SRecError
from e4srec.llm import LLM_FIELDS, apply_adapter
from e4srec.sasrec import EMBEDDINGS, load_item_embeddings, save_item_embeddings
from e4srec.storage import fetch


def left_pad_layout(mask: torch.Tensor) -> torch.Tensor:
    """Per-row permutation that moves masked-out positions to the front, keeping the order of the rest.

    mask (B, T) of 0/1 -> index (B, T) for gather along dim 1. A stable sort on the mask does it.
    """
    return torch.sort(mask.to(torch.int8), dim=1, stable=True).indices


def position_ids(mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Positions counted from each row's first real token (pads get 0, they are masked anyway)."""
    return (mask.long().cumsum(1) - 1).clamp(min=0) + offset  # (B, T)


class LoRADropout(nn.Dropout):
    """Inverted dropout whose CPU mask needs a quarter of the random draws of torch's.

    Torch's CPU dropout draws one random number per element, on one thread: LoRA's dropout on the
    three MLP projections of every layer took 16% of a bf16 SmolLM2 training step on 2 cores. Here
    each 64-bit draw gives four 16-bit lanes and an element is kept when its lane is at least a
    threshold, so the keep probability is 1 - p to within 2^-16. Elsewhere (CUDA) torch's own runs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)  # every bit uniform
        threshold = min(round(self.p * 65536) - 32768, 32767)  # P(lane < threshold) = p; p < 1 by config
        keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold  # (4n',) int16 lanes -> x's shape
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


@dataclass
class E4SRecConfig:
    """Architecture settings saved beside the trained weights (config.json)."""

    n_items: int  # N: items are 1..N, index 0 is padding and is never predicted
    item_dim: int = 64
    hidden_size: int = 0  # the backbone's, filled in at construction
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: str = "gate_proj,up_proj,down_proj"
    max_len: int = 50

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class E4SRec(nn.Module):
    """Frozen LLM + frozen ID embeddings + (LoRA, projection, item head)."""

    def __init__(self, config: E4SRecConfig, decoder: nn.Module, tokenizer: Any, item_table: torch.Tensor,
                 prefix_text: str, response_prefix: str) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if item_table.shape[1] != config.item_dim:
            raise E4SRecError(f"item embeddings are {item_table.shape[1]}-dimensional but the input projection takes "
                              f"{config.item_dim}; retrain SASRec with --dim {config.item_dim} or set --item-dim "
                              f"{item_table.shape[1]}")
        if item_table.shape[0] != config.n_items + 1:
            raise E4SRecError(f"item embeddings have {item_table.shape[0]} rows, the data {config.n_items} items "
                              f"plus padding; they belong to another item map")
        config.hidden_size = int(decoder.config.hidden_size)
        self.config = config
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=[m for m in config.target_modules.split(",") if m])
        try:
            self.llm = get_peft_model(decoder, lora)
        except ValueError as e:  # a module name the backbone does not have
            raise E4SRecError(f"target_modules={config.target_modules!r}: {e}") from None
        for module in self.llm.modules():  # same dropout, cheaper mask (see LoRADropout)
            for key, drop in getattr(module, "lora_dropout", {}).items():
                if type(drop) is nn.Dropout:
                    module.lora_dropout[key] = LoRADropout(drop.p)
        # Frozen SASRec table; row 0 is padding and its projection is masked out of attention anyway.
        self.item_emb = nn.Embedding.from_pretrained(item_table.float(), freeze=True, padding_idx=0)
        self.proj = nn.Linear(config.item_dim, config.hidden_size)
        # No bias: a bias would be a per-item popularity score the backbone need not learn to express.
        self.head = nn.Linear(config.hidden_size, config.n_items + 1, bias=False)
        ids = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        self.prompt = {"prefix": prefix_text, "response_prefix": response_prefix}
        self.register_buffer("prefix_ids", ids(prefix_text), persistent=False)  # (P,)
        self.register_buffer("suffix_ids", ids(response_prefix), persistent=False)  # (S,)
        params = inspect.signature(decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x

    @torch.no_grad()
    def init_head_from_items(self) -> None:
        """Start each head row as its item's projected SASRec embedding, at the default init's row norm.

        A random head knows nothing about 12k items and learns each row only from that item's own
        targets; rows that start as `proj(e_i)` (without the bias, common to all rows) already place
        items SASRec found alike near each other, so a target teaches its neighbours too.
        """
        rows = self.item_emb.weight.to(self.proj.weight.dtype) @ self.proj.weight.T  # (N+1, H)
        scale = self.head.weight[1:].norm(dim=1).mean() / rows[1:].norm(dim=1).mean().clamp_min(1e-12)
        self.head.weight.copy_(rows * scale)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every weight that trains (LoRA, projection, head): what checkpoints and DDP carry."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def _items(self, histories: torch.Tensor) -> torch.Tensor:
        if histories.numel() and (histories.min() < 0 or histories.max() > self.config.n_items):
            bad = histories[(histories < 0) | (histories > self.config.n_items)][0].item()
            raise E4SRecError(f"history item index {bad} is outside 1..{self.config.n_items}; map ids with the "
                              f"item map first")
        emb = self.proj(self.item_emb(histories))  # (B, L, H)
        return emb.to(self.llm.get_input_embeddings().weight.dtype)  # bf16 backbones take bf16 inputs

    def _last_hidden(self, histories: torch.Tensor) -> torch.Tensor:
        """Hidden state of the final position for left-padded histories (B, L): the uncached path."""
        B = histories.shape[0]
        prefix = self._embed_tokens(self.prefix_ids).expand(B, -1, -1)  # (B, P, H)
        suffix = self._embed_tokens(self.suffix_ids).expand(B, -1, -1)  # (B, S, H)
        x = torch.cat([prefix, self._items(histories), suffix], 1)  # (B, P+L+S, H), pads mid-row
        ones = lambda n: torch.ones(B, n, dtype=torch.long, device=histories.device)  # noqa: E731
        mask = torch.cat([ones(len(self.prefix_ids)), (histories > 0).long(), ones(len(self.suffix_ids))], 1)
        order = left_pad_layout(mask)  # move the pads to the front of each row
        x = x.gather(1, order[..., None].expand_as(x))  # (B, T, H), left-padded
        mask = mask.gather(1, order)
        out = self.llm(inputs_embeds=x, attention_mask=mask, position_ids=position_ids(mask))
        return out.last_hidden_state[:, -1]  # (B, H): the response prefix's last token

    def _prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values) of the instruction tokens, batch 1, under the current weights."""
        out = self.llm(inputs_embeds=self._embed_tokens(self.prefix_ids)[None], use_cache=True)
        cache = getattr(out, self._cache_kwarg)  # `cache` since transformers 5.2x, `past_key_values` before
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _last_hidden_after_prefix(self, histories: torch.Tensor,
                                  prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden state of the final position, the instruction given as keys/values (B, L) -> (B, H)."""
        from transformers import DynamicCache

        B, P = histories.shape[0], len(self.prefix_ids)
        suffix = self._embed_tokens(self.suffix_ids).expand(B, -1, -1)  # (B, S, H)
        x = torch.cat([self._items(histories), suffix], 1)  # (B, L+S, H), pads first
        new_mask = torch.cat([(histories > 0).long(), torch.ones_like(histories[:, :1]).expand(-1, suffix.shape[1])], 1)
        mask = torch.cat([torch.ones(B, P, dtype=torch.long, device=x.device), new_mask], 1)  # (B, P+L+S)
        past = DynamicCache(ddp_cache_data=[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix],
                            config=self.llm.get_base_model().config)
        out = self.llm(inputs_embeds=x, attention_mask=mask, position_ids=position_ids(new_mask, offset=P),
                       use_cache=True, **{self._cache_kwarg: past})
        return out.last_hidden_state[:, -1]  # (B, H)

    @torch.no_grad()
    def score_packed(self, histories: list[list[int]],
                     cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Scores of every item for histories of any lengths, packed into one sequence -> (B, N+1).

        Each history's items and response prefix follow one another in a single row; a block-diagonal
        causal mask lets each attend to the cached instruction and to its own tokens only, and its
        positions start after the instruction as in `score_all_items`. The linear layers, most of a
        forward pass, then see only real tokens: padding a batch to its longest history costs as much
        as real items, and a server's concurrent requests have any lengths. Attention grows with the
        square of the packed length, so callers pack a few hundred tokens at a time (`PACK_TOKENS`).
        """
        from transformers import DynamicCache

        device, S, P = self.prefix_ids.device, len(self.suffix_ids), cache[0][0].shape[2]
        suffix = self._embed_tokens(self.suffix_ids)  # (S, H)
        pieces, positions, ends, seq = [], [], [], []
        for u, history in enumerate(histories):
            items = torch.tensor(history, dtype=torch.long, device=device)
            pieces += [self._items(items[None])[0], suffix]
            n = len(history) + S
            positions.append(torch.arange(P, P + n, device=device))
            seq.append(torch.full((n,), u, device=device))
            ends.append((ends[-1] if ends else 0) + n)
        x = torch.cat(pieces)[None]  # (1, T, H)
        seq, T = torch.cat(seq), x.shape[1]
        own = (seq[:, None] == seq[None, :]) & torch.ones(T, T, dtype=torch.bool, device=device).tril()
        allowed = torch.cat([torch.ones(T, P, dtype=torch.bool, device=device), own], 1)  # (T, P+T)
        dtype = x.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        past = DynamicCache(ddp_cache_data=[(k, v) for k, v in cache], config=self.llm.get_base_model().config)
        out = self.llm(inputs_embeds=x, attention_mask=mask[None, None], position_ids=torch.cat(positions)[None],
                       use_cache=True, **{self._cache_kwarg: past})
        last = torch.tensor(ends, device=device) - 1
        return self._item_logits(out.last_hidden_state[0, last])  # (B, H) -> (B, N+1)

    def logits(self, histories: torch.Tensor, shared_prefix: bool = False) -> torch.Tensor:
        """(B, N+1) item logits with gradients, padding column at -inf (training).

        shared_prefix: compute the instruction tokens once for the batch rather than once per row.
        """
        hidden = (self._last_hidden_after_prefix(histories, self._prefix_kv()) if shared_prefix
                  else self._last_hidden(histories))
        return self._item_logits(hidden)

    def _item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The item head on final hidden states (B, H) -> (B, N+1), the padding column at -inf.

        The head keeps its own dtype (fp32) whatever the backbone's: a bf16 hidden state is cast up to it.
        """
        logits = self.head(hidden.to(self.head.weight.dtype)).float()
        logits[:, 0] = float("-inf")
        return logits

    def forward(self, histories: torch.Tensor, shared_prefix: bool = False) -> torch.Tensor:
        """Training logits (what DistributedDataParallel calls)."""
        return self.logits(histories, shared_prefix)

    def loss(self, histories: torch.Tensor, targets: torch.Tensor, shared_prefix: bool = False) -> torch.Tensor:
        """Mean cross-entropy over all items of the next item `targets` (B,) after `histories` (B, L)."""
        return F.cross_entropy(self.logits(histories, shared_prefix), targets)

    @torch.no_grad()
    def prefix_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values) of the instruction tokens, batch 1: compute once per set of weights."""
        return self._prefix_kv()

    @torch.no_grad()
    def score_all_items(self, histories: torch.Tensor,
                        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Scores of every item for left-padded histories (B, L) -> (B, N+1); column 0 is -inf.

        With `cache` (from `prefix_cache()`), the instruction tokens are not recomputed. An empty
        history (all padding) is scored from the prompt alone: the model's ranking with no evidence.
        """
        if cache is None:
            return self.logits(histories)
        return self._item_logits(self._last_hidden_after_prefix(histories, cache))


# Files ---------------------------------------------------------------------------------------------

WRITER = "train-e4srec"  # the stage that writes these folders (config.json "stage")
ADAPTER = "adapter"
HEAD = "head_proj.safetensors"
CONFIG = "config.json"
INSTRUCT_ADAPTER = "instruct_adapter"
DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def backbone_dtype(model: E4SRec) -> torch.dtype:
    """The precision the backbone computes in (its input embeddings': quantized layers compute in it too)."""
    return model.llm.get_input_embeddings().weight.dtype


def save_model(out: Path, model: E4SRec, backbone: dict[str, Any], item_map: Path, item_map_sha256: str,
               record: dict[str, Any], instruct_adapter: Path | None = None) -> None:
    """Write the self-contained model folder: trained weights, item table and map, and config.json.

    `backbone`: the backbone's fields (LLM_FIELDS: config.json's `backbone` section); `record`: what else
    config.json keeps (training settings).
    """
    model.llm.save_pretrained(str(out / ADAPTER))
    save_file({"proj.weight": model.proj.weight.detach().float().cpu().contiguous(),
               "proj.bias": model.proj.bias.detach().float().cpu().contiguous(),
               "head.weight": model.head.weight.detach().float().cpu().contiguous()}, str(out / HEAD))
    save_item_embeddings(out / EMBEDDINGS, model.item_emb.weight, item_map_sha256, "sasrec")
    shutil.copyfile(item_map, out / c.ITEM_MAP)
    if instruct_adapter is not None:
        shutil.copytree(instruct_adapter, out / INSTRUCT_ADAPTER)
    recorded = {k: backbone[k] for k in LLM_FIELDS} | {"fingerprint": fingerprint(model.llm.get_base_model().config)}
    c.write_json(out / CONFIG, {
        "stage": WRITER, "model": model.config.to_dict(), "backbone": recorded, "prompt": model.prompt,
        "instruct_adapter": INSTRUCT_ADAPTER if instruct_adapter is not None else None,
        "item_map_sha256": item_map_sha256, **record,
        "trained_dtype": DTYPE_NAMES[str(backbone_dtype(model))],  # what `auto` meant on the training machine
    })


def load_model(model_dir: Path | str, device: torch.device | str = "cpu", dtype: str | None = None,
               backbone: str | None = None, meta: dict[str, Any] | None = None) -> E4SRec:
    """Rebuild a trained E4SRec from its folder: backbone by spec, then the saved trainable weights.

    `dtype` replaces the recorded backbone precision (e.g. fp32 on a CPU without bf16 units); the
    trained weights are fp32 whatever the precision they were trained in. `backbone` replaces the
    recorded spec with another source of the same weights (a registered model's logged copy); its
    architecture must match the recorded fingerprint. `meta`: the folder's config.json when the
    caller has read it already.
    """
    model_dir = Path(fetch(model_dir))
    try:
        return _load_model(model_dir, torch.device(device), dtype, backbone, meta)
    except (KeyError, TypeError, RuntimeError) as e:
        raise E4SRecError(f"{model_dir}: not a train-e4srec model folder that this version reads ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]}); re-run train-e4srec or point at its output") from None


def _load_model(model_dir: Path, device: torch.device, dtype: str | None, backbone: str | None,
                meta: dict[str, Any] | None) -> E4SRec:
    from peft import set_peft_model_state_dict

    meta = meta or c.read_model_config(model_dir / CONFIG, WRITER)
    options = {k: meta["backbone"][k] for k in LLM_FIELDS}
    overrides = ({"dtype": dtype} if dtype else {}) | ({"backbone": backbone} if backbone else {})
    loaded = load_backbone(BackboneOptions(**(options | overrides)), device)
    if backbone:  # another copy of the recorded backbone: it must be the same architecture, and keeps its name
        recorded = meta["backbone"].get("fingerprint")
        if recorded and loaded.fingerprint != recorded:
            raise E4SRecError(f"{model_dir / CONFIG}: backbone {backbone} has architecture {loaded.fingerprint}, "
                              f"the model was trained on {recorded}; serve it with the backbone it was trained on")
        loaded = dataclasses.replace(loaded, spec=options["backbone"])
    if meta.get("instruct_adapter"):
        loaded = apply_adapter(loaded, model_dir / meta["instruct_adapter"],
                               merge=meta["backbone"]["quantization"] == "none")
    table = load_item_embeddings(model_dir, meta["item_map_sha256"])
    model = E4SRec(E4SRecConfig(**meta["model"]), loaded.model.get_decoder(), loaded.tokenizer, table,
                   meta["prompt"]["prefix"], meta["prompt"]["response_prefix"])
    set_peft_model_state_dict(model.llm, c.read_safetensors(model_dir / ADAPTER / "adapter_model.safetensors"))
    head = c.read_safetensors(model_dir / HEAD)
    with torch.no_grad():
        model.proj.weight.copy_(head["proj.weight"])
        model.proj.bias.copy_(head["proj.bias"])
        model.head.weight.copy_(head["head.weight"])
    return model.to(device).eval()
