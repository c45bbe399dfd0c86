"""Splitting documents into chunks for retrieval. Pure functions, no I/O.

Markdown is cut at headings, then at paragraphs; paragraphs are packed into
chunks of at most `max_tokens`, each chunk carrying its section's heading so
it reads on its own. Consecutive chunks share about `overlap_tokens` of text,
so an answer that straddles a boundary is found from either side.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$", re.MULTILINE)


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs; text before the first heading has heading ''."""
    sections: list[tuple[str, str]] = []
    last_end, heading = 0, ""
    for match in _HEADING.finditer(text):
        sections.append((heading, text[last_end:match.start()]))
        heading, last_end = match.group(2).strip(), match.end()
    sections.append((heading, text[last_end:]))
    return [(h, b.strip()) for h, b in sections if b.strip()]


def _pieces(body: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Paragraphs, with any paragraph over the budget cut between words."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", body):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        if count(paragraph) <= max_tokens:
            out.append(paragraph)
            continue
        current: list[str] = []
        for word in paragraph.split(" "):
            if current and count(" ".join([*current, word])) > max_tokens:
                out.append(" ".join(current))
                current = []
            current.append(word)
        if current:
            out.append(" ".join(current))
    return out


def chunk_text(text: str, *, max_tokens: int, overlap_tokens: int,
               count: Callable[[str], int]) -> list[str]:
    chunks: list[str] = []
    for heading, body in _sections(text):
        prefix = f"{heading}\n" if heading else ""
        budget = max(16, max_tokens - count(prefix))
        current: list[str] = []
        for piece in _pieces(body, budget, count):
            if current and count("\n".join([*current, piece])) > budget:
                chunks.append(prefix + "\n".join(current))
                # Carry the tail of this chunk into the next one.
                carried: list[str] = []
                for previous in reversed(current):
                    if count("\n".join([previous, *carried])) > overlap_tokens:
                        break
                    carried.insert(0, previous)
                current = carried if count("\n".join([*carried, piece])) <= budget else []
            current.append(piece)
        if current:
            chunks.append(prefix + "\n".join(current))
    return chunks
