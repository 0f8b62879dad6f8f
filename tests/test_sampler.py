"""The sampler on synthetic logits: what each setting keeps, changes and draws.

Every draw comes from a seeded generator, so the statistical checks are deterministic; their
tolerances are several standard deviations wide all the same.
"""

import numpy as np
import pytest

from kiln.runtime.sampler import Sampler, SamplingParams


def sampler(seed=0, choice=0, **kw):
    kw.setdefault("temperature", 1.0)
    kw.setdefault("top_p", 1.0)
    return Sampler(SamplingParams(seed=seed, **kw), choice)


def softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def draws(s: Sampler, logits, n):
    return np.bincount([s.sample(logits) for _ in range(n)], minlength=len(logits))


LOGITS = np.random.default_rng(0).normal(0, 2, 50).astype(np.float32)  # distinct values


# ---------------------------------------------------------------------------- top_k / top_p
@pytest.mark.parametrize("k", [1, 2, 5, 49])
def test_top_k_keeps_exactly_the_k_best(k):
    s = sampler(top_k=k)
    probs = s.probabilities(LOGITS)
    best = set(np.argsort(-LOGITS)[:k].tolist())
    assert set(np.flatnonzero(probs).tolist()) == best
    # the k kept tokens keep their relative probabilities
    ids = sorted(best)
    np.testing.assert_allclose(probs[ids], softmax(LOGITS[ids]), rtol=1e-12)
    counts = draws(s, LOGITS, 2000)
    assert set(np.flatnonzero(counts).tolist()) <= best


def test_top_k_1_is_greedy_at_any_temperature():
    for temperature in (0.5, 1.0, 2.0):
        s = sampler(top_k=1, temperature=temperature)
        assert {s.sample(LOGITS) for _ in range(200)} == {int(np.argmax(LOGITS))}


def test_top_k_0_and_at_least_the_vocabulary_keep_everything():
    for k in (0, 50, 1000):
        np.testing.assert_allclose(sampler(top_k=k).probabilities(LOGITS), softmax(LOGITS), rtol=1e-12)


# probabilities 0.4, 0.25, 0.2, 0.1, 0.05 at scrambled positions
TOP_P_PROBS = np.array([0.1, 0.4, 0.05, 0.2, 0.25])
TOP_P_LOGITS = np.log(TOP_P_PROBS).astype(np.float32)


@pytest.mark.parametrize("top_p,kept", [
    (0.3, {1}),                 # 0.4 alone reaches 0.3
    (0.6, {1, 4}),              # 0.4 + 0.25 = 0.65
    (0.66, {1, 4, 3}),          # 0.65 falls short: add 0.2
    (0.9, {1, 4, 3, 0}),        # 0.95
    (0.97, {1, 4, 3, 0, 2}),
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    s = sampler(top_p=top_p)
    probs = s.probabilities(TOP_P_LOGITS)
    assert set(np.flatnonzero(probs).tolist()) == kept
    ids = sorted(kept)
    np.testing.assert_allclose(probs[ids], TOP_P_PROBS[ids] / TOP_P_PROBS[ids].sum(), rtol=1e-6)
    counts = draws(s, TOP_P_LOGITS, 3000)
    assert set(np.flatnonzero(counts).tolist()) == kept  # each kept token is drawn, no other


def test_top_k_applies_before_top_p():
    # top_k=3 leaves 0.4, 0.25, 0.2 (renormalized: 0.47, 0.29, 0.24); top_p=0.7 then keeps two
    probs = sampler(top_k=3, top_p=0.7).probabilities(TOP_P_LOGITS)
    assert set(np.flatnonzero(probs).tolist()) == {1, 4}


# ---------------------------------------------------------------------------- temperature
def test_temperature_scales_the_distribution_and_the_draws_follow_it():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    n = 20000
    top_share = []
    for temperature in (0.5, 1.0, 2.0):
        s = sampler(seed=int(temperature * 10), temperature=temperature)
        want = softmax(logits / temperature)
        np.testing.assert_allclose(s.probabilities(logits), want, rtol=1e-9)
        freq = draws(s, logits, n) / n
        # binomial standard deviation is at most 0.0036 here: 5 of them
        np.testing.assert_allclose(freq, want, atol=0.018)
        top_share.append(freq[0])
    # lower temperature sharpens (the best token gets more), higher flattens
    assert top_share[0] > top_share[1] > top_share[2]


def test_temperature_0_is_argmax_after_penalties_and_bias():
    s = sampler(temperature=0, logit_bias={3: 5.0})
    logits = np.array([1.0, 4.0, 0.0, 0.5], dtype=np.float32)
    assert s.sample(logits) == 3  # 0.5 + 5
    assert s.probabilities(logits).tolist() == [0, 0, 0, 1]


# ---------------------------------------------------------------------------- penalties and bias
def changed(before, after):
    return set(np.flatnonzero(before != after).tolist())


def test_presence_and_frequency_penalties_change_exactly_the_generated_tokens():
    s = sampler(presence_penalty=0.5, frequency_penalty=0.25)
    s.observe_prompt([7, 7, 8])  # the prompt does not count (OpenAI, vLLM)
    for token in (3, 3, 3, 5):
        s.observe(token)
    logits = np.linspace(-2, 2, 10).astype(np.float32)
    out = s.process(logits)
    assert changed(logits, out) == {3, 5}
    assert out[3] == pytest.approx(logits[3] - (3 * 0.25 + 0.5))
    assert out[5] == pytest.approx(logits[5] - (1 * 0.25 + 0.5))
    assert logits[3] == np.linspace(-2, 2, 10).astype(np.float32)[3]  # the input is not modified
    # negative values reward repetition
    s = sampler(presence_penalty=-1.0, frequency_penalty=-0.5)
    s.observe(2)
    assert s.process(logits)[2] == pytest.approx(logits[2] + 1.5)


def test_no_penalty_leaves_the_logits_alone():
    s = sampler()
    s.observe_prompt([1, 2])
    s.observe(1)
    logits = LOGITS.copy()
    assert s.process(logits) is logits


def test_repetition_penalty_equals_transformers():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = np.random.default_rng(1).normal(0, 3, 40).astype(np.float32)
    prompt, generated = [4, 9, 9, 17, 30], [2, 9, 33]
    seen = set(prompt + generated)
    assert any(logits[i] > 0 for i in seen) and any(logits[i] < 0 for i in seen)
    for penalty in (1.3, 0.7):
        s = sampler(repetition_penalty=penalty)
        s.observe_prompt(prompt)
        for token in generated:
            s.observe(token)
        out = s.process(logits)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + generated]),
                                                        torch.tensor(logits[None].copy()))[0].numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-6)
        assert changed(logits, out) == seen


def test_logit_bias_adds_to_exactly_its_tokens_and_minus_100_bans():
    best = int(np.argmax(LOGITS))
    s = sampler(logit_bias={best: -100.0, 7: 2.5})
    out = s.process(LOGITS)
    assert changed(LOGITS, out) == {best, 7}
    assert out[7] == pytest.approx(LOGITS[7] + 2.5) and out[best] == pytest.approx(LOGITS[best] - 100)
    assert best not in {s.sample(LOGITS) for _ in range(2000)}
    assert sampler(temperature=0, logit_bias={best: -100.0}).sample(LOGITS) != best
    forced = sampler(temperature=1.5, logit_bias={11: 100.0})
    assert {forced.sample(LOGITS) for _ in range(200)} == {11}


# ---------------------------------------------------------------------------- seeds and choices
def sequence(seed, choice=0, n=60):
    s = sampler(seed=seed, choice=choice, temperature=1.0)
    return [s.sample(LOGITS) for _ in range(n)]


def test_a_seed_reproduces_the_draws_and_another_seed_does_not():
    assert sequence(42) == sequence(42)
    assert sequence(42) != sequence(43)


def test_choices_of_one_seeded_request_differ_and_each_is_reproducible():
    choices = [sequence(5, i) for i in range(3)]
    assert len({tuple(c) for c in choices}) == 3
    assert [sequence(5, i) for i in range(3)] == choices
