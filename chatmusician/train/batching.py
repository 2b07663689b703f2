"""Micro batches and the loss of one optimizer step: token rows -> model inputs, per-token loss over the step.

Pure numpy/torch: what a worker feeds the model, testable without Ray or DeepSpeed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from chatmusician.data.packing import IGNORE_INDEX


def collate(batch: dict[str, np.ndarray], max_length: int, pad_id: int = 0) -> dict[str, Any]:
    """Ray Data batch of token rows -> model inputs: ``input_ids``, ``labels``, ``position_ids`` [batch, longest]
    (torch int64) plus ``num_tokens`` (real tokens in the batch, for throughput; not a model input).

    Rows longer than ``max_length`` are an error (the trainer checks the shards' ``max_len`` before it starts,
    so this only guards the live stream). No attention mask: the model builds a block-diagonal causal mask from
    ``position_ids`` (chatmusician.data.packing), so packed documents stay apart and the padding, whose
    positions restart at 0, is a segment of its own that no real token attends to.
    """
    import torch

    ids = [np.asarray(r, dtype=np.int64) for r in batch["input_ids"]]
    longest = max(len(r) for r in ids)
    if longest > max_length:
        raise ValueError(
            f"a row of {longest} tokens is longer than max_length {max_length}: tokenize with max_len <= max_length"
        )
    labels = [np.asarray(r, dtype=np.int64) for r in batch["labels"]]
    positions = batch.get("position_ids")
    input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)
    label_arr = np.full((len(ids), longest), IGNORE_INDEX, dtype=np.int64)
    pos = np.tile(np.arange(longest, dtype=np.int64), (len(ids), 1))
    for i, row in enumerate(ids):
        n = len(row)
        input_ids[i, :n] = row
        label_arr[i, :n] = labels[i]
        if positions is not None and positions[i] is not None:
            pos[i, :n] = np.asarray(positions[i], dtype=np.int64)
        pos[i, n:] = np.arange(longest - n)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(label_arr),
        "position_ids": torch.from_numpy(pos),
        "num_tokens": torch.tensor(sum(len(r) for r in ids)),
    }


def target_tokens(labels) -> int:
    """Tokens a batch trains on: labels after HF's next-token shift that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def micro_batch_loss(model, batch: dict[str, Any], step_targets: int, world: int, accumulation: int):
    """(loss to backward, sum of its token losses) of one micro batch, so that the step's gradient is that of
    the mean loss over *every* target token of the step, across micro batches and ranks.

    DeepSpeed divides each micro batch's loss by ``accumulation`` and averages gradients over ``world`` ranks;
    scaling the summed token loss by ``world * accumulation / step_targets`` undoes both, whatever the micro
    batch size, world size or packing (HF's ``num_items_in_batch`` turns its mean into sum / that count). A mean
    per micro batch would weight a token by how many others share its micro batch instead.
    """
    items = max(step_targets, 1) / (world * accumulation)
    loss = model(**batch, num_items_in_batch=items).loss
    return loss, loss.detach().double() * items


def token_loss_sum(logits, labels) -> tuple[float, int]:
    """(sum of next-token cross entropies, number of target tokens) of one batch, in float64: the pieces of
    a mean token loss that sums exactly over batches and ranks (labels -100 = no loss; HF's shift)."""
    import torch.nn.functional as F

    shifted = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat, shifted, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss.double()), int((shifted != IGNORE_INDEX).sum())


def step_seed(seed: int, step: int, rank: int) -> int:
    """RNG seed of one optimizer step on one worker: dropout draws depend only on (seed, step, rank), so a
    resumed run repeats exactly what an uninterrupted one does."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**31)


def as_numpy(table) -> dict[str, np.ndarray]:
    return {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}


def stream_batches(shard, micro_batch_size: int, max_length: int, skip: int):
    """Endless micro batches of a Ray Data shard (the live stream), epoch after epoch, skipping ``skip``.
    Resuming re-reads (and re-tokenizes) what it skips: for small data; MusicPile-sized runs read shards."""
    seen = 0
    while True:
        yielded = False
        for batch in shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy", drop_last=True):
            yielded = True
            seen += 1
            if seen > skip:
                yield collate(batch, max_length)
        if not yielded:
            raise RuntimeError("this worker's data shard holds less than one micro batch")


def shard_batches(plan: dict[str, Any], cfg, rank: int, world: int, skip: int):
    """Endless micro batches of this rank's share of a shards plan (chatmusician.train.data_order)."""
    from chatmusician.train.data_order import ShardRowReader

    reader = ShardRowReader(
        plan["files"],
        plan["filesystem"],
        plan["chunks"],
        rank=rank,
        world=world,
        micro_batch_size=cfg.micro_batch_size,
        seed=cfg.seed,
        window=cfg.data.shuffle_window,
        shuffle=cfg.data.shuffle,
    )
    for batch in reader.batches(skip):
        yield collate(batch, cfg.max_length)
