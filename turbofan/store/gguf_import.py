"""A GGUF file -> the small files beside it in the store (config.json, generation_config.json, tokenizer files).

The store keeps what was pulled: the GGUF stays the weights (turbofan's loader repacks its quantized blocks at
load time, model/checkpoint.py), and nothing here reads a tensor's values, so importing a multi-gigabyte file
takes the memory of its metadata. The config follows transformers' GGUF metadata mapping and the tokenizer is
converted by transformers itself, so the directory behaves like transformers loading the GGUF (the correctness
reference)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError, UnsupportedArchitectureError
from .gguf_reader import GGUFFile
from .gguf_tensors import SKIPPED_TENSORS, SUPPORTED_GGUF_ARCHS, hf_tensor_name
from .progress import Progress, Reporter

log = logging.getLogger("turbofan.store")

# config.model_type -> transformers class of the causal LM
ARCHITECTURE_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# GGUF architecture -> config.model_type, where they differ
_MODEL_TYPES = {"gemma3": "gemma3_text"}
_DROP_TOKENIZER_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")
_SPECIAL_TOKEN_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


@dataclass
class GGUFConversion:
    """What a conversion learnt about the model, for ``turbofan.json``."""

    gguf_arch: str
    architecture: str
    model_type: str
    quantization: str | None
    parameters: int
    context_length: int | None
    has_chat_template: bool
    license: str | None
    general_name: str | None
    seconds: float


def quantization_label(gf: GGUFFile) -> str | None:
    """``Q4_1``, ``Q4_K_M`` ... from ``general.file_type``, else the most common matrix tensor type."""
    import gguf

    file_type = gf.get("general.file_type")
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(int(file_type)).name
            return {"ALL_F32": "F32", "MOSTLY_F16": "F16", "MOSTLY_BF16": "BF16"}.get(
                name, name.removeprefix("MOSTLY_")
            )
        except ValueError:
            pass
    kinds = Counter(gguf.GGMLQuantizationType(t.ggml_type).name for t in gf.tensors if len(t.shape) >= 2)
    return kinds.most_common(1)[0][0] if kinds else None


def check_architecture(gf: GGUFFile) -> str:
    """The GGUF architecture, or a clear error naming what turbofan converts."""
    arch = gf.architecture
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise UnsupportedArchitectureError(
            f"{gf.path.name}: GGUF architecture {arch!r} is not supported; turbofan converts "
            f"{', '.join(SUPPORTED_GGUF_ARCHS)}"
        )
    return arch


def config_dict(gf: GGUFFile) -> dict[str, Any]:
    """The transformers config dict for a GGUF file, built the way transformers' ``load_gguf_checkpoint``
    builds it (same metadata mapping table), without decoding the vocabulary."""
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = gf.architecture
    cfg: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in gf.tensor_names}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}).items():
        cfg.setdefault(key, value)
    tables = {"general": GGUF_CONFIG_MAPPING["general"], "tokenizer": GGUF_CONFIG_MAPPING["tokenizer"]}
    tables[arch] = GGUF_CONFIG_MAPPING[arch]
    for key, value in gf.metadata.items():
        prefix, _, rest = key.partition(".")
        target = tables.get(prefix, {}).get(rest)
        if target is None or target == -1:
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        cfg[target] = value
    cfg.pop("_model_name_or_path", None)
    if arch == "qwen3" and "head_dim" not in cfg and gf.get("qwen3.attention.key_length") is not None:
        # transformers' table omits it (Qwen3's default, 128, happens to be right for the released models)
        cfg["head_dim"] = int(gf.get("qwen3.attention.key_length"))
    cfg["model_type"] = _MODEL_TYPES.get(arch, arch)
    if "vocab_size" not in cfg and isinstance(gf.get("tokenizer.ggml.tokens"), list):
        cfg["vocab_size"] = len(gf.get("tokenizer.ggml.tokens"))
    return cfg


def build_config(gf: GGUFFile):
    """A transformers config object with ``architectures`` and float32 dtype set."""
    import torch
    from transformers import AutoConfig

    cfg = config_dict(gf)
    model_type = cfg.pop("model_type")
    arch_class = ARCHITECTURE_CLASSES.get(model_type)
    if arch_class is None:
        raise UnsupportedArchitectureError(
            f"{gf.path.name}: model type {model_type!r} has no causal-LM class here"
        )
    config = AutoConfig.for_model(model_type, **cfg)
    config.architectures = [arch_class]
    config.dtype = torch.float32
    return config


def tensor_shapes(gf: GGUFFile) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor's Hugging Face name and torch shape, from the tensor table alone."""
    arch = gf.architecture
    shapes: dict[str, tuple[int, ...]] = {}
    for info in gf.tensors:
        if info.name in SKIPPED_TENSORS:
            continue
        hf_name = hf_tensor_name(info.name, arch)
        if hf_name is None:
            raise ConversionError(f"GGUF tensor {info.name!r} ({arch}) has no Hugging Face counterpart")
        shapes[hf_name] = tuple(info.shape)
    return shapes


def check_against_model(config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare names and shapes with the transformers model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if shapes[k] != expected[k])
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}")
    if wrong:
        problems.append(f"wrong shapes {[(k, shapes[k], expected[k]) for k in wrong[:5]]}")
    if problems:
        raise ConversionError(
            f"GGUF tensors do not fit {config.architectures[0]}: {'; '.join(problems)}"
        )


def compact_json(file: Path) -> None:
    """Rewrite a JSON file without indentation: transformers pretty-prints tokenizer.json, which for a 262k-entry
    vocabulary (Gemma 3) is 33 MB instead of 14 MB, 13% of the model's GGUF on top of it in the store."""
    if file.is_file():
        data = json.loads(file.read_text(encoding="utf-8"))
        file.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def write_tokenizer(gf: GGUFFile, out_dir: Path, context_length: int | None) -> bool:
    """Convert the GGUF tokenizer with transformers and write tokenizer.json + tokenizer_config.json,
    with the chat template inside tokenizer_config.json. Returns whether there is a chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gf.path.parent), gguf_file=gf.path.name)
    except Exception as exc:  # transformers raises many kinds for vocabularies it cannot convert
        raise ConversionError(
            f"cannot convert the tokenizer of {gf.path.name}: {type(exc).__name__}: {exc}"
        ) from exc
    tokenizer.save_pretrained(str(out_dir))
    compact_json(out_dir / "tokenizer.json")
    cfg_file = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    for key in _DROP_TOKENIZER_KEYS:
        tok_cfg.pop(key, None)
    chat_template = gf.get("tokenizer.chat_template")
    jinja = out_dir / "chat_template.jinja"
    if not chat_template and jinja.is_file():
        chat_template = jinja.read_text(encoding="utf-8")
    jinja.unlink(missing_ok=True)  # one home for the template: tokenizer_config.json
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    for role, key in _SPECIAL_TOKEN_KEYS.items():
        text = gf.token(gf.get(key))
        if text is not None:
            tok_cfg[f"{role}_token"] = text
    for flag in ("add_bos_token", "add_eos_token"):
        value = gf.get(f"tokenizer.ggml.{flag}")
        if value is not None:
            tok_cfg[flag] = bool(value)
    if context_length:
        tok_cfg["model_max_length"] = int(context_length)
    cfg_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return bool(chat_template)


def write_generation_config(gf: GGUFFile, out_dir: Path, config) -> None:
    """generation_config.json with the special token ids (end-of-turn too, when the file names one)."""
    eos_ids = [
        int(i)
        for i in (gf.get("tokenizer.ggml.eos_token_id"), gf.get("tokenizer.ggml.eot_token_id"))
        if i is not None
    ]
    eos_ids = list(dict.fromkeys(eos_ids))
    gen = {
        "bos_token_id": getattr(config, "bos_token_id", None),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": getattr(config, "pad_token_id", None),
    }
    gen = {k: v for k, v in gen.items() if v is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


def import_gguf(
    path: Path | str, out_dir: Path | str, *, progress: Progress = True, tokenizer: bool = True
) -> GGUFConversion:
    """Write the files turbofan and transformers need beside a GGUF into ``out_dir`` (created if needed):
    config.json, generation_config.json and, unless ``tokenizer`` is False, tokenizer.json and
    tokenizer_config.json. The weights stay in the GGUF; no tensor is read."""
    path, out_dir = Path(path), Path(out_dir)
    report = Reporter.of(progress)
    start = time.perf_counter()
    gf = GGUFFile(path)
    arch = check_architecture(gf)
    config = build_config(gf)
    shapes = tensor_shapes(gf)
    check_against_model(config, shapes)
    parameters = sum(prod(s) for s in shapes.values())
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    context_length = gf.get(f"{arch}.context_length")
    write_generation_config(gf, out_dir, config)
    has_template = False
    if tokenizer:
        report.status("converting the tokenizer")
        has_template = write_tokenizer(gf, out_dir, context_length)
    seconds = time.perf_counter() - start
    log.info("imported %s (%s, %d tensors) in %.1f s", path.name, arch, len(gf.tensors), seconds)
    return GGUFConversion(
        gguf_arch=arch,
        architecture=config.architectures[0],
        model_type=config.model_type,
        quantization=quantization_label(gf),
        parameters=parameters,
        context_length=int(context_length) if context_length is not None else None,
        has_chat_template=has_template,
        license=gf.get("general.license"),
        general_name=gf.get("general.name"),
        seconds=seconds,
    )
