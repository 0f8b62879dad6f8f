"""A ``tokenizer.json`` (Hugging Face ``tokenizers``) built from a GGUF file's ``tokenizer.ggml.*``.

GGUF stores a tokenizer as data: the token strings, their types and scores, the BPE merges,
the special token ids and a few flags.  llama.cpp supplies the behaviour around them in code;
this module expresses that behaviour with ``tokenizers`` components:

* ``gpt2`` (byte-level BPE, as in GPT-2, Llama 3, Qwen, SmolLM): the file's merges, a byte-level
  pre-tokenizer whose split regex depends on ``tokenizer.ggml.pre`` (SmolLM and StarCoder split
  every digit on its own first, Llama 3 and Qwen 2 use their own patterns), a byte-level decoder.
* ``llama`` (SentencePiece BPE, as in Llama 1/2 and Mistral): spaces become ``▁``, a ``▁`` is put
  before the text when ``tokenizer.ggml.add_space_prefix`` (the default) says so, unknown
  characters fall back to the ``<0xNN>`` byte tokens, and the merges are ranked by the scores of
  the tokens they make.

Tokens of type control (3) become special added tokens, user-defined ones (4) plain added
tokens, so both are matched whole.  The BOS token is prepended by the post-processor when
``tokenizer.ggml.add_bos_token`` asks for it (default: yes for ``llama``, no for ``gpt2``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from ..errors import CheckpointError

log = logging.getLogger("kiln")

# tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # SentencePiece's visible space

# Split patterns of byte-level vocabularies, by tokenizer.ggml.pre.  The vocabulary's merges were
# learned on text cut this way, so encoding must cut it the same way.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")

GPT2 = "gpt2"  # GPT-2's own pattern, built into the ByteLevel pre-tokenizer
DIGITS_THEN_GPT2 = "digits"  # every digit on its own, then GPT-2's pattern (SmolLM, StarCoder)
PRE_TOKENIZERS: dict[str, str] = {
    "default": GPT2,
    "gpt2": GPT2,
    "gpt-2": GPT2,
    "smollm": DIGITS_THEN_GPT2,
    "starcoder": DIGITS_THEN_GPT2,
    "refact": DIGITS_THEN_GPT2,
    "codeshell": DIGITS_THEN_GPT2,
    "command-r": DIGITS_THEN_GPT2,
    "exaone": DIGITS_THEN_GPT2,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}
# Llama 3's tokenizer looks a whole pre-token up in the vocabulary before merging.
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}

SUPPORTED_MODELS = ("gpt2", "llama")

_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _model(metadata: Mapping[str, Any]) -> str | None:
    return metadata.get("tokenizer.ggml.model")


def _add_bos(metadata: Mapping[str, Any]) -> bool:
    return bool(metadata.get("tokenizer.ggml.add_bos_token", _model(metadata) == "llama"))


def _token(metadata: Mapping[str, Any], key: str) -> str | None:
    """The text of the token whose id is stored under ``key``, or ``None``."""
    if key not in metadata or "tokenizer.ggml.tokens" not in metadata:
        return None
    tokens = metadata["tokenizer.ggml.tokens"]
    index = int(metadata[key])
    return tokens[index] if 0 <= index < len(tokens) else None


def tokenizer_config(metadata: Mapping[str, Any]) -> dict:
    """A Hugging Face ``tokenizer_config.json`` dict: special token strings, flags, chat template."""
    config: dict[str, Any] = {}
    if _model(metadata) in SUPPORTED_MODELS:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for name, key in _SPECIAL_IDS.items():
        token = _token(metadata, key)
        if token is not None:
            config[name] = token
    if _model(metadata) is not None:
        config["add_bos_token"] = _add_bos(metadata)
        config["add_eos_token"] = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        config["clean_up_tokenization_spaces"] = False
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return config


def build_tokenizer(metadata: Mapping[str, Any], source: str = "GGUF file"):
    """The ``tokenizers.Tokenizer`` a GGUF file describes (``source`` names it in errors)."""
    from tokenizers import Tokenizer

    model = _model(metadata)
    if model not in SUPPORTED_MODELS:
        raise CheckpointError(
            f"{source} uses tokenizer model '{model}', which kiln cannot build yet (supported: "
            f"{', '.join(SUPPORTED_MODELS)}); supply a tokenizer.json beside the converted weights instead"
        )
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise CheckpointError(f"{source} has no tokenizer.ggml.tokens; the file is incomplete")
    types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise CheckpointError(f"{source} has {len(tokens)} tokens but {len(types)} token types; the file is corrupt")
    spec = _byte_level(metadata, tokens, source) if model == "gpt2" else _sentencepiece(metadata, tokens, types, source)
    spec["added_tokens"] = _added_tokens(tokens, types)
    spec["post_processor"] = _post_processor(metadata, tokens)
    try:
        return Tokenizer.from_str(json.dumps(spec))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise CheckpointError(f"the tokenizer in {source} is inconsistent: {str(exc).splitlines()[0]}") from None


def write_tokenizer(metadata: Mapping[str, Any], out_dir: Path, source: str | None = None) -> list[str]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``; return their names.

    A file without tokenizer metadata gives no files (and an empty list).
    """
    if _model(metadata) is None:
        return []
    source = source or f"GGUF file '{getattr(metadata, 'path', '?')}'"
    tokenizer = build_tokenizer(metadata, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(metadata)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json"]


# ----------------------------------------------------------------------------- pieces
def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a repeated string keeps its first id
    if len(vocab) != len(tokens):
        log.debug("GGUF vocabulary repeats %d token strings; the later ids are unreachable", len(tokens) - len(vocab))
    return vocab


def _merges(metadata: Mapping[str, Any], source: str) -> list[list[str]]:
    merges = []
    for merge in metadata.get("tokenizer.ggml.merges") or []:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise CheckpointError(f"{source} has a malformed merge {merge!r} (expected two tokens separated by a space)")
        merges.append([left, right])
    return merges


def _bpe(vocab: dict[str, int], merges: list[list[str]], **options) -> dict:
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": merges,
    }
    model.update(options)
    return model


def _byte_level(metadata: Mapping[str, Any], tokens: list[str], source: str) -> dict:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    split = PRE_TOKENIZERS.get(pre)
    if split is None:
        log.warning("%s names pre-tokenizer '%s', which kiln does not know; using GPT-2's", source, pre)
        split = GPT2
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": split == GPT2}
    if split == GPT2:
        pre_tokenizer = byte_level
    elif split == DIGITS_THEN_GPT2:
        byte_level["use_regex"] = True
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        cut = {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [cut, byte_level]}
    vocab = _vocab(tokens)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": _bpe(vocab, _merges(metadata, source), ignore_merges=pre in IGNORE_MERGES),
    }


def _sentencepiece(metadata: Mapping[str, Any], tokens: list[str], types: list[int], source: str) -> dict:
    vocab = _vocab(tokens)
    if metadata.get("tokenizer.ggml.merges"):
        merges = _merges(metadata, source)
    else:
        scores = list(metadata.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))])
        if len(scores) != len(tokens):
            raise CheckpointError(f"{source} has {len(tokens)} tokens but {len(scores)} scores; the file is corrupt")
        merges = _merges_from_scores(tokens, types, scores, vocab)
    unk = _token(metadata, "tokenizer.ggml.unknown_token_id")
    if unk is None and "<unk>" in vocab:
        unk = "<unk>"
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    decoders: list[dict] = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "normalizer": None,
        # SentencePiece does not cut the text into words: merges may cross spaces (split=False)
        "pre_tokenizer": {
            "type": "Metaspace",
            "replacement": SPACE,
            "prepend_scheme": "first" if prefix else "never",
            "split": False,
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": _bpe(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=any(t == BYTE for t in types)),
    }


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float], vocab: Mapping[str, int]
) -> list[list[str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging.

    SentencePiece joins the adjacent pair whose joined text is the vocabulary piece with the
    highest score.  As ranked merges: every way to cut a piece into two pieces of the vocabulary
    is a merge, ranked by the piece's score (higher first; ties: longer left part, longer right
    part, then vocabulary order).  Only normal and user-defined pieces take part: control, byte
    and unused pieces are never produced by merging text.
    """
    mergeable = {t for t, kind in zip(tokens, types) if kind in (NORMAL, USER_DEFINED, 0)}
    ranked = []
    for index, piece in enumerate(tokens):
        if piece not in mergeable or vocab.get(piece) != index:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                key = (-float(scores[index]), -len(left), -len(right), index, vocab[left], vocab[right])
                ranked.append((key, left, right))
    ranked.sort(key=lambda item: item[0])
    return [[left, right] for _, left, right in ranked]


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict]:
    """Control tokens as special added tokens, user-defined ones as plain added tokens."""
    added = []
    seen = set()
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind not in (CONTROL, USER_DEFINED) or token in seen or not token:
            continue
        seen.add(token)
        added.append({
            "id": index,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == CONTROL,
        })
    return added


def _post_processor(metadata: Mapping[str, Any], tokens: list[str]) -> dict:
    """Prepend BOS / append EOS as ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` ask."""
    specials: dict[str, dict] = {}

    def special(key: str) -> dict | None:
        if key not in metadata:
            return None
        index = int(metadata[key])
        if not 0 <= index < len(tokens):
            return None
        specials[tokens[index]] = {"id": tokens[index], "ids": [index], "tokens": [tokens[index]]}
        return {"SpecialToken": {"id": tokens[index], "type_id": 0}}

    bos = special("tokenizer.ggml.bos_token_id") if _add_bos(metadata) else None
    eos = special("tokenizer.ggml.eos_token_id") if metadata.get("tokenizer.ggml.add_eos_token") else None
    single = [x for x in (bos, {"Sequence": {"id": "A", "type_id": 0}}, eos) if x is not None]
    second = [x for x in (bos, {"Sequence": {"id": "B", "type_id": 0}}, eos) if x is not None]
    pair = single + [_with_type(x, 1) for x in second]
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}


def _with_type(item: dict, type_id: int) -> dict:
    (kind, body), = item.items()
    return {kind: {**body, "type_id": type_id}}


__all__ = ["build_tokenizer", "tokenizer_config", "write_tokenizer", "PRE_TOKENIZERS"]
