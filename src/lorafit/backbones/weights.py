"""Pretrained GPT-2 weights from wherever users keep them, all into the same :class:`GPTModel`.

Sources: a preset name (OpenAI's weights through the Hugging Face hub cache), a Hugging Face directory,
OpenAI's original TensorFlow checkpoint directory, a book ``.pth`` state dict (``weights_only=True``),
or fresh weights (``random_init``). Every format is first turned into Hugging Face's GPT-2 key names
and then mapped onto the book's names by one table, :func:`hf_to_lorafit`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError  # .errors only from 0.24
from huggingface_hub.utils import logging as hub_logging

from ..errors import FieldError, LorafitError
from ..runtime import seeded
from ..files import iter_safetensors, read_json
from .gpt2 import PRESETS, GPTConfig, GPTModel

HUB_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")

# Hugging Face GPT-2 key (per block: h.{i}.) -> lorafit key (per block: trf_blocks.{i}.).
_BLOCK_TABLE = {
    "ln_1.weight": "norm1.scale",
    "ln_1.bias": "norm1.shift",
    "attn.c_proj.weight": "att.out_proj.weight",
    "attn.c_proj.bias": "att.out_proj.bias",
    "ln_2.weight": "norm2.scale",
    "ln_2.bias": "norm2.shift",
    "mlp.c_fc.weight": "ff.layers.0.weight",
    "mlp.c_fc.bias": "ff.layers.0.bias",
    "mlp.c_proj.weight": "ff.layers.2.weight",
    "mlp.c_proj.bias": "ff.layers.2.bias",
}
_TOP_TABLE = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "final_norm.scale",
    "ln_f.bias": "final_norm.shift",
    "lm_head.weight": "out_head.weight",
}
# Conv1D stores [in, out]; nn.Linear wants [out, in].
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of older files


@dataclass
class LoadedModel:
    """A GPT-2 backbone and the folder its weights came from (searched for tokenizer files)."""

    model: GPTModel
    directory: Path | None  # None for random init


def hf_to_lorafit(sd: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                  n_layers: int) -> dict[str, torch.Tensor]:
    """Map a Hugging Face GPT-2 state dict onto lorafit's names; c_attn is split into q, k, v.

    ``sd`` may be a lazy stream of (key, tensor) pairs (:func:`iter_safetensors`): each tensor is converted
    as it arrives, so the source's copy is freed before the next is read.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in (sd.items() if isinstance(sd, Mapping) else sd):
        k = k.removeprefix("transformer.")
        if _IGNORED.search(k):
            continue
        if k in _TOP_TABLE:
            out[_TOP_TABLE[k]] = v
            continue
        m = re.fullmatch(r"h\.(\d+)\.(.+)", k)
        if not m or int(m.group(1)) >= n_layers:
            raise LorafitError(f"unexpected key {k!r} in a GPT-2 checkpoint of {n_layers} layers")
        i, rest = m.group(1), m.group(2)
        if rest.endswith(_TRANSPOSED):
            v = v.t()
        prefix = f"trf_blocks.{i}."
        if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("W_query", "W_key", "W_value"), v.chunk(3, dim=0)):  # each owns its memory
                out[f"{prefix}att.{name}.{kind}"] = part.clone(memory_format=torch.contiguous_format)
        elif rest in _BLOCK_TABLE:
            out[prefix + _BLOCK_TABLE[rest]] = v.contiguous()
        else:
            raise LorafitError(f"unexpected key {k!r} in a GPT-2 checkpoint")
    out.setdefault("out_head.weight", out.get("tok_emb.weight"))  # tied in HF files (untied when loaded)
    return out


def lorafit_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_lorafit` for a backbone without LM head: q, k, v fused into c_attn
    (zero biases where the model has none), Conv1D weights transposed back to [in, out]."""
    top = {v: k for k, v in _TOP_TABLE.items()}
    block = {v: k for k, v in _BLOCK_TABLE.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        i, rest = re.fullmatch(r"trf_blocks\.(\d+)\.(.+)", k).groups()
        if rest.startswith("att.W_"):
            qkv.setdefault(i, {})[rest.removeprefix("att.")] = v
        else:
            hf = block[rest]
            out[f"h.{i}.{hf}"] = (v.t() if hf.endswith(_TRANSPOSED) else v).contiguous()
    for i, parts in qkv.items():
        names = ("W_query", "W_key", "W_value")
        out[f"h.{i}.attn.c_attn.weight"] = torch.cat([parts[f"{n}.weight"] for n in names]).t().contiguous()
        out[f"h.{i}.attn.c_attn.bias"] = torch.cat([parts.get(f"{n}.bias", torch.zeros(parts[f"{n}.weight"].shape[0]))
                                                    for n in names])
    return out


def load_state_into(cfg: GPTConfig, sd: dict[str, torch.Tensor], source: str, lm_head: bool = True) -> GPTModel:
    """A :class:`GPTModel` whose parameters are the tensors of ``sd`` (assigned, not copied: no second copy
    of the weights is ever held), refusing missing keys, extra keys and shape mismatches by name."""
    model = empty_model(cfg, lm_head)
    if model.out_head is None:
        sd = {k: v for k, v in sd.items() if not k.startswith("out_head.")}
    expected = model.state_dict()
    missing = [k for k in expected if sd.get(k) is None]
    extra = [k for k in sd if k not in expected]
    if missing:
        raise LorafitError(f"{source}: missing weights {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    if extra:
        raise LorafitError(f"{source}: unexpected weights {', '.join(extra[:4])}" + (" ..." if len(extra) > 4 else ""))
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise LorafitError(f"{source}: {k} has shape {tuple(sd[k].shape)}, the config expects {tuple(v.shape)}")
    placed, seen = {}, set()
    for k, v in expected.items():
        t = sd[k].to(v.dtype)
        if t.data_ptr() in seen:  # a tied LM head gets its own copy, as the book's model has
            t = t.clone()
        seen.add(t.data_ptr())
        placed[k] = t
    model.load_state_dict(placed, assign=True)
    return model


def empty_model(cfg: GPTConfig, lm_head: bool = True) -> GPTModel:
    """The architecture on the meta device: no memory until weights are assigned into it."""
    with torch.device("meta"):
        return GPTModel(cfg, lm_head)


def config_from_hf(d: dict, source: str) -> GPTConfig:
    if d.get("model_type", "gpt2") != "gpt2":
        raise FieldError("{}: model_type is {!r}; GPT-2 expected (use {model} hf:... for other models)", source,
                         d["model_type"])
    try:
        return GPTConfig(
            vocab_size=d["vocab_size"], context_length=d.get("n_positions", d.get("n_ctx")), emb_dim=d["n_embd"],
            n_heads=d["n_head"], n_layers=d["n_layer"], layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
        )
    except (KeyError, TypeError) as e:
        raise LorafitError(f"{source}: config.json lacks the GPT-2 field {e}") from e


def load_hf_directory(directory: Path, lm_head: bool = True) -> GPTModel:
    """A Hugging Face GPT-2 folder: config.json + model.safetensors (or pytorch_model.bin, safely)."""
    cfg_path = directory / "config.json"
    cfg = config_from_hf(read_json(cfg_path), str(cfg_path))
    if (directory / "model.safetensors").is_file():
        sd = iter_safetensors(directory / "model.safetensors")
    elif (directory / "pytorch_model.bin").is_file():
        sd = _torch_load(directory / "pytorch_model.bin")
    else:
        raise LorafitError(f"{directory}: no model.safetensors (or pytorch_model.bin) beside config.json")
    return load_state_into(cfg, hf_to_lorafit(sd, cfg.n_layers), str(directory), lm_head)


def load_openai_directory(directory: Path, lm_head: bool = True) -> GPTModel:
    """OpenAI's original release (hparams.json + model.ckpt.*), as the book's download script leaves it."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise LorafitError(
            f"{directory}: reading OpenAI's TensorFlow checkpoint needs tensorflow: pip install 'lorafit[tf]'"
        ) from e
    hp_path = directory / "hparams.json"
    hp = read_json(hp_path)
    try:
        cfg = GPTConfig(vocab_size=hp["n_vocab"], context_length=hp["n_ctx"], emb_dim=hp["n_embd"],
                        n_heads=hp["n_head"], n_layers=hp["n_layer"])
    except (KeyError, TypeError) as e:
        raise LorafitError(f"{hp_path}: lacks the GPT-2 field {e}") from e
    ckpt = tf.train.latest_checkpoint(str(directory))
    if ckpt is None:
        raise LorafitError(f"{directory}: hparams.json found but no TensorFlow checkpoint (checkpoint, model.ckpt.*)")
    sd = {}
    for name, _ in tf.train.list_variables(ckpt):
        parts = name.removeprefix("model/").split("/")  # e.g. h0/attn/c_attn/w
        if parts[0].startswith("h") and parts[0][1:].isdigit():
            parts[0] = f"h.{parts[0][1:]}"
        leaf = {"w": "weight", "g": "weight", "b": "bias"}.get(parts[-1])
        key = ".".join(parts[:-1] + [leaf]) if leaf else ".".join(parts) + ".weight"
        arr = np.asarray(tf.train.load_variable(ckpt, name))
        if arr.ndim == 3:  # conv1d weights are [1, in, out]
            arr = arr[0]
        sd[key] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return load_state_into(cfg, hf_to_lorafit(sd, cfg.n_layers), str(directory), lm_head)


def _torch_load(path: Path) -> dict:
    """Load a .pth/.bin without unpickling code: tensors and plain containers only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; the message is what matters
        raise LorafitError(f"{path}: cannot be read as a weights-only PyTorch file ({str(e).splitlines()[0]})") from e
    if isinstance(obj, dict) and "model_state_dict" in obj:  # the book's model + optimizer checkpoint
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LorafitError(f"{path}: expected a state dict of tensors")
    return obj


def config_from_state_dict(sd: dict[str, torch.Tensor], n_heads: int | None = None) -> GPTConfig:
    """Infer the architecture from a book-style state dict; every GPT-2 size has 64-wide heads."""
    vocab, emb = sd["tok_emb.weight"].shape
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("trf_blocks.")})
    return GPTConfig(
        vocab_size=vocab, context_length=sd["pos_emb.weight"].shape[0], emb_dim=emb,
        n_heads=n_heads or max(emb // 64, 1), n_layers=n_layers,
        qkv_bias="trf_blocks.0.att.W_query.bias" in sd,
    )


def load_book_state_dict(path: Path, n_heads: int | None = None, lm_head: bool = True) -> GPTModel:
    """A state dict saved from the book's ``GPTModel`` (its causal-mask buffers are skipped)."""
    sd = {k: v for k, v in _torch_load(path).items() if not k.endswith(".att.mask")}
    if "tok_emb.weight" not in sd or "pos_emb.weight" not in sd:
        raise LorafitError(f"{path}: not a GPTModel state dict (no tok_emb.weight / pos_emb.weight)")
    cfg = config_from_state_dict(sd, n_heads)
    return load_state_into(cfg, sd, str(path), lm_head)


def hub_download(preset: str) -> Path:
    """Fetch (or find in the cache) OpenAI's weights for ``preset``; offline-safe with a clear error."""
    hub_logging.set_verbosity_error()  # its retry chatter would bury the one-line error below
    repo = HUB_REPOS[preset]
    try:
        paths = [Path(hf_hub_download(repo, f)) for f in HUB_FILES]
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        raise FieldError("{}: weights not in the Hugging Face cache and the hub is unreachable{}; download {} from "
                         "https://huggingface.co/{} into a folder and pass {model} FOLDER", preset, offline,
                         ", ".join(HUB_FILES), repo) from e
    return paths[0].parent


def load_gpt2(source: str, *, random_init: bool = False, n_heads: int | None = None, seed: int = 42,
              lm_head: bool = True) -> LoadedModel:
    """Build a GPT-2 from a preset name, a folder (Hugging Face or OpenAI layout) or a ``.pth`` file."""
    if random_init:
        if source not in PRESETS:
            raise FieldError("{random_init} needs a preset ({}), got {!r}", ", ".join(PRESETS), source)
        with seeded(seed):
            return LoadedModel(GPTModel(PRESETS[source], lm_head), None)
    if source in PRESETS:
        directory = hub_download(source)
        return LoadedModel(load_hf_directory(directory, lm_head), directory)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return LoadedModel(load_hf_directory(path, lm_head), path)
        if (path / "hparams.json").is_file():
            return LoadedModel(load_openai_directory(path, lm_head), path)
        raise LorafitError(
            f"{path}: neither a Hugging Face folder (config.json + model.safetensors) "
            "nor OpenAI's layout (hparams.json + model.ckpt.*)"
        )
    if path.is_file() and path.suffix in (".pth", ".pt"):
        return LoadedModel(load_book_state_dict(path, n_heads, lm_head), path.parent)
    if path.exists():
        raise LorafitError(f"{path}: expected a model folder or a .pth state dict")
    raise FieldError("{model} {!r}: no such file or folder, and not a preset ({})", source, ", ".join(PRESETS))
