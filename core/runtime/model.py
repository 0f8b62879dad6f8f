"""A compiled model in memory: library + weights + config, checked to belong together.

:class:`LoadedModel` is the thin layer over the Relax VM that the engine drives: it owns the
parameters and the paged KV cache and exposes ``prefill`` (one or more sequences, one call)
and ``decode`` (a batch, one call).  It is not thread-safe: the engine's scheduler thread is its
only user.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DeviceError, MismatchError
from ..pipeline.compile import METADATA_FUNC, PARAM_LAYOUT_FUNC
from ..pipeline.gen_config import read_chat_config
from ..pipeline.tensor_cache import check_params, param_records, read_index

log = logging.getLogger("kiln")

PAGE_SIZE = 16


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)


def load_params(model_dir: Path, names: list[str], device) -> list:
    """The named tensors of a tensor cache, on ``device``, in the order of ``names``."""
    import tvm

    index = read_index(model_dir)
    records = param_records(index)
    by_shard: dict[str, list[dict]] = {}
    for shard in index["records"]:
        for rec in shard["records"]:
            by_shard.setdefault(shard["dataPath"], []).append(rec)
    wanted = set(names)
    out: dict[str, object] = {}
    for data_path, recs in by_shard.items():
        recs = [r for r in recs if r["name"] in wanted]
        if not recs:
            continue
        blob = np.fromfile(Path(model_dir) / data_path, dtype=np.uint8)
        for rec in recs:
            raw = blob[rec["byteOffset"] : rec["byteOffset"] + rec["nbytes"]]
            if rec.get("format", "raw") == "f32-to-bf16":
                arr = _bf16_to_f32(raw.view(np.uint16)).reshape(rec["shape"])
            else:
                arr = raw.view(np.dtype(rec["dtype"])).reshape(rec["shape"])
            out[rec["name"]] = tvm.runtime.tensor(arr, device)
        del blob
    missing = [n for n in names if n not in out]
    if missing:
        raise MismatchError(f"weights in {model_dir} lack {', '.join(missing[:3])}")
    del records
    return [out[n] for n in names]


@dataclass
class KVCacheConfig:
    max_batch_size: int
    max_total_tokens: int
    prefill_chunk_size: int
    page_size: int = PAGE_SIZE


def resolve_device(name: str, lib_device: str):
    """A TVM device for ``name`` (``auto`` = the device the library was built for)."""
    import tvm

    from ..registry import get_registry

    if name in (None, "", "auto"):
        name = lib_device
    kind, _, index = name.partition(":")
    backend = get_registry().backend(kind)
    if backend.name != lib_device:
        raise MismatchError(f"the model library was compiled for '{lib_device}', not for device '{name}'")
    dev = tvm.device(backend.device_type, int(index or 0))
    if not dev.exist:
        raise DeviceError(f"device '{name}' is not present on this machine")
    return dev


class LoadedModel:
    """Library, weights and config of one model, checked against each other."""

    def __init__(self, model_dir: str | Path, model_lib: str | Path, device: str = "auto"):
        import tvm
        from tvm import relax

        self.chat_config, self.model_dir = read_chat_config(model_dir)
        lib_path = Path(model_lib).expanduser()
        if not lib_path.is_file():
            raise MismatchError(f"model library '{lib_path}' does not exist")
        try:
            lib = tvm.runtime.load_module(str(lib_path))
        except Exception as exc:  # noqa: BLE001
            raise MismatchError(f"cannot load model library '{lib_path}': {str(exc).strip().splitlines()[-1]}") from None
        try:
            self.metadata = json.loads(str(relax.VirtualMachine(lib, tvm.cpu())[METADATA_FUNC]()))
        except Exception:  # noqa: BLE001 - no _metadata function: not ours
            raise MismatchError(f"'{lib_path}' is not a kiln model library (it records no kiln metadata)") from None
        self.lib_path = lib_path
        self.check_config(self.chat_config, self.metadata, lib_path)
        self.device = resolve_device(device, self.metadata["device"])
        self.vm = relax.VirtualMachine(lib, self.device)
        index = read_index(self.model_dir)
        self.check_weights(index, self.metadata, self.model_dir)
        check_params(index, self.metadata["params"], str(self.model_dir))
        self.param_names = [p["name"] for p in self.metadata["params"]]
        self.params = self.lay_out(load_params(self.model_dir, self.param_names, self.device))
        self.param_bytes = sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in self.metadata["params"])
        mc = self.metadata["model_config"]
        self.vocab_size = mc["vocab_size"]
        self.hidden_size = mc["hidden_size"]
        self.context_window_size = mc["context_window_size"]
        self.prefill_chunk_size = mc["prefill_chunk_size"]
        self.max_batch_size = mc["max_batch_size"]
        self.model_dtype = self.metadata["model_dtype"]
        # libraries compiled before the KV cache had a dtype of its own kept it in the model's
        self.kv_cache_dtype = self.metadata.get("kv_cache_dtype", self.model_dtype)
        self._embed = self.vm["embed"]
        self._prefill = self.vm["batch_prefill"]
        self._decode = self.vm["batch_decode"]
        self._f = {name: tvm.get_global_func(f"vm.builtin.{name}") for name in (
            "kv_state_add_sequence", "kv_state_remove_sequence", "kv_state_fork_sequence", "kv_state_popn",
            "kv_state_begin_forward", "kv_state_end_forward", "reshape",
            "attention_kv_cache_get_num_available_pages", "attention_kv_cache_get_total_sequence_length",
        )}
        self._shape = tvm.runtime.ShapeTuple
        self.kv = None
        self.kv_config: KVCacheConfig | None = None

    def lay_out(self, params: list) -> list:
        """``params`` in the layout the library's kernels read: a backend's compile pipeline may add
        a function ``_param_layout`` (the CPU backend's interleaved weights) that returns the
        packed parameters, some re-laid out (same shapes and dtypes); the files stay as written."""
        if not self.vm.module.implements_function(PARAM_LAYOUT_FUNC):
            return params
        return list(self.vm[PARAM_LAYOUT_FUNC](params))

    @staticmethod
    def check_config(chat_config: dict, metadata: dict, lib_path) -> None:
        """Refuse a library built for another model, quantization or model config."""
        pairs = [("model_type", chat_config.get("model_type"), metadata.get("model_type")),
                 ("quantization", chat_config.get("quantization"), metadata.get("quantization"))]
        mc = chat_config.get("model_config", {})
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
            if key in mc:
                pairs.append((f"model_config.{key}", mc[key], metadata["model_config"].get(key)))
        for field_name, config_value, lib_value in pairs:
            if config_value != lib_value:
                raise MismatchError(
                    f"model library '{lib_path}' was built for {field_name}={lib_value!r} but the model's "
                    f"mlc-chat-config.json has {field_name}={config_value!r}: recompile it with `kiln compile`"
                )

    @staticmethod
    def check_weights(index: dict, metadata: dict, model_dir) -> None:
        """Refuse weights converted for another model type or quantization, naming the field.

        ``tensor-cache.json`` records what ``convert_weight`` converted for; weights without that
        record (converted by MLC-LLM) are left to the per-tensor check.
        """
        recorded = (index.get("metadata") or {}).get("kiln") or {}
        for field_name in ("model_type", "quantization"):
            weights_value, lib_value = recorded.get(field_name), metadata.get(field_name)
            if weights_value is not None and weights_value != lib_value:
                raise MismatchError(
                    f"weights in {model_dir} were converted with {field_name}={weights_value!r} but the library was "
                    f"built for {lib_value!r}: convert them again with `kiln convert_weight --{field_name.replace('_', '-')} "
                    f"{lib_value}`, or use a library built for them"
                )

    # ------------------------------------------------------------------ KV cache
    def create_kv_cache(self, max_batch_size: int, max_total_tokens: int, prefill_chunk_size: int | None = None,
                        page_size: int = PAGE_SIZE):
        chunk = prefill_chunk_size or self.prefill_chunk_size
        s = self._shape
        self.kv = self.vm["create_paged_kv_cache"](
            s([max_batch_size]), s([max_total_tokens]), s([chunk]), s([page_size]), s([0])
        )
        self.kv_config = KVCacheConfig(max_batch_size, max_total_tokens, chunk, page_size)
        return self.kv

    def kv_bytes_per_token(self) -> int:
        mc = self.metadata["model_config"]
        itemsize = np.dtype(self.kv_cache_dtype).itemsize
        return 2 * mc["num_hidden_layers"] * mc["num_key_value_heads"] * mc["head_dim"] * itemsize

    def add_sequence(self, seq_id: int) -> None:
        self._f["kv_state_add_sequence"](self.kv, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self._f["kv_state_remove_sequence"](self.kv, seq_id)

    def fork_sequence(self, parent: int, child: int, fork_pos: int = -1) -> None:
        self._f["kv_state_fork_sequence"](self.kv, parent, child, fork_pos)

    def popn(self, seq_id: int, n: int) -> None:
        self._f["kv_state_popn"](self.kv, seq_id, n)

    def free_pages(self) -> int:
        return int(self._f["attention_kv_cache_get_num_available_pages"](self.kv))

    def total_pages(self) -> int:
        c = self.kv_config
        return -(-c.max_total_tokens // c.page_size)

    # ------------------------------------------------------------------ forward
    def embed(self, tokens: np.ndarray):
        import tvm

        ids = tvm.runtime.tensor(np.ascontiguousarray(tokens, dtype=np.int32), self.device)
        return self._embed(ids, self.params)

    def prefill(self, seq_ids: list[int], token_lists: list[list[int]], all_logits: bool = False) -> np.ndarray:
        """Append ``token_lists[i]`` to sequence ``seq_ids[i]`` in one forward pass.

        Returns the logits of each sequence's last new token (``[len(seq_ids), vocab]``), or,
        with ``all_logits``, of every new token in order (``[sum(lengths), vocab]``).
        """
        import tvm

        lengths = [len(t) for t in token_lists]
        total = sum(lengths)
        tokens = np.concatenate([np.asarray(t, dtype=np.int32) for t in token_lists])
        embeds = self._f["reshape"](self.embed(tokens), self._shape([1, total, self.hidden_size]))
        if all_logits:
            positions = np.arange(total, dtype=np.int32)
        else:
            positions = (np.cumsum(lengths) - 1).astype(np.int32)
        self._f["kv_state_begin_forward"](self.kv, self._shape(seq_ids), self._shape(lengths))
        logits, self.kv = self._prefill(embeds, tvm.runtime.tensor(positions, self.device), self.kv, self.params)
        self._f["kv_state_end_forward"](self.kv)
        return self._host(logits)[0]

    def _host(self, tensor) -> np.ndarray:
        """``tensor`` as a numpy array: on the CPU a view of it (each call's logits are a tensor
        of their own, so the view stays valid; a copy of 8 rows of 49152 logits took 44 us), else
        a copy to the host."""
        if self.device.dlpack_device_type() == 1:  # kDLCPU
            return np.from_dlpack(tensor)
        return tensor.numpy()

    def decode(self, seq_ids: list[int], tokens: list[int]) -> np.ndarray:
        """One token for each sequence; returns ``[len(seq_ids), vocab]`` logits."""
        b = len(seq_ids)
        embeds = self._f["reshape"](self.embed(np.asarray(tokens, dtype=np.int32)), self._shape([b, 1, self.hidden_size]))
        self._f["kv_state_begin_forward"](self.kv, self._shape(seq_ids), self._shape([1] * b))
        logits, self.kv = self._decode(embeds, self.kv, self.params)
        self._f["kv_state_end_forward"](self.kv)
        return self._host(logits)[:, 0, :]
