"""Stop strings that may span tokens: find them in the streamed text, hold back possible beginnings.

Text that could be the start of a stop string is held until the next delta settles it, so a stream
never shows part of a stop string and the final text ends right before the first match. Before a
sequence has its min_tokens the matcher is not armed: that text is released as it comes and never
searched, so a stop string counts only once it lies wholly in text decoded after the minimum.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # text not yet released: a suffix that may begin a stop string

    def feed(self, delta: str, armed: bool = True) -> tuple[str, bool]:
        """Add decoded text; return (text safe to release, whether a stop string was found). Unarmed (a sequence
        short of its min_tokens), the text is released whole and not searched."""
        if not self.stops:
            return delta, False
        text = self.pending + delta
        if not armed:
            self.pending = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = self._held_suffix(text)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Release held text when generation ends for another reason."""
        text, self.pending = self.pending, ""
        return text

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
