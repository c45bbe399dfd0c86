"""The labelled sets of bench/retrieval_quality.py stay usable and self-contained: every
gold answer is in a file of this repository or a document this Python ships."""

from __future__ import annotations

import json

from tests.helpers import ROOT


def test_every_repo_question_is_answered_by_a_file_in_the_repository():
    # As chunks hold them: a paragraph's lines joined by single spaces.
    texts = [" ".join((ROOT / name).read_text().split())
             for name in ("README.md", "docs/contract.md")]
    pairs = json.loads((ROOT / "bench/data/repo_queries.json").read_text())
    assert len(pairs) >= 20
    # The phrase that labels the answering chunks is in one of the two files.
    assert [phrase for _, phrase in pairs if not any(phrase in t for t in texts)] == []


def test_every_pydoc_question_names_a_topic_this_python_ships():
    from pydoc_data.topics import topics

    pairs = json.loads((ROOT / "bench/data/pydoc_queries.json").read_text())
    assert len(pairs) >= 50 and len({topic for _, topic in pairs}) >= 40
    assert [topic for _, topic in pairs if topic not in topics] == []
    assert len({question for question, _ in pairs}) == len(pairs)
