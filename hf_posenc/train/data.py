"""Training data: tokenize (across processes with ``datasets`` when asked), pack documents into fixed-length
blocks (EOS between documents), hold out the last blocks for evaluation, and the PoSE position collator."""

from __future__ import annotations

import hashlib

import torch

from ..texts import load_texts

#: documents tokenized per call in one process (the cap on tokens is checked between calls)
TOKENIZE_BATCH = 8
#: the last token stream packed, by what decides it (a sweep trains many runs on one text in one process)
_LAST_STREAM: dict[str, torch.Tensor] = {}


def stream_key(tokenizer, texts: list[str], max_tokens: int | None) -> str | None:
    """A hash of what decides the token stream: the fast tokenizer's whole definition (vocabulary, merges,
    normalizer, added tokens), its EOS id and special-token splitting, the texts and the cap; None for a
    tokenizer without a ``backend_tokenizer`` (never cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(backend.to_str().encode())
    settings = (type(tokenizer).__name__, tokenizer.eos_token_id, getattr(tokenizer, "split_special_tokens", None))
    digest.update(repr((settings, max_tokens, len(texts))).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def pack_blocks(tokenizer, texts: list[str], block: int, *, num_proc: int = 1, max_tokens: int | None = None):
    """``(N, block)`` token blocks: documents tokenized (by ``num_proc`` processes through ``datasets``, or
    here), joined with EOS, cut into blocks. The last stream is kept (:func:`stream_key`): the next call with
    the same tokenizer, texts and cap only cuts it again."""
    eos = tokenizer.eos_token_id
    if max_tokens is not None:  # skip tokenizing text far past the cap (English: > 1 token per 8 chars)
        kept, chars = [], 0
        for text in texts:
            kept.append(text)
            chars += len(text)
            if chars > 8 * max_tokens:
                break
        texts = kept

    key = stream_key(tokenizer, texts, max_tokens)
    if (kept := _LAST_STREAM.get(key)) is not None:  # .get: another thread may replace it meanwhile
        return blocks_of(kept, block)

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + ([eos] if eos is not None else []) for x in ids]}

    if num_proc > 1:
        from datasets import Dataset, Features, Sequence, Value

        # the declared type spares datasets' type inference, which scans every token (datasets >= 5.2)
        features = Features({"ids": Sequence(Value("int64"))})
        documents = Dataset.from_dict({"text": texts}).map(
            tokenize, batched=True, num_proc=num_proc, remove_columns=["text"], features=features
        )["ids"]
    else:  # here (datasets would only copy the tokens to Arrow and back), a few documents at a time up to the cap
        documents, count = [], 0
        for start in range(0, len(texts), TOKENIZE_BATCH):
            batch = tokenize({"text": texts[start : start + TOKENIZE_BATCH]})["ids"]
            documents += batch
            count += sum(len(ids) for ids in batch)
            if max_tokens is not None and count >= max_tokens:
                break
    stream = torch.tensor([t for ids in documents for t in ids][:max_tokens], dtype=torch.long)
    if key is not None:
        _LAST_STREAM.clear()
        _LAST_STREAM[key] = stream
    return blocks_of(stream, block)


def blocks_of(stream: torch.Tensor, block: int) -> torch.Tensor:
    """The stream cut into ``(N, block)`` blocks (a copy: the kept stream stays as it is)."""
    n = len(stream) // block
    if n == 0:
        raise ValueError(f"The data has {len(stream)} tokens: too few for one block of {block}.")
    return stream[: n * block].view(n, block).clone()


def train_val_blocks(tokenizer, source: str, seq_len: int, val_len: int, val_fraction: float, **kw):
    """Training blocks of ``seq_len`` from the first part of the text, validation blocks of ``val_len``
    from the held-out tail (``val_fraction`` of the tokens), so evaluation text is never trained on."""
    texts = load_texts(source)
    blocks = pack_blocks(tokenizer, texts, seq_len, **kw)
    stream = blocks.flatten()
    held = int(len(stream) * val_fraction)
    if val_fraction > 0 and held < val_len:
        held = min(val_len, len(stream) // 2)
    train = stream[: len(stream) - held]
    val = stream[len(stream) - held :]
    train = train[: (len(train) // seq_len) * seq_len].view(-1, seq_len)
    val = val[: (len(val) // val_len) * val_len].view(-1, val_len) if held else val.new_zeros(0, val_len)
    return train, val


def pose_position_ids(seq_len: int, target_len: int, generator: torch.Generator) -> torch.Tensor:
    """PoSE (Zhu et al. 2024): split a ``seq_len`` window in two chunks and shift the second by a random
    skip, so positions cover ``[0, target_len)`` while the window stays short."""
    split = int(torch.randint(1, seq_len, (1,), generator=generator))
    skip = int(torch.randint(0, target_len - seq_len + 1, (1,), generator=generator))
    positions = torch.arange(seq_len)
    positions[split:] += skip
    return positions


def batch_at(
    blocks: torch.Tensor,
    index: int,
    batch_size: int,
    *,
    seed: int,
    pose_target_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """The ``index``-th batch of a seeded per-epoch shuffle: a pure function of (seed, index), so a
    resumed run sees exactly the data the uninterrupted one would."""
    per_epoch = len(blocks) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(blocks)} training blocks cannot fill a batch of {batch_size}.")
    epoch, within = divmod(index, per_epoch)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    rows = order[within * batch_size : (within + 1) * batch_size]
    input_ids = blocks[rows]
    batch = {"input_ids": input_ids, "labels": input_ids.clone(), "attention_mask": torch.ones_like(input_ids)}
    if pose_target_len is not None:
        generator = torch.Generator().manual_seed(seed * 7919 + index)
        seq_len = input_ids.shape[1]
        batch["position_ids"] = torch.stack(
            [pose_position_ids(seq_len, pose_target_len, generator) for _ in range(len(rows))]
        )
    return batch
