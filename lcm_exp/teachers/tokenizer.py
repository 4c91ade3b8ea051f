"""A CLIP tokenizer built offline: byte-level BPE whose merges spell out a given word list.

Any text still tokenizes (unknown words fall back to byte-level pieces); the
listed words become single tokens, which is what a tiny text encoder needs.
"""
from __future__ import annotations

from functools import lru_cache

from transformers import CLIPTokenizer

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """The pieces byte-level BPE makes of `word` (lowest-ranked merge first, as CLIP's tokenizer does)."""
    ranks = {pair: i for i, pair in enumerate(merges)}
    pieces = [_bytes_to_unicode()[b] for b in word.encode("utf-8")]
    pieces[-1] += "</w>"
    while len(pieces) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_clip_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if w}):
        pieces = [_bytes_to_unicode()[b] for b in word.encode("utf-8")]
        pieces[-1] += "</w>"
        current = pieces[0]
        for nxt in pieces[1:]:
            merged = current + nxt
            if merged not in vocab:
                merges.append((current, nxt))
                vocab[merged] = len(vocab)
            current = merged
    # Merges of one word can split another ("an" of "and" inside "triangle"): apply the merges as BPE does
    # and, while a word still ends in several pieces, append merges that join them. Appended merges rank
    # last, so they never change how an already whole word is merged.
    for _ in range(16):
        broken = [pieces for pieces in (_bpe(word, merges) for word in sorted({w.lower() for w in words if w}))
                  if len(pieces) > 1]
        if not broken:
            break
        for pieces in broken:
            current = pieces[0]
            for nxt in pieces[1:]:
                merged = current + nxt
                if (current, nxt) not in merges:
                    merges.append((current, nxt))
                vocab.setdefault(merged, len(vocab))
                current = merged
    for tok in SPECIAL:
        vocab[tok] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
