"""Every stage's settings, and the pipeline parameters made from them.

One dataclass per stage: its fields are the stage's CLI flags (`e4srec <stage> --help`), its KFP
component's parameters and what its output records (config.json, backbone.json, verdict.json). The
pipeline exposes some of them under its own names (PIPELINE below): their types, defaults and help
come from the fields they set. Adding a stage setting: a field here, and the same parameter in the
stage's component signature (KFP reads the signature; tests/test_config_sync.py checks they agree).
This module imports neither torch nor kfp, so the CLI's `--help` is quick.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any

from e4srec import config as cfg
from e4srec.errors import E4SRecError
from e4srec.prompt import PromptOptions

SASREC_ARCHITECTURES = ("kang", "s3rec")
ALL_LINEAR_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


MAX_LEN_LIMIT = 4096


@dataclass
class PrepareDataConfig:
    """Settings of prepare-data (CLI flags, KFP parameters and manifest.json share them)."""

    format: str = cfg.option(
        "auto", "input format: s3rec ('user item item ...' lines), interactions (Parquet/CSV table), "
        "or auto (by file suffix)", choices=("auto", "s3rec", "interactions"),
    )
    user_col: str = cfg.option("user_id", "interactions table: user column")
    item_col: str = cfg.option("item_id", "interactions table: item column")
    time_col: str = cfg.option("timestamp", "interactions table: timestamp column (numbers or dates)")
    k_core: int = cfg.option(0, "keep only users and items with at least k interactions, iteratively (0: off)")
    max_len: int = cfg.option(50, "histories are cut to their last max_len items everywhere downstream")
    n_negatives: int = cfg.option(99, "sampled negatives per user for the sampled ranking protocol")
    seed: int = cfg.option(42, "seed for negative sampling")

    def __post_init__(self) -> None:
        cfg.check_fields(self)
        cfg.require(self.k_core >= 0, self, "k_core", "must be >= 0")
        cfg.require(1 <= self.max_len <= MAX_LEN_LIMIT, self, "max_len", f"must be in [1, {MAX_LEN_LIMIT}] (every "
                    f"model attends over max_len positions: SASRec's table and E4SRec's prompt grow with it)")
        cfg.require(self.n_negatives >= 1, self, "n_negatives", "must be >= 1")


@dataclass
class PretrainSasrecConfig:
    """Settings of pretrain-sasrec (CLI flags, KFP parameters and config.json share them)."""

    loss: str = cfg.option("bce", "bce: one sampled negative per position (the paper); ce: softmax over all items",
                           choices=("bce", "ce"))
    arch: str = cfg.option("kang", "kang: the SASRec paper's code (pre-norm, ReLU); s3rec: the S3-Rec code "
                                   "behind the published Amazon numbers (post-norm, GELU)", choices=SASREC_ARCHITECTURES)
    epochs: int = cfg.option(300, "maximum epochs (early stopping usually ends sooner)")
    batch_size: int = cfg.option(256, "users per training batch (256 as in S3-Rec)")
    lr: float = cfg.option(1e-3, "Adam learning rate")
    weight_decay: float = cfg.option(0.0, "Adam L2 weight decay")
    dim: int = cfg.option(64, "embedding and hidden size (E4SRec's projection expects 64)")
    n_blocks: int = cfg.option(2, "transformer blocks")
    n_heads: int = cfg.option(1, "attention heads")
    dropout: float = cfg.option(0.5, "dropout rate (0.5 suits sparse Amazon data, 0.2 dense data)")
    eval_every: int = cfg.option(1, "epochs between validation evaluations")
    patience: int = cfg.option(60, "stop after this many evaluations without a better validation NDCG@10")
    eval_batch_size: int = cfg.option(1024, "users per scoring batch (on CPU at most the users whose scores fit "
                                            "16 MiB: 346 on Beauty)")
    bucket_by_length: bool = cfg.option(True, "batch users of similar length together (less padding, "
                                              "same model); --no-bucket-by-length mixes lengths")
    seed: int = cfg.option(42, "seed for initialisation, batching and negatives")
    device: str = cfg.option("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    threads: int = cfg.option(0, "CPU threads for torch (0: torch's default)")

    def __post_init__(self) -> None:
        cfg.check_fields(self)
        for name in ("epochs", "batch_size", "dim", "n_blocks", "n_heads", "eval_every", "patience",
                     "eval_batch_size"):
            cfg.require(getattr(self, name) >= 1, self, name, "must be >= 1")
        cfg.require(self.lr > 0, self, "lr", "must be > 0")
        cfg.require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        cfg.require(0 <= self.dropout < 1, self, "dropout", "must be in [0, 1)")
        cfg.require(self.dim % self.n_heads == 0, self, "dim", f"must be divisible by n_heads={self.n_heads}")
        cfg.require(self.threads >= 0, self, "threads", "must be >= 0")


@dataclass
class BackboneOptions:
    """Backbone fields every LLM stage config inherits (flags --backbone, --dtype, ...)."""

    backbone: str = cfg.option("smollm2-135m", "LLM spec: a registered name (see `e4srec backbones`), "
                                               "gguf:PATH or hf:FOLDER_OR_HUB_ID")
    dtype: str = cfg.option("auto", "weights and compute dtype; auto: bf16 on CUDA and on CPUs with bf16 units "
                                    "(AVX512-BF16, AMX), else fp32",
                            choices=("auto", "fp32", "bf16", "fp16"))
    quantization: str = cfg.option("none", "load the backbone quantized with bitsandbytes: 8bit or nf4 (4-bit)",
                                   choices=("none", "8bit", "nf4"))
    local_files_only: bool = cfg.option(True, "never download; --no-local-files-only lets hf: hub ids download")

    def __post_init__(self) -> None:
        cfg.check_fields(self)
        from e4srec.backbones import parse_spec

        parse_spec(self.backbone)  # an unknown name fails here, with the registered ones


@dataclass
class InstructionTuneConfig(BackboneOptions):
    """Settings of instruction-tune (CLI flags, KFP parameters and backbone.json share them)."""

    skip: bool = cfg.option(False, "pass the base through untouched (right for an already instruction-tuned "
                                   "base such as SmolLM2-Instruct)")
    holdout: int = cfg.option(100, "examples held out (seeded) for the before/after loss and generations")
    max_examples: int = cfg.option(0, "train on the first N training examples only (0: all); CPU demos use a slice")
    epochs: int = cfg.option(1, "passes over the training examples")
    batch_size: int = cfg.option(8, "examples per micro-batch")
    grad_accum: int = cfg.option(1, "micro-batches per optimizer step")
    lr: float = cfg.option(2e-4, "peak AdamW learning rate (cosine decay after warmup)")
    warmup_ratio: float = cfg.option(0.1, "fraction of the optimizer steps spent warming up linearly")
    weight_decay: float = cfg.option(0.0, "AdamW weight decay on the LoRA weights")
    max_grad_norm: float = cfg.option(1.0, "gradient clipping norm")
    max_length: int = cfg.option(256, "tokens per example; longer ones are cut (counted and logged)")
    lora_r: int = cfg.option(16, "LoRA rank")
    lora_alpha: int = cfg.option(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = cfg.option(0.05, "LoRA dropout")
    target_modules: str = cfg.option(ALL_LINEAR_MODULES, "comma-separated module names LoRA wraps")
    merge: bool = cfg.option(False, "also write the backbone with the adapter merged in (not for quantized bases)")
    generations: int = cfg.option(3, "held-out prompts answered greedily before and after tuning")
    max_new_tokens: int = cfg.option(48, "tokens per generated answer")
    seed: int = cfg.option(42, "seed for the split, the batch order and LoRA initialisation")
    device: str = cfg.option("auto", "cpu, cuda, cuda:N or auto")
    threads: int = cfg.option(0, "CPU threads for torch (0: torch's default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha"):
            cfg.require(getattr(self, name) >= 1, self, name, "must be >= 1")
        for name in ("holdout", "max_examples", "generations", "max_new_tokens", "threads"):
            cfg.require(getattr(self, name) >= 0, self, name, "must be >= 0")
        cfg.require(self.lr > 0, self, "lr", "must be > 0")
        cfg.require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        cfg.require(self.max_grad_norm > 0, self, "max_grad_norm", "must be > 0")
        cfg.require(0 <= self.warmup_ratio < 1, self, "warmup_ratio", "must be in [0, 1)")
        cfg.require(0 <= self.lora_dropout < 1, self, "lora_dropout", "must be in [0, 1)")
        cfg.require(bool(self.modules()), self, "target_modules", "name at least one module")
        cfg.require(not (self.merge and self.quantization != "none"), self, "merge",
                    "a quantized base cannot be merged; drop --merge or --quantization")

    def modules(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass
class TrainE4SRecConfig(PromptOptions):
    """Settings of train-e4srec (CLI flags, KFP parameters and config.json share them)."""

    epochs: int = cfg.option(1, "passes over the training examples")
    batch_size: int = cfg.option(64, "examples per micro-batch, summed over all processes (the paper: 16)")
    grad_accum: int = cfg.option(1, "micro-batches per optimizer step")
    lr: float = cfg.option(1e-3, "peak AdamW learning rate (linear warmup, cosine decay)")
    warmup_ratio: float = cfg.option(0.05, "fraction of optimizer steps spent warming up")
    weight_decay: float = cfg.option(0.0, "AdamW weight decay")
    max_grad_norm: float = cfg.option(1.0, "gradient clipping norm")
    item_dim: int = cfg.option(64, "SASRec embedding size the input projection Linear(item_dim -> hidden) takes")
    lora_r: int = cfg.option(16, "LoRA rank")
    lora_alpha: int = cfg.option(16, "LoRA alpha")
    lora_dropout: float = cfg.option(0.05, "LoRA dropout")
    target_modules: str = cfg.option("gate_proj,up_proj,down_proj", "comma-separated modules LoRA wraps")
    head_init: str = cfg.option("items", "how the item head starts: random (nn.Linear's init) or items (each "
                                          "row the item's projected SASRec embedding, so similar items start alike)",
                                choices=("random", "items"))
    dtype: str = cfg.option("auto", "backbone precision for training and scoring (LoRA, projection and head stay "
                                    "fp32): auto (bf16 on CUDA and on CPUs with bf16 units, else fp32), fp32, bf16, "
                                    "fp16", choices=("auto", "fp32", "bf16", "fp16"))
    autocast: bool = cfg.option(False, "CPU: train a bf16 backbone under torch.autocast, so LoRA, projection "
                                       "and head compute in bf16 too (fp32 master weights); on AMX CPUs a little "
                                       "faster, a little worse (bench/README.md). On CUDA a bf16/fp16 backbone "
                                       "always trains so")
    max_targets_per_user: int = cfg.option(50, "training targets per user (the last ones)")
    max_examples: int = cfg.option(0, "train on this many examples, drawn with the seed (0: all); CPU demos")
    eval_users: int = cfg.option(0, "evaluate on this many users, drawn with the seed (0: all); CPU demos")
    eval_batch_size: int = cfg.option(64, "users per scoring batch")
    prefix_cache: bool = cfg.option(True, "reuse the instruction tokens' keys/values when scoring")
    shared_prefix: bool = cfg.option(True, "train with the instruction tokens computed once per batch, not per "
                                           "row (same loss; LoRA dropout on them drawn once per batch)")
    bucket_by_length: bool = cfg.option(True, "batch examples of similar history length (less padding)")
    checkpoint_every: int = cfg.option(0, "save a resumable checkpoint every N optimizer steps (0: off)")
    checkpoint_dir: str = cfg.option("", "where checkpoints go (default: OUTPUT.checkpoints beside the output); "
                                         "{run_id} becomes the pipeline run's id ($E4SREC_PIPELINE_RUN_ID)")
    resume: bool = cfg.option(False, "continue from the checkpoint in checkpoint_dir when there is one")
    seed: int = cfg.option(42, "seed for LoRA/head initialisation, example order and dropout")
    device: str = cfg.option("auto", "cpu, cuda, cuda:N or auto (under torchrun: this process's GPU)")
    threads: int = cfg.option(0, "CPU threads for torch (0: torch's default)")

    def __post_init__(self) -> None:
        cfg.check_fields(self)
        for name in ("epochs", "batch_size", "grad_accum", "item_dim", "lora_r", "lora_alpha", "max_targets_per_user",
                     "eval_batch_size"):
            cfg.require(getattr(self, name) >= 1, self, name, "must be >= 1")
        for name in ("max_examples", "eval_users", "checkpoint_every", "threads"):
            cfg.require(getattr(self, name) >= 0, self, name, "must be >= 0")
        cfg.require(0 < self.lr < math.inf, self, "lr", "must be a finite number > 0")
        cfg.require(0 <= self.lora_dropout < 1, self, "lora_dropout", "must be in [0, 1)")
        cfg.require(0 <= self.warmup_ratio < 1, self, "warmup_ratio", "must be in [0, 1)")
        cfg.require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        cfg.require(self.max_grad_norm > 0, self, "max_grad_norm", "must be > 0")
        cfg.require(any(m.strip() for m in self.target_modules.split(",")), self, "target_modules",
                    "name at least one module")


@dataclass
class DeployConfig:
    """Settings of deploy (CLI flags, KFP parameters and verdict.json share them)."""

    registered_model: str = cfg.option("", "registered model name (default: e4srec-<dataset>, one per dataset)")
    metric: str = cfg.option("test/full/NDCG@10", "metric the gate compares (a metrics.json key)")
    min_margin: float = cfg.option(0.0, "the candidate must beat the champion by more than this")
    when_no_champion: str = cfg.option("promote", "first run, no champion yet: promote or hold",
                                       choices=("promote", "hold"))
    force_promote: bool = cfg.option(False, "make the run's E4SRec champion whatever the scores say (recorded as forced)")
    eval_users: int = cfg.option(0, "compare on this many users drawn with the seed (0: all)")
    eval_batch_size: int = cfg.option(64, "users per scoring batch")
    seed: int = cfg.option(42, "seed for the user sample")
    device: str = cfg.option("auto", "cpu, cuda, cuda:N or auto")

    def __post_init__(self) -> None:
        cfg.check_fields(self)
        from e4srec.contracts import METRIC_NAMES, PROTOCOLS, SPLITS

        parts = self.metric.split("/")
        cfg.require(len(parts) == 3 and parts[0] in SPLITS and parts[1] in PROTOCOLS and parts[2] in METRIC_NAMES, self,
                    "metric", f"expected <split>/<protocol>/<metric> with split in {'/'.join(SPLITS)}, protocol in "
                    f"{'/'.join(PROTOCOLS)}, metric in {', '.join(METRIC_NAMES)}; e.g. test/full/NDCG@10")
        cfg.require(self.min_margin >= 0, self, "min_margin", "must be >= 0")
        cfg.require(self.eval_users >= 0, self, "eval_users", "must be >= 0")


@dataclass
class BatchRecommendConfig:
    """Settings of batch-recommend."""

    k: int = cfg.option(10, "items per user")
    batch_size: int = cfg.option(64, "users per scoring batch")
    max_users: int = cfg.option(0, "only the first N users (0: all)")
    device: str = cfg.option("auto", "cpu, cuda, cuda:N or auto")

    def __post_init__(self) -> None:
        cfg.check_fields(self)
        for name in ("k", "batch_size"):
            cfg.require(getattr(self, name) >= 1, self, name, "must be >= 1")
        cfg.require(self.max_users >= 0, self, "max_users", "must be >= 0")


STAGES: dict[str, type] = {
    "prepare-data": PrepareDataConfig, "pretrain-sasrec": PretrainSasrecConfig,
    "instruction-tune": InstructionTuneConfig, "train-e4srec": TrainE4SRecConfig, "deploy": DeployConfig,
    "batch-recommend": BatchRecommendConfig,
}
# Component parameters named otherwise than their field (`backbone` is instruction-tune's output artifact).
COMPONENT_NAMES = {("instruction-tune", "backbone"): "backbone_spec"}


REQUIRED = inspect.Parameter.empty  # the default of a parameter a run must give


@dataclass(frozen=True)
class PipelineParameter:
    """One runtime parameter of the pipeline: the stage fields it sets, or its own type and default."""

    name: str
    sets: tuple[tuple[str, str], ...] = ()  # (stage, field): the first gives type, default and help
    help: str = ""  # replaces "<stage>: <the first field's help>" (a parameter that sets several stages says so)
    own_type: type | None = None  # for a parameter that sets no stage field
    own_default: Any = REQUIRED

    def field(self) -> dataclasses.Field:
        stage, name = self.sets[0]
        return next(f for f in dataclasses.fields(STAGES[stage]) if f.name == name)

    @property
    def annotation(self) -> type:
        return self.own_type or cfg.field_type(STAGES[self.sets[0][0]], self.field())

    @property
    def default(self) -> Any:
        return self.field().default if self.sets else self.own_default

    @property
    def help_text(self) -> str:
        return self.help or f"{self.sets[0][0]}: {self.field().metadata['help']}"


def _p(name: str, *sets: str, help: str = "", type: type | None = None, default: Any = REQUIRED
       ) -> PipelineParameter:
    pairs = tuple(tuple(s.split(".", 1)) for s in sets)  # "stage.field"
    return PipelineParameter(name, pairs, help, type, default)  # type: ignore[arg-type]


SEED_HELP = "seed for every stage: negative sampling, SASRec and E4SRec training, the gate's user sample"
PIPELINE: tuple[PipelineParameter, ...] = (
    _p("input_uri", type=str, help="raw dataset: an S3-Rec text file or an interactions table (Parquet/CSV/TSV)"),
    _p("instructions_uri", type=str, default="",
       help="Alpaca-format instruction data (JSON, JSONL or Parquet) for instruction-tune"),
    _p("input_format", "prepare-data.format"),
    _p("user_col", "prepare-data.user_col"),
    _p("item_col", "prepare-data.item_col"),
    _p("time_col", "prepare-data.time_col"),
    _p("k_core", "prepare-data.k_core"),
    _p("max_len", "prepare-data.max_len"),
    _p("n_negatives", "prepare-data.n_negatives"),
    _p("seed", "prepare-data.seed", "pretrain-sasrec.seed", "instruction-tune.seed", "train-e4srec.seed",
       "deploy.seed", help=SEED_HELP),
    _p("sasrec_loss", "pretrain-sasrec.loss"),
    _p("sasrec_epochs", "pretrain-sasrec.epochs"),
    _p("sasrec_batch_size", "pretrain-sasrec.batch_size"),
    _p("sasrec_lr", "pretrain-sasrec.lr"),
    _p("sasrec_dropout", "pretrain-sasrec.dropout"),
    _p("sasrec_patience", "pretrain-sasrec.patience"),
    _p("backbone", "instruction-tune.backbone"),
    _p("backbone_dtype", "instruction-tune.dtype", "train-e4srec.dtype",
       help="precision of the LLM in instruction-tune and train-e4srec: auto (bf16 on CUDA and on CPUs with bf16 "
            "units, fp32 on others), fp32, bf16 or fp16"),
    _p("quantization", "instruction-tune.quantization"),
    _p("instruction_tune_backbone", type=bool, default=False,
       help="run LoRA instruction tuning; off passes the base through (right for an already instruction-tuned "
            "base such as SmolLM2-Instruct)"),
    _p("instruct_max_examples", "instruction-tune.max_examples"),
    _p("instruct_epochs", "instruction-tune.epochs"),
    _p("instruct_batch_size", "instruction-tune.batch_size"),
    _p("instruct_lr", "instruction-tune.lr"),
    _p("e4srec_epochs", "train-e4srec.epochs"),
    _p("e4srec_batch_size", "train-e4srec.batch_size"),
    _p("e4srec_lr", "train-e4srec.lr"),
    _p("e4srec_max_examples", "train-e4srec.max_examples"),
    _p("e4srec_eval_users", "train-e4srec.eval_users", "deploy.eval_users",
       help="evaluate E4SRec on this many users drawn with the seed (0: all); the deploy gate compares "
            "challenger and champion on the same users"),
    _p("registered_model", "deploy.registered_model"),
    _p("gate_metric", "deploy.metric"),
    _p("gate_min_margin", "deploy.min_margin"),
    _p("when_no_champion", "deploy.when_no_champion"),
    _p("force_promote", "deploy.force_promote"),
    _p("batch_recommend_k", type=int, default=0,
       help="write the top-k items of every user (Parquet) with this k; 0 skips batch-recommend"),
    _p("device", "pretrain-sasrec.device", "instruction-tune.device", "train-e4srec.device", "deploy.device",
       "batch-recommend.device", help="cpu, cuda, cuda:N or auto for every stage that computes"),
    _p("tracking", type=bool, default=True,
       help="log every stage to MLflow (one parent run, a nested run per stage); off: deploy registers nothing "
            "and holds (the registry needs tracking)"),
    _p("experiment", type=str, default="e4srec", help="MLflow experiment name"),
)


def stage_arguments(stage: str, values: dict[str, Any]) -> dict[str, Any]:
    """{component parameter: value} the pipeline passes `stage`, from its parameters' `values`."""
    return {COMPONENT_NAMES.get((stage, field), field): values[p.name]
            for p in PIPELINE for s, field in p.sets if s == stage and p.name in values}


def check_pipeline_arguments(arguments: dict[str, Any]) -> None:
    """Build every stage's config from the pipeline's arguments (defaults filled in), so that a bad value is
    one line before anything runs or is submitted (the components build the same configs again)."""
    values = {p.name: p.default for p in PIPELINE if p.default is not REQUIRED} | arguments
    if values["batch_recommend_k"] < 0:
        raise E4SRecError(f"batch_recommend_k={values['batch_recommend_k']}: must be >= 0 (0 skips batch-recommend)")
    for stage, config in STAGES.items():
        if stage == "batch-recommend" and not values["batch_recommend_k"]:
            continue
        fields = {field: values[p.name] for p in PIPELINE for s, field in p.sets if s == stage}
        if stage == "batch-recommend":
            fields["k"] = values["batch_recommend_k"]
        config(**fields)


def component_config(stage: str, params: dict[str, Any]) -> Any:
    """The stage's config from its component's parameters: the component's `locals()`, or the parameters a
    rerun passes it (missing ones take the field defaults). Fields are read under their component names
    (COMPONENT_NAMES); instruction-tune's `tune` is the pipeline's sense of `not skip`."""
    config = STAGES[stage]
    names = {f.name: COMPONENT_NAMES.get((stage, f.name), f.name) for f in dataclasses.fields(config)}
    values = {field: params[name] for field, name in names.items() if name in params}
    if "tune" in params:
        values["skip"] = bool(values.get("skip", False)) or not params["tune"]
    return config(**values)
