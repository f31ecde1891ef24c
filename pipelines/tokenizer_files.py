"""Write a small CLIP BPE tokenizer (vocab.json + merges.txt) for a closed vocabulary.

The bundled demo model and the test fixtures need a real ``CLIPTokenizer`` that
``from_pretrained`` loads exactly like Stable Diffusion's, but without the 49k-token
OpenAI vocabulary (which cannot be downloaded here). The files written here follow the
same byte-level BPE format: every byte is a token (so any prompt tokenizes), and each
known word gets a chain of merges that ends in the whole word as one token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """The printable-character stand-ins for bytes used by GPT-2 and CLIP BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges) where every word in ``words`` is a single token.

    Args:
        words: lower-case words made of ASCII letters.

    Returns:
        vocab: token -> id, with the byte tokens first and the special tokens last.
        merges: the ordered merge rules, as CLIP's merges.txt lists them.
    """
    byte_chars = list(bytes_to_unicode().values())
    tokens: list[str] = byte_chars + [c + "</w>" for c in byte_chars]
    seen = set(tokens)
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        if len(word) < 2:
            continue
        # CLIP marks the last character of a word with </w>; merge left to right.
        left = word[0]
        for i in range(1, len(word)):
            right = word[i] + ("</w>" if i == len(word) - 1 else "")
            merged = left + right
            if (left, right) not in merges:
                merges.append((left, right))
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
            left = merged
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder
