"""Save and load factorized and sparsified models: safetensors weights, the model's HF config, and
`factorllm.json`.

Folder layout:
    config.json         the dense model's transformers config
    factorllm.json      format version, FactorConfig, and each MoE block's expert widths; or, for a sparsified
                        model (`"kind": "sparsity"`), its SparsityConfig, each layer's keeps and whether it
                        has a learned chooser
    model.safetensors   every weight of the factorized model; a sparsified model's weights under the dense
                        model's names (stock transformers loads the folder as a dense model)
    chooser.safetensors a sparsified model's learned choosers (`sparsity.fit_chooser_`), where it has any
    tokenizer files     when a tokenizer is given
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from factorllm.config import FactorConfig
from factorllm.moe import MoEFeedForward, moe_layers
from factorllm.sparsity import SparsityConfig, densify_, sparse_layers, sparsify_

FORMAT_VERSION = 1
MARKER = "factorllm.json"
CHOOSER = "chooser.safetensors"


def save(model: nn.Module, folder: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Writes a factorized or sparsified model (and optionally its tokenizer) to `folder`, atomically.

    The files are written to a temporary sibling folder and moved into place at the end, so an interrupted
    save never leaves a half-written model behind, and an existing folder is only replaced with `overwrite`.

    Example:
        >>> factorllm.save(model, "out/smollm2-8e", tokenizer)
    """
    folder = Path(folder)
    meta, to_write = _describe(model)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; choose another folder or pass overwrite=True (--overwrite)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.config.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
        # NOTE: save_model (not save_file) handles tied weights such as a shared embedding and LM head.
        save_safetensors_model(to_write, str(tmp / "model.safetensors"))
        choosers = _chooser_tensors(model)
        if choosers:
            save_file(choosers, str(tmp / CHOOSER))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if folder.exists():
            trash = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            folder.rename(trash)
            tmp.rename(folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _describe(model: nn.Module) -> tuple[dict, nn.Module]:
    """The marker file's content and the module whose weights are written.

    A sparsified model is written as its dense model (the SparseFFNs' weights under the dense FFNs' names: the
    folder is a checkpoint that stock transformers loads, running densely) plus its keeps in the marker."""
    layers, sparse = moe_layers(model), sparse_layers(model)
    if sparse and not layers:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "sparsity",
            "sparsity_config": dataclasses.asdict(model.sparsity_config),
            "source_model": getattr(model, "factor_source", None),
            "layers": {name: {"input_keep": b.input_keep, "neuron_keep": b.neuron_keep,
                              "learned_chooser": b.chooser_in is not None} for name, b in sparse},
        }, densify_(copy.deepcopy(model))
    if not layers or getattr(model, "factor_config", None) is None:
        raise ValueError("save() writes factorized or sparsified models; call factorllm.convert_ or "
                         "factorllm.sparsify_ first (or use save_pretrained for a dense model)")
    return {
        "format_version": FORMAT_VERSION,
        "factor_config": model.factor_config.to_dict(),
        "source_model": getattr(model, "factor_source", None),
        "layers": {
            name: {
                "expert_sizes": block.experts.sizes,
                "shared_size": 0 if block.shared is None else block.shared.sizes[0],
                "gating": block.router.gating,
                "top_k": block.router.top_k,
            }
            for name, block in layers
        },
    }, model


def is_factorllm_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


def load(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Loads a folder written by `save`: returns `(model, tokenizer)`; tokenizer is None if none was saved.

    Example:
        >>> model, tok = factorllm.load("out/smollm2-8e")
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give the folder that factorllm.save wrote")
    if not is_factorllm_folder(folder):
        raise ValueError(
            f"{folder} is not a factorllm save (no {MARKER}); for a dense model use factorllm.load_model"
        )
    meta = json.loads((folder / MARKER).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder} has factorllm format version {meta.get('format_version')}, this factorllm reads "
            f"{FORMAT_VERSION}; upgrade factorllm"
        )
    hf_config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if meta.get("kind") == "sparsity":
        _load_weights(model, folder)
        sparsify_(model, SparsityConfig(**meta["sparsity_config"]))
        for name, keeps in meta["layers"].items():
            block = model.get_submodule(name)
            block.input_keep, block.neuron_keep = keeps["input_keep"], keeps["neuron_keep"]
            if keeps.get("learned_chooser"):
                block.add_chooser()
        _load_choosers(model, folder)
        return _finish(model, meta, folder)
    config = FactorConfig.from_dict(meta["factor_config"])
    for name, spec in meta["layers"].items():
        mlp = model.get_submodule(name)
        shared_n = spec["shared_size"]
        sizes = spec["expert_sizes"]
        # The structure only: real neuron order and weights come from the state dict just below.
        order = torch.arange(shared_n + sum(sizes))
        part = list(torch.split(order[shared_n:], sizes))
        layer_cfg = FactorConfig.from_dict(
            {**config.to_dict(), "top_k": spec["top_k"], "gating": spec["gating"], "expert_sizes": None,
             "num_experts": len(sizes)}
        )
        model.set_submodule(
            name, MoEFeedForward.from_dense(mlp, layer_cfg, part, order[:shared_n] if shared_n else None)
        )
    _load_weights(model, folder)
    model.factor_config = config
    return _finish(model, meta, folder)


def _load_weights(model: nn.Module, folder: Path) -> None:
    missing, unexpected = load_safetensors_model(model, str(folder / "model.safetensors"), strict=False)
    if unexpected or missing:
        raise ValueError(
            f"{folder}/model.safetensors does not match its config (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}); the folder is damaged, save the model again"
        )


def _chooser_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learned choosers' weights of a sparsified model, by qualified name (none: {})."""
    return {f"{name}.{w}": getattr(block, w).detach().contiguous() for name, block in sparse_layers(model)
            for w in ("chooser_in", "chooser_up") if getattr(block, w) is not None}


def _load_choosers(model: nn.Module, folder: Path) -> None:
    want = _chooser_tensors(model)  # the blocks `add_chooser` gave one, as the marker says
    if not want:
        return
    if not (folder / CHOOSER).is_file():
        raise ValueError(f"{folder}/{MARKER} lists learned choosers but {CHOOSER} is missing; the folder is "
                         "damaged, save the model again")
    got = load_file(str(folder / CHOOSER))
    if set(got) != set(want) or any(got[n].shape != want[n].shape for n in want):
        raise ValueError(f"{folder}/{CHOOSER} does not match {MARKER} (tensors {sorted(set(got) ^ set(want))[:4]} "
                         "differ or shapes disagree); the folder is damaged, save the model again")
    with torch.no_grad():
        for name, value in got.items():
            model.get_parameter(name).copy_(value)


def _finish(model: nn.Module, meta: dict, folder: Path):
    """(model, tokenizer or None): the source recorded, eval mode, the tokenizer if one was saved."""
    from transformers import AutoTokenizer

    model.factor_source = meta.get("source_model")
    model.eval()
    tokenizer = None
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
