"""The embedded corpora: what each holds, and that the held-out domain stays out of the training ones."""

from __future__ import annotations

import pytest

from factorllm.data import CORPORA, interleave, load_text, pydoc_text, python_source_text


def test_python_source_is_code_capped_and_never_the_heldout_docs():
    text = python_source_text(max_chars=200_000)
    assert len(text) == 200_000
    assert "def " in text and "import " in text
    topics = pydoc_text()
    # long passages of the held-out docs must not appear (pydoc_data/topics.py is in the stdlib: it is skipped)
    probes = [topics[i : i + 80] for i in range(0, len(topics) - 80, len(topics) // 50)]
    full = python_source_text()
    assert not any(p in full for p in probes)


@pytest.mark.parametrize("source", ["/nope/corpus.txt", "./missing", "notes.md"])
def test_a_missing_local_path_is_a_clear_error(source):
    with pytest.raises(FileNotFoundError, match="no such file or folder; give a text file"):
        load_text(source)


def test_corpus_names_load_through_load_text():
    assert "python-source" in CORPORA
    assert load_text("python-source")[:1000] == python_source_text()[:1000]


def test_corpus_names_join_with_plus_and_every_prefix_mixes_them():
    kjv, src = load_text("kjv-heldout"), python_source_text()
    both = load_text("kjv-heldout+python-source")
    assert len(kjv) + len(src) <= len(both) <= len(kjv) + len(src) + 2  # + a line end after each
    head = both[:20_000]
    assert kjv[:4000] in head and src[:4000] in head  # both corpora early on, not one after the other
    assert sorted(both.splitlines()) == sorted((kjv + "\n" + src).splitlines())  # every line kept, once


def test_interleave_takes_blocks_in_turn():
    a, b = "a1\na2\na3\n", "b1\n"
    assert interleave([a, b], block_chars=1) == "a1\nb1\na2\na3\n"
