"""OpenAI-shaped response objects: attributes like the ``openai`` package's, ``to_dict()`` for JSON.

Fields follow OpenAI's chat completion, completion and their streaming chunk objects, so code
written against OpenAI's client reads kiln's answers unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class _Obj:
    def to_dict(self) -> dict:
        return _to_dict(self)

    model_dump = to_dict  # the openai/pydantic spelling

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def __getitem__(self, key: str):  # dict-style access, as some clients use
        return getattr(self, key)


def _to_dict(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_dict(v) for k, v in value.items()}
    return value


@dataclass
class TopLogprob(_Obj):
    token: str
    logprob: float
    bytes: list[int] | None = None


@dataclass
class TokenLogprob(_Obj):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass
class ChoiceLogprobs(_Obj):
    content: list[TokenLogprob] = field(default_factory=list)


@dataclass
class PromptTokensDetails(_Obj):
    cached_tokens: int = 0


@dataclass
class Usage(_Obj):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = field(default_factory=PromptTokensDetails)


@dataclass
class ChatMessage(_Obj):
    role: str
    content: str | None


@dataclass
class ChatChoice(_Obj):
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


@dataclass
class ChatCompletion(_Obj):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


@dataclass
class Delta(_Obj):
    role: str | None = None
    content: str | None = None


@dataclass
class ChatChunkChoice(_Obj):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


@dataclass
class ChatCompletionChunk(_Obj):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None


@dataclass
class CompletionLogprobs(_Obj):
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)


@dataclass
class CompletionChoice(_Obj):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


@dataclass
class Completion(_Obj):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"
    system_fingerprint: str | None = None


def as_plain(value: Any):
    """Objects from this module (or anything else) as JSON-ready data."""
    return value.to_dict() if isinstance(value, _Obj) else value
