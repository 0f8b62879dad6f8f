"""Turning logits into tokens: penalties, logit bias, temperature, top-k, top-p, seeded sampling.

Everything here works on one row of logits (a numpy float32 vector) at a time; the engine
batches the model call, not the sampling, which costs microseconds next to a decode step.
Log-probabilities are those of the model's own distribution (softmax of the raw logits),
as OpenAI and vLLM report them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import RequestError


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self, vocab_size: int) -> None:
        def bad(param: str, message: str):
            raise RequestError(message, param=param, code="invalid_value")

        if not 0 <= self.temperature <= 2:
            bad("temperature", f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad("top_k", f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.top_logprobs <= 20:
            bad("top_logprobs", f"top_logprobs must be between 0 and 20, got {self.top_logprobs}")
        for token, bias in self.logit_bias.items():
            if not 0 <= int(token) < vocab_size:
                bad("logit_bias", f"logit_bias names token {token}, outside the vocabulary (0..{vocab_size - 1})")
            if not -100 <= bias <= 100:
                bad("logit_bias", f"logit_bias values must be between -100 and 100, got {bias}")
        for token in self.stop_token_ids:
            if not 0 <= int(token) < vocab_size:
                bad("stop_token_ids", f"stop token {token} is outside the vocabulary (0..{vocab_size - 1})")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64) - np.max(logits)
    return (x - np.log(np.exp(x).sum())).astype(np.float32)


class Sampler:
    """Samples one sequence's tokens; owns its random stream (seeded per request and choice)."""

    def __init__(self, params: SamplingParams, choice_index: int = 0):
        self.params = params
        seed = params.seed
        self.rng = np.random.default_rng(None if seed is None else [int(seed) & 0xFFFFFFFF, choice_index])
        self.counts: dict[int, int] = {}  # generated token -> occurrences (presence/frequency penalties)
        self._seen: np.ndarray | None = None  # tokens of prompt + output (repetition penalty)

    def observe_prompt(self, tokens: list[int]) -> None:
        if self.params.repetition_penalty != 1.0:
            self._seen = np.unique(np.asarray(tokens, dtype=np.int64))

    def observe(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1
        if self._seen is not None and token not in self._seen:
            self._seen = np.union1d(self._seen, [token])

    def process(self, logits: np.ndarray) -> np.ndarray:
        """Logits after bias and penalties (a copy only when something changes them)."""
        p = self.params
        if not (p.logit_bias or self.counts and (p.presence_penalty or p.frequency_penalty)
                or self._seen is not None):
            return logits
        x = logits.astype(np.float32, copy=True)
        if self._seen is not None and len(self._seen):
            seen = x[self._seen]
            x[self._seen] = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self.counts.keys(), dtype=np.int64)
            counts = np.fromiter(self.counts.values(), dtype=np.float32)
            x[ids] -= p.frequency_penalty * counts + p.presence_penalty
        for token, bias in p.logit_bias.items():
            x[int(token)] += bias
        return x

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution :meth:`sample` draws from (float64, sums to 1): the logits after bias
        and penalties, divided by the temperature, cut to the ``top_k`` best (ties at the cut
        stay, as in transformers) and then to the smallest set of most likely tokens whose mass
        reaches ``top_p``.  At temperature 0 it is all on the (first) best token."""
        probs = self._distribution(self.process(logits))
        return probs / probs.sum()

    def _distribution(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        if p.temperature == 0:
            probs = np.zeros(x.shape[0], dtype=np.float64)
            probs[int(np.argmax(x))] = 1.0
            return probs
        x = x.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < x.shape[0]:
            cut = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x >= cut, x, -np.inf)
        x -= x.max()
        probs = np.exp(x)
        probs /= probs.sum()
        if p.top_p < 1.0:
            # the smallest set of most likely tokens whose mass reaches top_p
            order = np.argsort(-probs, kind="stable")
            keep = int(np.searchsorted(np.cumsum(probs[order]), p.top_p, side="left")) + 1
            kept = np.zeros_like(probs)
            kept[order[:keep]] = probs[order[:keep]]
            probs = kept  # not renormalized: sample() scales by the total mass it draws from
        return probs

    def sample(self, logits: np.ndarray) -> int:
        x = self.process(logits)
        if self.params.temperature == 0:
            return int(np.argmax(x))
        probs = self._distribution(x)
        # draw in vocabulary order: nearly equal probabilities swapping places in a sort must
        # not change which token a given random number picks
        cdf = np.cumsum(probs)
        idx = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return min(idx, probs.shape[0] - 1)
