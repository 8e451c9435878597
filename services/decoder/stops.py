"""Stop strings matched across token boundaries, without ever emitting part of one.

Text arrives in detokenized pieces. Anything that could still turn out to be the start of a
stop string is held back until the next piece proves it is not (then it is released) or
completes the match (then it is dropped and generation ends).
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add a piece; return (text safe to emit now, the stop string that matched or None).

        After a match the text before the stop string is returned and nothing after it.
        """
        if not self.stops:
            return text, None
        buf = self._held + text
        match = self._earliest_match(buf)
        if match is not None:
            index, stop = match
            self._held = ""
            return buf[:index], stop
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        """Release the held text (generation ended for another reason)."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stops:
            index = buf.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:k]):
                    longest = k
                    break
        return longest
