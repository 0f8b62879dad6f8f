"""The engine against transformers, and its scheduling, sampling and stopping behaviour.

The model is a small random Llama with a byte-level tokenizer (every byte one token), so
multi-byte characters and stop strings always arrive split over several tokens.
"""

import contextlib
import json
import logging
import re
import shutil
import threading
import time

import numpy as np
import pytest

from kiln import Engine
from kiln.errors import RequestError
from kiln.runtime.sampler import log_softmax
from kiln.testing import BYTE_SPECIALS, hf_greedy, hf_logits, hf_model, make_hf_checkpoint, write_byte_tokenizer

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 260,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 256,
    "eos_token_id": 257,
}
EOS = 256 + BYTE_SPECIALS.index("</s>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("engine") / "ckpt", CONFIG, init_std=0.1)
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def built(checkpoint, kiln_build):
    return kiln_build(checkpoint, "q0f32", conv_template="chatml", context_window_size=256, prefill_chunk_size=32,
                      max_batch_size=8)


@pytest.fixture(scope="module")
def engine(built):
    with Engine(built.model_dir, built.lib) as eng:
        yield eng


@pytest.fixture(scope="module")
def reference(checkpoint):
    return hf_model(checkpoint)


def prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def greedy(engine, tokens, n=16, **kw):
    """A greedy completion with its token ids (``logprobs=0``; see :func:`token_ids`)."""
    kw.setdefault("temperature", 0)
    return engine.completions.create(prompt=tokens, max_tokens=n, ignore_eos=True, logprobs=0, **kw)


def token_ids(engine, out, index=0) -> list[int]:
    """The token ids of a completion made with ``logprobs``: compared as ids, not as decoded
    text (where every invalid byte becomes U+FFFD, so text can hide a wrong token)."""
    table = getattr(engine, "_test_token_table", None)
    if table is None:
        table = {engine.token_text(i): i for i in range(engine.model.vocab_size)}
        assert len(table) == engine.model.vocab_size  # token_text tells every token apart
        engine._test_token_table = table
    return [table[t] for t in out.choices[index].logprobs.tokens]


def test_top_logprobs_equal_transformers(engine, reference):
    for n in (1, 9, 40):
        tokens = prompt(n, seed=n)
        out = engine.completions.create(prompt=tokens, max_tokens=1, temperature=0, logprobs=5, ignore_eos=True)
        ref = log_softmax(hf_logits(reference, tokens)[-1])
        top = np.argsort(-ref)[:5]
        got = out.choices[0].logprobs.top_logprobs[0]
        assert list(got) == [engine.token_text(int(i)) for i in top]
        np.testing.assert_allclose(list(got.values()), ref[top], atol=1e-4)
        assert out.choices[0].logprobs.token_logprobs[0] == pytest.approx(float(ref[top[0]]), abs=1e-4)


def test_greedy_output_equals_transformers_generate(engine, reference):
    tokens = prompt(12, seed=3)
    out = greedy(engine, tokens, 24)
    expected = hf_greedy(reference, tokens, 24)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens == 12
    assert token_ids(engine, out) == expected
    assert out.choices[0].text == engine.tokenizer.decode(expected)


def test_top_k_1_at_temperature_1_is_greedy(engine):
    for seed in range(3):
        tokens = prompt(10, seed=20 + seed)
        want = token_ids(engine, greedy(engine, tokens, 20))
        got = greedy(engine, tokens, 20, temperature=1.0, top_p=1.0, top_k=1, seed=seed)
        assert token_ids(engine, got) == want
        assert token_ids(engine, greedy(engine, tokens, 20, temperature=1.5, top_k=1)) == want  # no seed


def test_repetition_penalty_equals_transformers_generate(engine, reference):
    import torch

    for seed in (3, 4):
        tokens = prompt(12, seed=seed)
        out = greedy(engine, tokens, 24, repetition_penalty=1.3)
        with torch.no_grad():
            ref = reference.generate(torch.tensor([tokens]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                     repetition_penalty=1.3, pad_token_id=0, eos_token_id=None)
        expected = ref[0, len(tokens):].tolist()
        assert token_ids(engine, out) == expected
        assert expected != hf_greedy(reference, tokens, 24)  # the penalty changed the answer


@contextlib.contextmanager
def scheduler_held(engine, requests: int):
    """Hold the scheduler thread while the body queues ``requests`` requests, so that the
    scheduler sees them all at once (the batch does not depend on thread timing)."""
    entered, gate = threading.Event(), threading.Event()
    engine._inbox.put(("call", lambda: (entered.set(), gate.wait(300))))
    assert entered.wait(60)
    try:
        yield
        deadline = time.monotonic() + 60
        while engine._inbox.qsize() < requests and time.monotonic() < deadline:
            time.sleep(0.002)
        assert engine._inbox.qsize() == requests
    finally:
        gate.set()


def run_together(engine, calls):
    """Run ``calls`` (functions of the engine) from threads, queued in one scheduler step."""
    results = [None] * len(calls)
    errors = []

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with scheduler_held(engine, len(calls)):
        for t in threads:
            t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("quantization", ["q0f32", "q4f32_2"])
def test_results_do_not_depend_on_batching(checkpoint, kiln_build, quantization):
    """Eight requests of different lengths decoded together give, token for token, what each
    gives alone.  No prefix cache (the batched runs must compute their prompts themselves), and
    a 4-bit build too: the CPU backend's hand-written kernels run the quantized projections and
    the paged attention of batched decode and prefill."""
    built = kiln_build(checkpoint, quantization, conv_template="chatml", context_window_size=256,
                       prefill_chunk_size=32, max_batch_size=8)
    prompts = [prompt(n, seed=100 + n) for n in (3, 17, 40, 8, 65, 1, 29, 50)]
    with Engine(built.model_dir, built.lib, prefix_cache=False) as eng:
        alone = [token_ids(eng, greedy(eng, p, 12)) for p in prompts]
        steps_before, tokens_before = eng.stats.decode_steps, eng.stats.decode_tokens
        batched = run_together(eng, [lambda p=p: greedy(eng, p, 12) for p in prompts])
        assert [token_ids(eng, out) for out in batched] == alone
        assert eng.stats.cached_prompt_tokens == 0
        # they really ran together: far fewer decode steps than tokens
        steps = eng.stats.decode_steps - steps_before
        assert (eng.stats.decode_tokens - tokens_before) / steps > 3


def test_seeded_sampling_is_reproducible(engine):
    kw = dict(prompt=prompt(10, seed=7), max_tokens=20, temperature=1.0, top_p=0.9, ignore_eos=True)
    a = engine.completions.create(seed=42, **kw).choices[0].text
    b = engine.completions.create(seed=42, **kw).choices[0].text
    c = engine.completions.create(seed=43, **kw).choices[0].text
    assert a == b and a != c


def test_n_returns_independent_choices(engine):
    out = engine.completions.create(prompt=prompt(10, seed=8), max_tokens=12, temperature=1.0, n=3, seed=5,
                                    ignore_eos=True)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) == 3
    assert out.usage.completion_tokens == 36
    # choice i of a seeded request is reproducible
    again = engine.completions.create(prompt=prompt(10, seed=8), max_tokens=12, temperature=1.0, n=3, seed=5,
                                      ignore_eos=True)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]


def test_stop_strings_split_across_tokens_are_caught_and_hidden(engine):
    tokens = prompt(12, seed=3)
    text = greedy(engine, tokens, 24).choices[0].text
    assert len(text) > 8
    stop = text[5:8]  # three bytes: three tokens at least
    out = engine.completions.create(prompt=tokens, max_tokens=24, temperature=0, stop=[stop, "\x00never"],
                                    ignore_eos=True)
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in engine.completions.create(
        prompt=tokens, max_tokens=24, temperature=0, stop=stop, ignore_eos=True, stream=True) if c.choices)
    assert streamed == out.choices[0].text


def test_stop_token_ids_and_eos(engine, reference):
    tokens = prompt(12, seed=3)
    ids = hf_greedy(reference, tokens, 10)  # kiln's greedy tokens (equal, see above)
    out = engine.completions.create(prompt=tokens, max_tokens=10, temperature=0, stop_token_ids=[ids[4]],
                                    ignore_eos=True)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == engine.tokenizer.decode(ids[:ids.index(ids[4])])
    assert out.usage.completion_tokens == ids.index(ids[4]) + 1
    biased = engine.completions.create(prompt=tokens, max_tokens=10, temperature=0, logit_bias={EOS: 100})
    assert biased.choices[0].text == "" and biased.choices[0].finish_reason == "stop"
    assert biased.usage.completion_tokens == 1


def test_streaming_joins_to_the_non_streamed_answer(engine):
    tokens = prompt(30, seed=11)
    full = greedy(engine, tokens, 40).choices[0].text
    chunks = list(engine.completions.create(prompt=tokens, max_tokens=40, temperature=0, ignore_eos=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-2].choices[0].finish_reason == "length"


def test_streaming_never_splits_a_character(engine):
    """Sampled bytes from a random model form many multi-byte sequences (valid and not); a
    stream that emitted part of a character early would show a replacement character the whole
    text does not have, so the joined chunks would differ from it."""
    for seed in range(6):
        # top_p=1: a random model's nearly flat distribution puts many tokens right at a top_p
        # cut, where float noise from the prefix cache decides membership
        kw = dict(prompt=prompt(8, seed=seed) + list("日本語😀".encode()), max_tokens=40, temperature=1.5,
                  top_p=1.0, seed=seed, ignore_eos=True)
        full = engine.completions.create(**kw).choices[0].text
        chunks = [c.choices[0].text for c in engine.completions.create(stream=True, **kw) if c.choices]
        assert "".join(chunks) == full


def test_chat_completion_uses_the_template(engine, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = engine.chat.completions.create(messages=messages, max_tokens=8, temperature=0)
    rendered = engine.conversation.render(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    expected = engine.completions.create(prompt=engine.tokenizer.encode(rendered), max_tokens=8, temperature=0,
                                         stop=["<|im_end|>"])
    assert out.choices[0].message.content == expected.choices[0].text
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    d = out.to_dict()
    assert d["choices"][0]["message"]["content"] == out.choices[0].message.content
    assert json.loads(out.to_json())["usage"]["total_tokens"] == out.usage.total_tokens
    stream = list(engine.chat.completions.create(messages=messages, max_tokens=8, temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == out.choices[0].message.content


def test_multi_turn_reuses_the_kv_cache_of_earlier_turns(engine):
    messages = [{"role": "user", "content": "tell me something long"}]
    first = engine.chat.completions.create(messages=messages, max_tokens=20, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "and more"}]
    second = engine.chat.completions.create(messages=messages, max_tokens=10, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens
    engine.clear_prefix_cache()
    fresh = engine.chat.completions.create(messages=messages, max_tokens=10, temperature=0)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].message.content == second.choices[0].message.content


def test_prompt_longer_than_context_is_refused(engine):
    with pytest.raises(RequestError, match="the prompt has 300 tokens, more than the model's context window of 256"):
        engine.completions.create(prompt=prompt(300), max_tokens=1)
    out = engine.completions.create(prompt=prompt(300), max_tokens=2, truncate_prompt_tokens=100, temperature=0)
    assert out.usage.prompt_tokens == 100
    near = engine.completions.create(prompt=prompt(250), max_tokens=50, temperature=0, ignore_eos=True)
    assert near.choices[0].finish_reason == "length" and near.usage.completion_tokens == 6


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logit_bias": {9999: 1}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ],
)
def test_bad_sampling_values_are_refused(engine, kw, param):
    with pytest.raises(RequestError) as info:
        engine.completions.create(prompt=[1, 2, 3], **kw)
    assert info.value.param == param


def test_cancelled_and_finished_requests_free_their_kv_pages(engine):
    engine.clear_prefix_cache()
    assert engine.kv_pages_in_use() == 0
    streams = []
    for i in range(200):
        it = engine.completions.create(prompt=prompt(5 + i % 40, seed=i), max_tokens=8, temperature=0,
                                       ignore_eos=True, stream=True)
        if i % 2:
            next(iter(it))  # start, then abandon mid-stream
            it.close()
        else:
            streams.append(it)
    for it in streams:
        list(it)
    assert engine.wait_idle(60)
    engine.clear_prefix_cache()
    assert engine.kv_pages_in_use() == 0


def test_requests_beyond_the_kv_cache_are_preempted_and_recomputed(built):
    """A KV cache of 256 tokens (16 pages, and TVM's spare one) and eight requests that need about
    35 pages in all:
    the scheduler must preempt running requests (free their KV) and recompute them later, and
    every answer must still be, token for token, what the request gives alone."""
    prompts = [prompt(n, seed=300 + n) for n in (20, 30, 25, 35, 40, 22, 28, 33)]
    with Engine(built.model_dir, built.lib, max_total_tokens=256, prefix_cache=False) as eng:
        assert eng.total_pages <= 17
        alone = [token_ids(eng, greedy(eng, p, 40)) for p in prompts]
        assert eng.stats.preemptions == 0
        batched = run_together(eng, [lambda p=p: greedy(eng, p, 40) for p in prompts])
        assert eng.stats.preemptions > 0
        assert [token_ids(eng, out) for out in batched] == alone
        assert all(out.usage.completion_tokens == 40 and out.choices[0].finish_reason == "length" for out in batched)
        assert eng.wait_idle(60) and eng.kv_pages_in_use() == 0


def test_a_request_larger_than_the_whole_kv_cache_gets_kv_cache_full(built):
    with Engine(built.model_dir, built.lib, max_total_tokens=64, prefix_cache=False) as eng:
        pages = eng.total_pages  # 4 pages of 16 tokens, and TVM's spare one
        assert pages <= 5 and eng.context_window_size == 64
        # three choices of a 50-token prompt need 4 + 2 pages before the first token
        with pytest.raises(RequestError, match=rf"the request needs 6 KV-cache pages but the cache has only {pages}; "
                                               r"raise max_total_tokens") as info:
            eng.completions.create(prompt=prompt(50), max_tokens=4, n=3, temperature=1.0, seed=1)
        assert info.value.code == "kv_cache_full"
        # three choices that start small and outgrow the cache while generating
        with pytest.raises(RequestError, match=f"KV-cache pages but the cache has only {pages}") as info:
            eng.completions.create(prompt=prompt(10), max_tokens=50, n=3, temperature=1.0, seed=1,
                                   ignore_eos=True)
        assert info.value.code == "kv_cache_full"
        assert eng.wait_idle(60) and eng.kv_pages_in_use() == 0
        # the engine serves on
        out = greedy(eng, prompt(10), 20)
        assert out.usage.completion_tokens == 20


def test_the_older_ndarray_cache_json_name_loads(built, tmp_path):
    """Weights indexed by MLC's older ``ndarray-cache.json`` load and answer as with
    ``tensor-cache.json``."""
    legacy = tmp_path / "legacy"
    shutil.copytree(built.model_dir, legacy)
    (legacy / "tensor-cache.json").rename(legacy / "ndarray-cache.json")
    tokens = prompt(12, seed=3)
    with Engine(built.model_dir, built.lib, prefix_cache=False) as eng:
        want = token_ids(eng, greedy(eng, tokens, 24))
    with Engine(legacy, legacy / built.lib.name, prefix_cache=False) as eng:
        assert token_ids(eng, greedy(eng, tokens, 24)) == want


def test_load_logs_the_device_and_the_memory_estimate(built, caplog):
    caplog.set_level(logging.INFO, logger="kiln")
    with Engine(built.model_dir, built.lib, max_total_tokens=512, max_batch_size=4) as eng:
        kv_mb = eng.model.kv_bytes_per_token() * eng.total_pages * eng.model.kv_config.page_size / (1 << 20)
        params_mb = eng.model.param_bytes / (1 << 20)
    text = caplog.text
    assert re.search(r"Device: cpu:0 \(\{.*\"kind\":\"llvm\"", text), text
    m = re.search(r"Total memory usage: ([\d.]+) MB \(Parameters: ([\d.]+) MB\. KVCache: ([\d.]+) MB\. "
                  r"Temporary buffer: ([\d.]+) MB\)", text)
    assert m, text
    total, params, kv, temp = map(float, m.groups())
    assert params == pytest.approx(params_mb, abs=0.01) and kv == pytest.approx(kv_mb, abs=0.01) and temp > 0
    assert total == pytest.approx(params + kv + temp, abs=0.02)
    # the hint names what the Python API takes, not command-line options
    assert ("KV cache: 512 tokens for up to 4 sequences, context window 256. To reduce memory, lower Engine's "
            "max_total_tokens, max_batch_size or context_window_size.") in text


def test_bench_engine_runs_on_the_device_asked_for(built):
    """bench/engine.py takes --device (and --help describes the script in full)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "engine.py"
    help_ = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300).stdout
    assert "--device" in help_ and "on one model." in help_
    res = subprocess.run([sys.executable, script, built.model_dir, "--model-lib", built.lib, "--device", "cpu",
                          "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "1", "--concurrency", "1,2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "device cpu:0" in res.stdout and "2 concurrent: aggregate" in res.stdout
    bad = subprocess.run([sys.executable, script, built.model_dir, "--model-lib", built.lib, "--device", "nosuch"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "nosuch" in bad.stderr


def test_overrides_with_a_given_library_are_limits_within_it(built, caplog):
    caplog.set_level(logging.INFO, logger="kiln")
    with Engine(built.model_dir, built.lib, overrides="context_window_size=128;max_batch_size=2") as eng:
        assert (eng.context_window_size, eng.max_batch_size) == (128, 2)
        assert eng.model.lib_path == built.lib  # no library was compiled for them
    assert "overrides ask for" not in caplog.text
    with Engine(built.model_dir, built.lib, overrides={"context_window_size": 512}) as eng:
        assert eng.context_window_size == 256
    assert (f"overrides ask for context_window_size=512, but the model library {built.lib} was built for 256: "
            "using 256") in caplog.text
