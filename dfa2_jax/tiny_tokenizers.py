"""Tiny CLIP and T5 tokenizers built offline, for tests and ``dfa2 demo`` (no downloads, no torch).

They have the real tokenizers' structure (so :func:`converters.text_encoders.load_tokenizer` reads them with
``AutoTokenizer`` exactly as it reads a released ``tokenizer/`` folder) but tiny vocabularies:

- CLIP: byte-level BPE as openai/clip-vit-large-patch14 — ``vocab.json`` = the 256 byte-level characters,
  the same 256 with ``</w>``, a few merges, then ``<|startoftext|>`` and ``<|endoftext|>`` last (so the eos
  id is the largest id, which the legacy ``eos_token_id == 2`` pooling relies on: argmax of the ids);
  ``merges.txt`` starts with ``#version: 0.2``; ``model_max_length`` 77.
- T5: a ``tokenizers`` Unigram model with a Metaspace pre-tokenizer (the layout of google/t5-v1_1-xxl's
  ``tokenizer.json``: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended), wrapped in transformers'
  ``T5TokenizerFast``; ``model_max_length`` 512, no sentinel (``<extra_id_*>``) tokens.
"""

from __future__ import annotations

import json
import math
import os
import string

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# (left, right) pairs in merge order; each merged token is appended to the vocabulary.
CLIP_MERGES = (
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("c", "a"), ("ca", "t</w>"),
    ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("i", "n</w>"), ("o", "n</w>"), ("r", "e"),
    ("d", "o"), ("do", "g</w>"), ("s", "t"), ("a", "r"),
)
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (openai/CLIP ``simple_tokenizer.py``)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the tiny CLIP tokenizer; ids as in openai/CLIP's ``SimpleTokenizer``."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    for left, right in CLIP_MERGES:
        if left not in tokens or right not in tokens:
            raise ValueError(f"merge {left!r} {right!r}: a part is not in the vocabulary built so far")
        tokens.append(left + right)
    tokens += [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in CLIP_MERGES]


def make_clip_tokenizer(folder: str | os.PathLike, *, pad_token: str = CLIP_EOS, model_max_length: int = 77):
    """Write a tiny CLIP tokenizer folder (vocab.json, merges.txt + what transformers' save_pretrained adds)
    and return it loaded. Vocabulary size: ``len(clip_vocab()[0])`` (532) — a CLIP text model for it needs
    ``vocab_size`` at least that. ``pad_token``: ``<|endoftext|>`` as SD3's CLIP-L tokenizer, ``"!"`` (id 0)
    as SD3's CLIP-G ``tokenizer_2``.
    """
    vocab, merges = clip_vocab()
    return write_clip_tokenizer(folder, vocab, merges, pad_token=pad_token, model_max_length=model_max_length)


def write_clip_tokenizer(folder: str | os.PathLike, vocab: dict[str, int], merges: list[str], *, pad_token: str,
                         model_max_length: int = 77):
    """Write a byte-level BPE CLIP tokenizer folder (``vocab.json``, ``merges.txt`` of "left right" lines,
    the special tokens of :data:`CLIP_BOS` / :data:`CLIP_EOS`) and return it loaded."""
    from transformers import CLIPTokenizer

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=vocab_path, merges=merges_path, bos_token=CLIP_BOS, eos_token=CLIP_EOS,
                        unk_token=CLIP_EOS, pad_token=pad_token, model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return tok


def t5_vocab(vocab_size: int) -> list[tuple[str, float]]:
    """(piece, log-probability) list of exactly ``vocab_size`` entries: the specials, "▁", the printable
    ASCII characters, a few whole words, then generated two-letter pieces (deterministic)."""
    words = ("the", "a", "of", "and", "in", "on", "photo", "cat", "dog", "with", "red", "blue", "astronaut",
             "riding", "horse", "mountain", "lake", "sunset", "city", "street", "painting", "portrait")
    pieces = ["▁"] + [c for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += ["▁" + w for w in words] + list(words)
    letters = string.ascii_lowercase
    extra = (p for a in letters for b in letters for p in ("▁" + a + b, a + b))
    need = vocab_size - len(T5_SPECIALS)
    if need < len(pieces):
        raise ValueError(f"vocab_size={vocab_size} is too small for the tiny T5 tokenizer (at least "
                         f"{len(pieces) + len(T5_SPECIALS)})")
    seen = set(pieces)
    for p in extra:
        if len(pieces) == need:
            break
        if p not in seen:
            pieces.append(p)
            seen.add(p)
    if len(pieces) < need:
        raise ValueError(f"vocab_size={vocab_size} is too large for the tiny T5 tokenizer (at most "
                         f"{len(seen) + len(T5_SPECIALS)})")
    # Longer pieces score higher so whole words win over characters; scores strictly decreasing in id.
    scored = [(p, -1.0 - 0.001 * i - (2.0 if len(p.lstrip("▁")) <= 1 else 0.0)) for i, p in enumerate(pieces)]
    return [(s, 0.0) for s in T5_SPECIALS] + [(p, round(s, 6)) for p, s in scored]


def make_t5_tokenizer(folder: str | os.PathLike, vocab_size: int, *, model_max_length: int = 512):
    """Write a tiny T5 tokenizer folder of exactly ``vocab_size`` tokens and return it loaded."""
    vocab = t5_vocab(vocab_size)
    assert all(math.isfinite(s) for _, s in vocab)
    return write_t5_tokenizer(folder, vocab, model_max_length=model_max_length)


def write_t5_tokenizer(folder: str | os.PathLike, vocab: list[tuple[str, float]], *, model_max_length: int = 512):
    """Write a T5-layout Unigram tokenizer folder for ``vocab`` ((piece, log-probability), the specials of
    :data:`T5_SPECIALS` first) and return it loaded as ``T5TokenizerFast``."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    backend = Tokenizer(Unigram(vocab, unk_id=T5_SPECIALS.index("<unk>"), byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                           special_tokens=[("</s>", 1)])
    raw = os.path.join(folder, "tokenizer.json")
    backend.save(raw)
    tok = T5TokenizerFast(tokenizer_file=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                          model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return tok
