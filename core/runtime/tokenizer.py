"""Text <-> token ids: the tokenizer, streaming detokenization and stop strings.

:class:`Tokenizer` wraps a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), which
covers byte-level BPE (GPT-2, Llama 3, SmolLM), SentencePiece-style BPE/Unigram with byte
fallback (Llama 2, Mistral) and WordPiece alike.

Generated tokens reach the user one at a time, so the text must be produced incrementally:
:class:`StreamDetokenizer` turns a stream of ids into text chunks that never split a UTF-8
character and keep the spaces that SentencePiece (``▁``) and byte-level (``Ġ``) vocabularies
encode inside the tokens; :class:`StopMatcher` holds back just enough of that text to catch a
stop string that arrives split over several chunks.
"""

from __future__ import annotations

import re
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import ConfigError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
REPLACEMENT_CHAR = "\ufffd"


def as_id_list(value: Any) -> list[int]:
    """``eos_token_id``-style values (an int, a list of ints, or nothing) as a list."""
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _token_text(value: Any) -> str | None:
    """A ``tokenizer_config.json`` token entry (``"</s>"`` or ``{"content": "</s>", ...}``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the token ids a chat model needs.

    Args:
        tokenizer: the loaded ``tokenizers.Tokenizer``.
        bos_token_id: id of the beginning-of-sequence token, if the model has one.
        eos_token_ids: ids that end generation (first one is the tokenizer's own eos).
        add_bos_token: whether plain-text prompts should start with ``bos_token_id``.
    """

    def __init__(
        self,
        tokenizer: Any,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos_token: bool = False,
    ):
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(int(i) for i in eos_token_ids))
        self.add_bos_token = bool(add_bos_token and bos_token_id is not None)
        self._special = frozenset(i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path, chat_config: Mapping[str, Any] | None = None) -> "Tokenizer":
        """Load ``path`` (a ``tokenizer.json``); ids come from ``chat_config`` and, when it
        sits beside the file, ``tokenizer_config.json``."""
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file {path} does not exist: re-run `kiln gen_config` to copy the tokenizer")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"cannot load tokenizer {path}: {reason}; re-run `kiln gen_config` on a checkpoint with a valid "
                f"{TOKENIZER_JSON}"
            ) from None
        return cls._with_ids(tok, dict(chat_config or {}), cls._read_tokenizer_config(path.parent))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, chat_config: Mapping[str, Any] | None = None) -> "Tokenizer":
        """Load the tokenizer of a kiln model directory (the one ``kiln gen_config`` wrote).

        ``chat_config`` is the directory's ``mlc-chat-config.json``: its ``tokenizer_files``
        name the files, and its ``bos_token_id``/``eos_token_id`` take precedence over those in
        ``tokenizer_config.json``.
        """
        model_dir = Path(model_dir)
        chat_config = dict(chat_config or {})
        listed = [str(n) for n in chat_config.get("tokenizer_files") or () if isinstance(n, str)]
        if TOKENIZER_JSON in listed or (model_dir / TOKENIZER_JSON).is_file():
            return cls.from_file(model_dir / TOKENIZER_JSON, chat_config)
        present = [n for n in listed if (model_dir / n).is_file()]
        found = f" (found: {', '.join(present)})" if present else ""
        raise ConfigError(
            f"no {TOKENIZER_JSON} in {model_dir}{found}: re-run `kiln gen_config` on a checkpoint that has one, "
            f"or create it with transformers: AutoTokenizer.from_pretrained(CHECKPOINT).save_pretrained('{model_dir}')"
        )

    @staticmethod
    def _read_tokenizer_config(directory: Path) -> dict:
        path = directory / TOKENIZER_CONFIG
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        return data if isinstance(data, dict) else {}

    @classmethod
    def _with_ids(cls, tok: Any, chat_config: dict, tok_config: dict) -> "Tokenizer":
        def token_id(key: str) -> int | None:
            text = _token_text(tok_config.get(key))
            return tok.token_to_id(text) if text is not None else None

        bos = chat_config.get("bos_token_id")
        if not isinstance(bos, int) or isinstance(bos, bool):
            bos = token_id("bos_token")
        own_eos = token_id("eos_token")
        eos = as_id_list(chat_config.get("eos_token_id")) + ([own_eos] if own_eos is not None else [])
        add_bos = tok_config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = _post_processor_adds(tok, bos)
        return cls(tok, bos_token_id=bos, eos_token_ids=eos, add_bos_token=add_bos)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` (``"Ġthe"``, ``"▁the"``), or ``None``."""
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry or added token, or ``None``."""
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special added token (skipped when decoding for display)."""
        return int(token_id) in self._special

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``.

        No special tokens are added unless ``add_bos`` asks for the BOS token; special-token
        strings written in the text (``<|im_start|>``) become their ids.
        """
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (special tokens left out unless ``skip_special_tokens=False``)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for: a SentencePiece ``<0xNN>`` byte, the bytes of a
        byte-level BPE piece (possibly part of a UTF-8 character), or its decoded text."""
        piece = self.id_to_token(token_id) or ""
        m = _BYTE_FALLBACK.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        text = self.decode([token_id], skip_special_tokens=False)
        if REPLACEMENT_CHAR in text and piece and all(ch in BYTE_DECODER for ch in piece):
            return bytes(BYTE_DECODER[ch] for ch in piece)
        return text.encode("utf-8")

    def detokenizer(self, skip_special_tokens: bool = True) -> "StreamDetokenizer":
        """A fresh :class:`StreamDetokenizer` for one generated sequence."""
        return StreamDetokenizer(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids})"


def _post_processor_adds(tok: Any, bos: int | None) -> bool:
    """Whether ``tokenizer.json``'s post-processor puts ``bos`` before a single sequence."""
    if bos is None:
        return False
    try:
        post = json.loads(tok.to_str()).get("post_processor") or {}
    except (ValueError, AttributeError):
        return False
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in processors:
        if proc.get("type") != "TemplateProcessing":
            continue
        first = (proc.get("single") or [{}])[0]
        special = first.get("SpecialToken", {}).get("id")
        if special is not None:
            ids = (proc.get("special_tokens") or {}).get(special, {}).get("ids") or []
            return bos in ids
    return False


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


BYTE_DECODER = _byte_level_decoder()


class StreamDetokenizer:
    """Turns generated token ids, one at a time, into text chunks.

    Joined, the chunks equal ``tokenizer.decode(all_ids)``.  A token's text depends on its
    neighbours (SentencePiece drops the ``▁`` of a sequence's first token; byte-level and
    byte-fallback tokens may carry a fraction of a UTF-8 character), so each new token is
    decoded together with the tokens of the previous chunk and only the difference is emitted;
    while the text ends in an incomplete character it is held back.  Only this bounded window
    is ever decoded, so a token costs O(1) whatever the length of the sequence.

    Valid text holds back at most the 4 tokens of one character.  Invalid UTF-8 (a sampled
    run of stray bytes) can keep the text ending in a replacement character; past
    ``max_pending`` tokens the part that later tokens can no longer change is released.
    One difference remains for invalid input: the ``tokenizers`` ByteFallback decoder turns a
    whole run of ``<0xNN>`` tokens into replacement characters when any byte of it is invalid,
    which a stream cannot know in advance, so ASCII bytes already shown stay shown.
    """

    # A character that later tokens may still complete starts in the last 3 bytes (UTF-8 uses
    # at most 4), hence in the last 3 tokens: text before them is final.
    _OPEN_TOKENS = 3

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, max_pending: int = 8):
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_pending = max(max_pending, self._OPEN_TOKENS + 1)
        self._window: list[int] = []  # tokens of the previous chunk, then the pending ones
        self._n_prefix = 0  # how many of _window belong to the previous chunk
        self._prefix_text = ""  # decode(_window[:_n_prefix])

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often ``""`` or one word)."""
        if self.skip_special_tokens and self._tokenizer.is_special(token_id):
            return ""  # decode() leaves it out entirely, so it must not split the window either
        self._window.append(int(token_id))
        text = self._decode(self._window)
        if not text.endswith(REPLACEMENT_CHAR):
            return self._advance(text)
        if len(self._window) - self._n_prefix < self.max_pending:
            return ""  # the last character may not be complete yet
        return self._release_final(text)

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character comes out as decoded)."""
        if len(self._window) == self._n_prefix:
            return ""
        return self._advance(self._decode(self._window))

    def _release_final(self, text: str) -> str:
        """Emit the pending text that no later token can change (invalid UTF-8 is pending).

        The cut goes where the tokens before and after it decode apart exactly as together,
        with the last ``_OPEN_TOKENS`` tokens after it; the window then starts at the cut.
        """
        n_pending = len(self._window) - self._n_prefix
        for keep in range(self._OPEN_TOKENS, n_pending):
            cut = len(self._window) - keep
            head = self._decode(self._window[:cut])
            if head.startswith(self._prefix_text) and head + self._decode(self._window[cut:]) == text:
                new = head[len(self._prefix_text):]
                del self._window[:cut]
                self._n_prefix, self._prefix_text = 0, ""
                return new
        if n_pending >= 4 * self.max_pending:  # no clean cut at all: give up exactness, keep the bound
            return self._advance(text)
        return ""

    def _advance(self, text: str) -> str:
        """Emit ``text`` (the decode of the window) beyond the previous chunk; the pending
        tokens become the new previous chunk."""
        prefix = self._prefix_text
        new = text[len(prefix):] if text.startswith(prefix) else text[min(len(prefix), len(text)):]
        del self._window[: self._n_prefix]
        self._n_prefix = len(self._window)
        self._prefix_text = self._decode(self._window)
        return new


class StopMatcher:
    """Finds stop strings in streamed text that may arrive split over several chunks.

    ``put`` returns the text that is safe to show: everything except a tail that could still
    turn into a stop string.  When a stop string is complete, ``put`` returns the text before
    it and ``stopped=True``; the stop string itself and anything after it are never returned.
    Empty stop strings are ignored.
    """

    def __init__(self, stop_strings: Iterable[str] = ()):
        self.stop_strings: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop_strings if s))
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._held = ""
        self.stopped = False

    def put(self, text: str) -> tuple[str, bool]:
        """Add a chunk of text; return ``(text safe to emit, whether a stop string was hit)``."""
        if self.stopped:
            return "", True
        if not self.stop_strings:
            return text, False
        buffer = self._held + text
        hit = min((i for i in (buffer.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if hit >= 0:
            self._held = ""
            self.stopped = True
            return buffer[:hit], True
        keep = self._partial_match(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Return the held-back tail (at the end of generation it can no longer become a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_match(self, buffer: str) -> int:
        """Length of the longest tail of ``buffer`` that begins some stop string."""
        for k in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0


__all__ = ["Tokenizer", "StreamDetokenizer", "StopMatcher", "as_id_list"]
