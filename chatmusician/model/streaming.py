"""Streaming rows of one batched ``generate``: each streamed row's text goes to its own sink as it is generated.

Only text the final answer keeps is sent: a possible stop string is held back until it is decided, and a
constrained row is sent up to the grammar's last accepting point (its own eager matcher), so the stream is
always a prefix of the answer and :meth:`BatchStreamer.close_row` sends the rest once the row is finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from chatmusician.abc.grammar import AbcConstraints
from chatmusician.model.sampling import StopScanner


class _RowText:
    def __init__(self, tokenizer, sink: Callable[[str], None], stops: Sequence[str], constraints):
        from chatmusician.model.constrained import RowState, ll_tokenizer, new_matcher

        self.tokenizer, self.sink, self.eos_id = tokenizer, sink, tokenizer.eos_token_id
        self.matcher = None
        if constraints is not None:
            self.matcher = RowState(
                new_matcher(tokenizer, constraints), self.eos_id, constraints, ll_tokenizer(tokenizer)
            )
        self.scanner = StopScanner(stops)
        self.ids: list[int] = []
        self.decoded = ""  # the text decoded so far (what the scanner was fed)
        self.sent = ""  # the text the sink got
        self.ended = False

    def feed(self, token: int) -> None:
        if self.ended or token == self.eos_id:
            self.ended = self.ended or token == self.eos_id
            return
        self.ids.append(token)
        upto = len(self.ids)
        if self.matcher is not None:
            self.matcher.consume(token)
            upto = self.matcher.last_accept
        text = self.tokenizer.decode(self.ids[:upto], skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(self.decoded) or not text.startswith(self.decoded):
            return  # half a character, or nothing new that is sure to stay
        self.send(self.scanner.feed(text[len(self.decoded) :]))
        self.decoded = text

    def send(self, text: str) -> None:
        if text:
            self.sent += text
            self.sink(text)

    def close(self, answer: str) -> None:
        """The row is finished and ``answer`` is its final text: send what the stream has not shown yet."""
        if answer.startswith(self.sent):
            self.send(answer[len(self.sent) :])
        self.ended = True


class BatchStreamer:
    """A transformers streamer for a whole batch: row i's text goes to ``sinks[i]`` (None: not streamed)."""

    def __init__(
        self,
        tokenizer,
        sinks: Sequence[Callable[[str], None] | None],
        stops: Sequence[Sequence[str]],
        constraints: Sequence[AbcConstraints | None],
    ):
        self.rows = [
            None if sink is None else _RowText(tokenizer, sink, stop, constraint)
            for sink, stop, constraint in zip(sinks, stops, constraints, strict=True)
        ]
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            if row is not None:
                row.feed(token)

    def end(self) -> None:
        """generate() is done (each row was closed when it finished)."""

    def close_row(self, i: int, answer: str) -> None:
        if self.rows[i] is not None:
            self.rows[i].close(answer)
