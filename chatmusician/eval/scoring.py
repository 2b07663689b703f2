"""Perplexity scoring of multiple-choice candidates, as OpenCompass's PPL inferencer does, and faster.

OpenCompass (``HuggingFace._get_ppl`` with ``batch_padding=False``, the original's setting): each candidate is
tokenized on its own (``tokenizer(text, truncation=True, max_length=max_seq_len)``: BOS when the tokenizer
adds one), the cross-entropy of every next token is summed (nothing masked; tokens equal to the pad id are
ignored) and divided by the number of non-pad tokens, BOS included. The lowest score wins.

The four candidates of a question differ only in the last letter. When each tokenizes to the same prefix
plus one token, one forward pass over the prefix gives every candidate's score: the prefix's summed
cross-entropy is shared and the last term is ``-log p(letter | prefix)``. That is checked per question; where
it does not hold (a merged space, a letter split in two tokens, a prompt cut by truncation, shots dropped
differently per candidate) the question falls back to the four-pass computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Scored:
    """One question's four candidate scores (mean cross-entropy) and how they were computed."""

    scores: list[float]
    method: str
    """``one_pass`` or ``four_pass``."""

    @property
    def pred(self) -> int:
        """Index of the lowest score, the first on ties (OpenCompass: ``ppl.index(min(ppl))``)."""
        return self.scores.index(min(self.scores))


def pad_id_of(tokenizer) -> int:
    """The id OpenCompass ignores: the tokenizer's own pad token, or EOS when it has none (as OpenCompass sets
    it). ``load_tokenizer`` patches pad = ``<unk>`` for training; the pad the files declare is in
    ``init_kwargs``, so that patch does not leak into the scores."""
    own = tokenizer.init_kwargs.get("pad_token")
    own = getattr(own, "content", own)  # an AddedToken or a plain string
    return tokenizer.convert_tokens_to_ids(str(own)) if own is not None else tokenizer.eos_token_id


def encode(tokenizer, texts: Sequence[str], max_seq_len: int | None) -> list[list[int]]:
    """Token ids as OpenCompass gets them: special tokens added, right truncation at ``max_seq_len``."""
    kwargs = {"truncation": True, "max_length": max_seq_len} if max_seq_len else {}
    return [list(ids) for ids in tokenizer(list(texts), **kwargs)["input_ids"]]


def _batch(rows: Sequence[Sequence[int]], pad_id: int, device):
    """Right-padded ids and attention mask (right padding leaves every real position's logits unchanged)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _logits(model, ids, mask):
    import torch

    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits if logits.dtype == torch.float64 else logits.float()  # OpenCompass: .float()


def sequence_scores(model, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """OpenCompass's score of each token sequence: summed next-token cross-entropy / non-pad token count."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = _batch(chunk, pad_id, device)
        logits = _logits(model, ids, mask)[:, :-1]  # [B, T-1, V]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, pad_id)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=pad_id
        ).view(labels.shape)
        lens = ((ids != pad_id) & (mask == 1)).sum(-1)
        out += (loss.sum(-1) / lens).tolist()
    return out


def four_pass(
    model, tokenizer, candidates: Sequence[Sequence[str]], max_seq_len: int | None = None, batch_size: int = 8
) -> list[Scored]:
    """The reference method: every candidate of every question tokenized and scored on its own."""
    flat = [t for texts in candidates for t in texts]
    scores = sequence_scores(model, encode(tokenizer, flat, max_seq_len), pad_id_of(tokenizer), batch_size)
    return [Scored(scores[4 * i : 4 * i + 4], "four_pass") for i in range(len(candidates))]


def shared_prefix(rows: Sequence[Sequence[int]], pad_id: int) -> list[int] | None:
    """The prefix every candidate shares when each is that prefix plus one distinct non-pad token, else None."""
    n = len(rows[0])
    if n < 2 or any(len(r) != n for r in rows):
        return None
    prefix = list(rows[0][:-1])
    if any(list(r[:-1]) != prefix for r in rows[1:]):
        return None
    last = [r[-1] for r in rows]
    if len(set(last)) != len(last) or pad_id in last:
        return None
    return prefix


def one_pass(
    model, tokenizer, candidates: Sequence[Sequence[str]], max_seq_len: int | None = None, batch_size: int = 8
) -> list[Scored]:
    """Same scores as :func:`four_pass` with one forward pass per question wherever tokenization allows."""
    import torch

    pad_id = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    results: list[Scored | None] = [None] * len(candidates)
    fast: list[tuple[int, list[int], list[int]]] = []  # (question, prefix, last tokens)
    slow: list[int] = []
    for qi, texts in enumerate(candidates):
        full = encode(tokenizer, texts, None)
        fits = max_seq_len is None or max(len(r) for r in full) <= max_seq_len
        prefix = shared_prefix(full, pad_id) if fits else None
        if prefix is None:
            slow.append(qi)
        else:
            fast.append((qi, prefix, [r[-1] for r in full]))
    for start in range(0, len(fast), batch_size):
        chunk = fast[start : start + batch_size]
        ids, mask = _batch([p for _, p, _ in chunk], pad_id, device)
        logits = _logits(model, ids, mask)
        logp = torch.log_softmax(logits, dim=-1)  # [B, T, V]
        for row, (qi, prefix, last) in enumerate(chunk):
            n = len(prefix)
            targets = ids[row, 1:n]
            token_ce = -logp[row, : n - 1].gather(-1, targets[:, None])[:, 0]
            shared = token_ce[targets != pad_id].sum()
            letters = -logp[row, n - 1, torch.as_tensor(last, device=device)]
            count = int((ids[row, :n] != pad_id).sum()) + 1  # the letter token counts too
            results[qi] = Scored(((shared + letters) / count).tolist(), "one_pass")
    if slow:
        for qi, scored in zip(
            slow,
            four_pass(model, tokenizer, [candidates[i] for i in slow], max_seq_len, batch_size),
            strict=True,
        ):
            results[qi] = scored
    return results  # type: ignore[return-value]
