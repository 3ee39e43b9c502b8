"""Stop strings, matched on decoded text across token boundaries.

Policy: a completion stops at the first token after which its decoded text contains a stop
string. That token is kept (in the completion ids and the mask, with its log-prob), as is every
token before it; the text is cut where the stop string starts, so the stop string itself (and
anything the completing token decoded to after it) is not in the text.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Checks one row's completion tokens for stop strings, decoding only a short tail.

    A stop string of L UTF-8 bytes spans at most L tokens (every token decodes to at least one
    byte), so the text of the last L + 2 tokens contains any stop string completed by the newest
    token; the two extra tokens absorb decoding artefacts at the window's start (a partial UTF-8
    character, or a leading space a SentencePiece decoder strips).
    """

    def __init__(self, tokenizer, stops: Sequence[str], include: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.include = include
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=0) + 2

    def __bool__(self) -> bool:
        return bool(self.stops)

    def completed(self, tokens: Sequence[int]) -> bool:
        """Whether the completion `tokens` (newest last) now contains a stop string."""
        text = self.tokenizer.decode(list(tokens[-self.window :]))
        return any(s in text for s in self.stops)

    def cut(self, text: str) -> str:
        """`text` up to the earliest stop string, or through it with `include` (unchanged if none
        occurs)."""
        found = [(i, len(s)) for s in self.stops if (i := text.find(s)) >= 0]
        if not found:
            return text
        start, length = min(found)
        return text[: start + length] if self.include else text[:start]
