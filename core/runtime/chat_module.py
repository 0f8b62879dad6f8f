"""``ChatModule``: the seed's Python interface, a multi-turn chat over the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RequestError


@dataclass
class GenerationConfig:
    """Sampling settings for ``ChatModule.generate`` (``None`` keeps the model's default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_gen_len: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def to_request(self) -> dict:
        out = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty",
                                             "presence_penalty", "frequency_penalty", "seed")}
        out["max_tokens"] = self.max_gen_len
        out["stop"] = self.stop or None
        return {k: v for k, v in out.items() if v is not None}


class ChatModule:
    """``ChatModule(model, model_lib_path=None, device="auto")``: chat with a compiled model.

    Other keyword arguments go to :class:`~kiln.Engine` (``max_total_tokens``,
    ``context_window_size``, ``overrides``, ``quantization``, ...).

    The conversation is kept between ``generate`` calls; the engine's prefix cache reuses the
    KV cache of earlier turns, so only the new turn is computed.  An answer is at most
    ``max_gen_len`` tokens (the model's ``mlc-chat-config.json``, as in MLC) unless the generation
    config says otherwise.
    """

    def __init__(self, model: str | Path, model_lib_path: str | Path | None = None, device: str = "auto",
                 generation_config: GenerationConfig | None = None, **engine_options):
        from .engine import Engine

        engine_options.setdefault("max_batch_size", 1)
        engine_options.setdefault("front_end", "chat_module")
        self.engine = Engine(model, model_lib_path, device, **engine_options)
        self.generation_config = generation_config or GenerationConfig()
        self.history: list[dict] = []
        self._last = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    def generate(self, prompt: str | list[dict], generation_config: GenerationConfig | None = None,
                 progress_callback=None, stateless: bool = False) -> str:
        """Answer ``prompt`` (a user message, or a list of chat messages to append) and return
        the reply; ``progress_callback`` streams it (see :mod:`kiln.callback`)."""
        if isinstance(prompt, str):
            new = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            new = list(prompt)
        else:
            raise RequestError("prompt must be a string or a list of chat messages", param="prompt")
        messages = self.history + new
        cfg = (generation_config or self.generation_config).to_request()
        if "max_tokens" not in cfg and self.engine.chat_config.get("max_gen_len"):
            cfg["max_tokens"] = int(self.engine.chat_config["max_gen_len"])  # the model's answer length limit
        interval = getattr(progress_callback, "callback_interval", 1) or 1
        started = time.perf_counter()
        first = None
        reply, tokens, usage = "", 0, None
        for chunk in self.engine.chat.completions.create(messages, stream=True, stream_options={"include_usage": True}, **cfg):
            if chunk.usage is not None:
                usage = chunk.usage
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta.content
            if delta is None:
                continue
            if first is None and chunk.choices[0].delta.role is None:
                first = time.perf_counter()
            if delta:
                reply += delta
                tokens += 1
                if progress_callback is not None and tokens % interval == 0:
                    progress_callback(message=reply)
        done = time.perf_counter()
        if progress_callback is not None:
            progress_callback(message=reply)
            progress_callback(stopped=True)
        if usage is not None:
            first = first or done
            self._last = {
                "prefill_tokens": usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens,
                "prefill_s": first - started,
                "decode_tokens": max(usage.completion_tokens - 1, 0),
                "decode_s": done - first,
            }
        if not stateless:
            self.history = messages + [{"role": "assistant", "content": reply}]
        return reply

    def reset_chat(self) -> None:
        """Forget the conversation (the next ``generate`` starts fresh)."""
        self.history = []

    def stats(self, verbose: bool = False) -> str:
        """Prefill and decode speed of the last ``generate``."""
        s = self._last
        prefill = s["prefill_tokens"] / s["prefill_s"] if s["prefill_s"] > 0 else 0.0
        decode = s["decode_tokens"] / s["decode_s"] if s["decode_s"] > 0 else 0.0
        text = f"prefill: {prefill:.1f} tok/s, decode: {decode:.1f} tok/s"
        if verbose:
            text += (f" (prefill {s['prefill_tokens']} tokens in {s['prefill_s']:.3f} s, "
                     f"decode {s['decode_tokens']} tokens in {s['decode_s']:.3f} s)")
        return text

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
