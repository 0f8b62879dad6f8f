"""Contract tests an architecture plugin runs against transformers.

Subclass :class:`ArchitectureContract` in a test module, set ``hf_config`` to a tiny
Hugging Face config (a dict with ``architectures`` and ``model_type``), and pytest runs every
check below on kiln's float32 build of a random checkpoint: logits of whole prompts, chunked
prefill, decode steps, two sequences batched together, and a greedy continuation.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import hf_greedy, hf_logits, hf_model, kiln_greedy, make_hf_checkpoint


class ArchitectureContract:
    hf_config: dict = {}
    checkpoint_format = "safetensors"
    max_shard_size: str | None = None
    init_std = 0.1  # peaked enough logits that greedy decoding is well defined
    prompt_lengths = (1, 7, 33)
    decode_steps = 8
    greedy_tokens = 16
    atol = 1e-4
    device = "cpu"

    @pytest.fixture(scope="class")
    def checkpoint(self, tmp_path_factory):
        path = tmp_path_factory.mktemp(type(self).__name__) / "ckpt"
        return make_hf_checkpoint(path, self.hf_config, fmt=self.checkpoint_format,
                                  max_shard_size=self.max_shard_size, init_std=self.init_std)

    @pytest.fixture(scope="class")
    def reference(self, checkpoint):
        return hf_model(checkpoint)

    @pytest.fixture(scope="class")
    def built(self, checkpoint, kiln_build):
        return kiln_build(checkpoint, "q0f32", device=self.device)

    @pytest.fixture(scope="class")
    def loaded(self, built):
        from ..runtime.model import LoadedModel

        model = LoadedModel(built.model_dir, built.lib)
        model.create_kv_cache(max_batch_size=4, max_total_tokens=1024, prefill_chunk_size=64)
        return model

    def prompt(self, n: int, seed: int = 0) -> list[int]:
        return np.random.default_rng(seed + n).integers(0, self.hf_config["vocab_size"], n).tolist()

    def test_prompt_logits_match_transformers(self, loaded, reference):
        for n in self.prompt_lengths:
            tokens = self.prompt(n)
            loaded.add_sequence(0)
            got = loaded.prefill([0], [tokens], all_logits=True)
            loaded.remove_sequence(0)
            np.testing.assert_allclose(got, hf_logits(reference, tokens), atol=self.atol, rtol=0,
                                       err_msg=f"prompt of {n} tokens")

    def test_chunked_prefill_and_decode_match_transformers(self, loaded, reference):
        tokens = self.prompt(40, seed=1)
        ref = hf_logits(reference, tokens)
        n_prompt = len(tokens) - self.decode_steps
        loaded.add_sequence(0)
        try:
            got = []
            for start in range(0, n_prompt, 13):  # chunks of 13, 13, 6 tokens
                got.append(loaded.prefill([0], [tokens[start:min(start + 13, n_prompt)]], all_logits=True))
            for t in tokens[n_prompt:]:
                got.append(loaded.decode([0], [t]))
        finally:
            loaded.remove_sequence(0)
        np.testing.assert_allclose(np.concatenate(got), ref, atol=self.atol, rtol=0)

    def test_sequences_batched_together_match_transformers(self, loaded, reference):
        a, b = self.prompt(9, seed=2), self.prompt(21, seed=3)
        ref_a, ref_b = hf_logits(reference, a + [5, 6]), hf_logits(reference, b + [7, 8])
        loaded.add_sequence(1)
        loaded.add_sequence(2)
        try:
            first = loaded.prefill([1, 2], [a, b])  # one call, two sequences
            steps = [loaded.decode([1, 2], [5, 7]), loaded.decode([1, 2], [6, 8])]
        finally:
            loaded.remove_sequence(1)
            loaded.remove_sequence(2)
        np.testing.assert_allclose(first, np.stack([ref_a[len(a) - 1], ref_b[len(b) - 1]]), atol=self.atol, rtol=0)
        for i, step in enumerate(steps):
            np.testing.assert_allclose(step, np.stack([ref_a[len(a) + i], ref_b[len(b) + i]]), atol=self.atol, rtol=0)

    def test_greedy_continuation_is_identical(self, loaded, reference):
        tokens = self.prompt(12, seed=4)
        assert kiln_greedy(loaded, tokens, self.greedy_tokens) == hf_greedy(reference, tokens, self.greedy_tokens)
