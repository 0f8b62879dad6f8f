"""Chat messages -> prompt text, through a conversation template.

A :class:`Conversation` renders OpenAI-style messages (``{"role": ..., "content": ...}``) into
the text a model was trained on, either from a registered :class:`kiln.specs.ConvTemplateSpec`
(the MLC names: ``llama-2``, ``chatml``, ...) or from a checkpoint's own Jinja
``chat_template`` (Hugging Face style), and knows the strings and token ids that end a reply.

Jinja templates come with downloaded checkpoints, so they are untrusted code: they run in
Jinja's immutable sandbox, and any attempt to reach Python internals stops the render with an
error instead of executing.

For every built-in template a conversation only ever grows at its end: the rendered prompt of
turn N, followed by the reply and its separator, is the start of the prompt of turn N+1, so the
engine can reuse the KV cache of earlier turns.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from ..errors import ConfigError, RequestError
from ..specs import ConvTemplateSpec
from .tokenizer import as_id_list

JINJA = "jinja"  # conv_template value meaning "chat_config['chat_template'] holds a Jinja template"
PLAIN_TEXT = "LM"  # the template that renders messages as plain text
SYSTEM = "system"

# End-of-turn markers a Jinja template may write; when it does, they also end a reply.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# MLC's placeholders (its conversation templates name the content per role).
_MLC_CONTENT = {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"}


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _fill(template: str, **values: str) -> str:
    """Replace the ``{name}`` placeholders of ``values`` in one pass: inserted text is never
    searched again (content may itself hold ``{role}`` or other braces)."""
    pattern = re.compile("|".join(re.escape("{" + key + "}") for key in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template)


# ---------------------------------------------------------------------------- messages
def _json_type(value) -> str:
    """A value's type as a JSON (OpenAI) client would name it."""
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", tuple: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def normalize_messages(messages: Any, roles: Iterable[str]) -> list[dict]:
    """Check OpenAI-style messages and return copies whose ``content`` is a string.

    ``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts (joined
    with newlines).  A bad message raises :class:`RequestError` whose ``param`` names the field
    (``messages``, ``messages[1].role``, ``messages[0].content``, ...), as OpenAI does.
    """
    allowed = list(dict.fromkeys(roles))

    def bad(message: str, param: str = "messages", code: str = "invalid_value"):
        raise RequestError(message, param=param, code=code)

    if not isinstance(messages, (list, tuple)):
        bad(f"messages must be a list of {{'role': ..., 'content': ...}} objects, got {_json_type(messages)}",
            code="invalid_type")
    if not messages:
        bad("messages must not be empty")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            bad(f"messages[{i}] must be an object with 'role' and 'content', got {_json_type(msg)}",
                f"messages[{i}]", "invalid_type")
        role = msg.get("role")
        if role is None:
            bad(f"'messages[{i}].role' is required", f"messages[{i}].role", "missing_required_parameter")
        if role not in allowed:
            bad(f"messages[{i}] has role {role!r}; expected one of {', '.join(repr(r) for r in allowed)}",
                f"messages[{i}].role")
        content = msg.get("content")
        if content is None:  # absent, or null (which OpenAI allows only beside tool calls)
            bad(f"'messages[{i}].content' is required: every message needs its text as a string",
                f"messages[{i}].content", "missing_required_parameter")
        if isinstance(content, (list, tuple)):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, Mapping) else _json_type(part)
                    bad(f"messages[{i}].content[{j}] must be a {{'type': 'text', 'text': ...}} part "
                        f"(only text is supported), got {kind!r}", f"messages[{i}].content[{j}]")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            bad(f"'messages[{i}].content' must be a string or an array of text parts, got {_json_type(content)}",
                f"messages[{i}].content", "invalid_type")
        out.append({**msg, "role": role, "content": content})
    return out


# ---------------------------------------------------------------------------- MLC template objects
def _get_str(data: Mapping, key: str, default: str) -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigError(f"conv_template.{key} must be a string, got {type(value).__name__}")
    return value


def _get_tuple(data: Mapping, key: str, kind: type) -> tuple:
    value = data.get(key)
    if value is None:
        return ()
    if isinstance(value, kind) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"conv_template.{key} must be a list of {kind.__name__}s, got {value!r}")
    return tuple(value)


def _get_str_map(data: Mapping, key: str) -> dict[str, str]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"conv_template.{key} must map role names to strings, got {value!r}")
    return dict(value)


def spec_from_dict(data: Mapping[str, Any]) -> ConvTemplateSpec:
    """A :class:`ConvTemplateSpec` from a template object stored in ``mlc-chat-config.json``.

    MLC writes ``role_templates`` that hold only the content (``"{user_message}"``) and adds
    the role prefix itself; kiln's hold the whole message (``"{role}{role_content_sep}{content}"``).
    Both are accepted.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"conv_template must be a template name or object, got {type(data).__name__}")
    roles = _get_str_map(data, "roles")
    if not roles:
        raise ConfigError("conv_template.roles must name at least the 'user' and 'assistant' roles")
    for needed in ("user", "assistant"):
        if needed not in roles:
            raise ConfigError(f"conv_template.roles lacks the '{needed}' role")
    role_templates = {}
    for role, template in _get_str_map(data, "role_templates").items():
        if "{content}" in template or "{role}" in template:  # already kiln's form
            role_templates[role] = template
            continue
        content = template.replace("{function_string}", "")
        placeholder = _MLC_CONTENT.get(role, "{" + role + "_message}")
        content = content.replace(placeholder, "{content}") if placeholder in content else content + "{content}"
        role_templates[role] = "{role}{role_content_sep}" + content
    seps = _get_tuple(data, "seps", str) or ("\n",)
    add_role = data.get("add_role_after_system_message", True)
    if not isinstance(add_role, bool):
        raise ConfigError("conv_template.add_role_after_system_message must be true or false")
    return ConvTemplateSpec(
        name=_get_str(data, "name", "custom"),
        system_template=_get_str(data, "system_template", "{system_message}"),
        system_message=_get_str(data, "system_message", ""),
        roles=roles,
        role_templates=role_templates,
        seps=seps,
        role_content_sep=_get_str(data, "role_content_sep", ": "),
        role_empty_sep=_get_str(data, "role_empty_sep", ":"),
        stop_str=_get_tuple(data, "stop_str", str),
        stop_token_ids=_get_tuple(data, "stop_token_ids", int),
        system_prefix_token_ids=_get_tuple(data, "system_prefix_token_ids", int),
        add_role_after_system_message=add_role,
    )


# ---------------------------------------------------------------------------- Jinja
class _TemplateRaised(Exception):
    """``raise_exception(message)`` called by a chat template: the messages are not acceptable."""


def _jinja_environment():
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        """Jinja's immutable sandbox, but reaching an unsafe attribute is an error at once (the
        stock sandbox yields an undefined value that only fails if used)."""

        def unsafe_undefined(self, obj: Any, attribute: str):
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks;
        rendering keeps its body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str = ""):
        raise _TemplateRaised(str(message))

    def tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        # Unlike Jinja's own filter: no HTML escaping, non-ASCII kept (what chat templates expect).
        return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _compile_jinja(chat_template: Any):
    """Compile a chat template in the sandbox; a syntax error is a one-line :class:`ConfigError`."""
    from jinja2 import TemplateSyntaxError

    if not isinstance(chat_template, str) or not chat_template.strip():
        raise ConfigError("chat_template is empty: set conv_template to a template name (e.g. chatml) instead")
    try:
        return _jinja_environment().from_string(chat_template)
    except TemplateSyntaxError as exc:
        reason = _one_line(exc.message or exc)
        raise ConfigError(f"chat_template is not valid Jinja: {reason} (line {exc.lineno})") from None


def derive_jinja_stops(chat_template: str, eos_token: str = "") -> tuple[str, ...]:
    """Stop strings for a Jinja template: its eos token and the end-of-turn markers it writes."""
    stops = [eos_token] if eos_token else []
    stops += [m for m in END_OF_TURN_MARKERS if m in chat_template]
    return tuple(dict.fromkeys(stops))


# ---------------------------------------------------------------------------- the conversation
class Conversation:
    """Renders chats for one model.

    Build it with ``Conversation(spec)`` from a :class:`ConvTemplateSpec`, with
    ``Conversation(chat_template=...)`` (or :meth:`from_jinja`) from a Jinja ``chat_template``,
    or with :meth:`from_chat_config` from ``mlc-chat-config.json``.  ``stop_str`` and
    ``stop_token_ids`` override the template's own.

    Attributes:
        name: the template's name (``"jinja"`` for a Jinja template).
        spec: the :class:`ConvTemplateSpec`, or ``None`` for a Jinja template.
        chat_template: the Jinja source, or ``None``.
        stop_str: strings that end a reply.
        stop_token_ids: token ids that end a reply.
        system_prefix_token_ids: ids to put before the rendered prompt's tokens (BOS); empty
            for Jinja templates, which write the BOS text themselves.
        roles: the message roles the template accepts.
        bos_token, eos_token: the token texts a Jinja template sees.
    """

    def __init__(
        self,
        spec: ConvTemplateSpec | None = None,
        *,
        chat_template: str | None = None,
        bos_token: str = "",
        eos_token: str = "",
        stop_str: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ):
        if (spec is None) == (chat_template is None):
            raise TypeError("Conversation takes exactly one of a ConvTemplateSpec and a chat_template")
        self.spec = spec
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        if spec is not None:
            missing = [role for role in ("user", "assistant") if role not in spec.roles]
            if missing:
                raise ConfigError(f"conversation template '{spec.name}' has no '{missing[0]}' role")
            self.name = spec.name
            self.roles: tuple[str, ...] = tuple(dict.fromkeys((SYSTEM, *spec.roles)))
            self.system_prefix_token_ids: tuple[int, ...] = tuple(spec.system_prefix_token_ids)
            self._template = None
            default_stops, default_ids = spec.stop_str, spec.stop_token_ids
        else:
            self.name = JINJA
            self.roles = (SYSTEM, "user", "assistant")
            self.system_prefix_token_ids = ()
            self._template = _compile_jinja(chat_template)
            default_stops, default_ids = derive_jinja_stops(chat_template, eos_token), ()
        self.stop_str: tuple[str, ...] = tuple(default_stops if stop_str is None else stop_str)
        ids = default_ids if stop_token_ids is None else stop_token_ids
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in ids))

    @classmethod
    def from_jinja(
        cls,
        chat_template: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        stop_str: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> "Conversation":
        """A conversation rendered by a Hugging Face style Jinja ``chat_template``.

        The template sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
        ``raise_exception(message)`` and ``strftime_now(format)``.  ``stop_str`` defaults to
        :func:`derive_jinja_stops`.
        """
        return cls(chat_template=chat_template, bos_token=bos_token, eos_token=eos_token, stop_str=stop_str,
                   stop_token_ids=stop_token_ids)

    @classmethod
    def from_chat_config(cls, chat_config: Mapping[str, Any], registry=None, tokenizer=None) -> "Conversation":
        """The conversation ``mlc-chat-config.json`` asks for.

        ``conv_template`` is a registered template name, ``"jinja"`` (then ``chat_template``
        holds the Jinja text), or a whole template object as MLC writes it.  Given the model's
        :class:`kiln.runtime.tokenizer.Tokenizer`, the BOS/EOS token texts that Jinja templates
        use are known, and stop strings that are single tokens are added to ``stop_token_ids``.
        """
        conv = chat_config.get("conv_template")
        if conv is None:
            raise ConfigError(
                "the chat config has no conv_template: re-run `kiln gen_config` with --conv-template NAME (or jinja)"
            )
        if conv == JINJA:
            eos_ids = as_id_list(chat_config.get("eos_token_id"))
            bos = chat_config.get("bos_token") if isinstance(chat_config.get("bos_token"), str) else None
            eos = chat_config.get("eos_token") if isinstance(chat_config.get("eos_token"), str) else None
            if tokenizer is not None:
                if bos is None and tokenizer.bos_token_id is not None:
                    bos = tokenizer.id_to_token(tokenizer.bos_token_id)
                eos_ids = list(dict.fromkeys(eos_ids + list(tokenizer.eos_token_ids)))
                if eos is None and eos_ids:
                    eos = tokenizer.id_to_token(eos_ids[0])
            template = chat_config.get("chat_template")
            if not isinstance(template, str) or not template.strip():
                raise ConfigError(
                    "conv_template is 'jinja' but the chat config has no chat_template: re-run `kiln gen_config` "
                    "on a checkpoint whose tokenizer_config.json has one, or choose a template with --conv-template"
                )
            self = cls.from_jinja(template, bos_token=bos or "", eos_token=eos or "", stop_token_ids=eos_ids)
        elif isinstance(conv, str):
            if registry is None:
                from ..registry import get_registry

                registry = get_registry()
            self = cls(registry.conv_template(conv))
        else:
            self = cls(spec_from_dict(conv))
        if tokenizer is not None:
            single = [tokenizer.token_to_id(s) for s in self.stop_str]
            self.stop_token_ids = tuple(dict.fromkeys([*self.stop_token_ids, *(i for i in single if i is not None)]))
        return self

    # ------------------------------------------------------------------ rendering
    @property
    def plain_text(self) -> bool:
        """Whether this is the ``LM`` template: messages are plain text, no chat markup."""
        return self.spec is not None and self.spec.name == PLAIN_TEXT

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (OpenAI style), ending with the cue for the
        assistant's reply when ``add_generation_prompt``.

        A ``system`` message (first only, for registered templates) replaces the template's
        default system message.  Invalid messages raise :class:`RequestError`.
        """
        msgs = normalize_messages(messages, self.roles)
        if self.spec is None:
            return self._render_jinja(msgs, add_generation_prompt)
        return self._render_spec(self.spec, msgs, add_generation_prompt)

    @staticmethod
    def _render_spec(spec: ConvTemplateSpec, msgs: list[dict], add_generation_prompt: bool) -> str:
        system_message = spec.system_message
        first = 0
        if msgs[0]["role"] == SYSTEM:
            system_message = msgs[0]["content"]
            first = 1
        for i, msg in enumerate(msgs[first:], start=first):
            if msg["role"] == SYSTEM:
                raise RequestError(
                    f"messages[{i}] is a system message; the '{spec.name}' template takes one, as the first message",
                    param="messages", code="invalid_value",
                )
        msgs = msgs[first:]
        # no system message, no system block (as Hugging Face templates do)
        system_text = _fill(spec.system_template, system_message=system_message) if system_message else ""
        parts = [system_text]
        seps = spec.seps or ("",)
        for i, msg in enumerate(msgs):
            role = msg["role"]
            template = spec.role_templates.get(role, "{role}{role_content_sep}{content}")
            drop_role = i == 0 and system_text != "" and not spec.add_role_after_system_message
            parts.append(_fill(
                template,
                role="" if drop_role else spec.roles[role],
                role_content_sep="" if drop_role else spec.role_content_sep,
                content=msg["content"],
            ))
            parts.append(seps[(1 if role == "assistant" else 0) % len(seps)])  # user turns 0, assistant 1
        if add_generation_prompt:
            parts.append(spec.roles["assistant"] + spec.role_empty_sep)
        return "".join(parts)

    def _render_jinja(self, msgs: list[dict], add_generation_prompt: bool) -> str:
        from jinja2.exceptions import SecurityError, TemplateError

        try:
            return self._template.render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except _TemplateRaised as exc:
            raise RequestError(f"the model's chat template rejected the messages: {_one_line(exc)}",
                               param="messages", code="invalid_value") from None
        except SecurityError as exc:
            raise ConfigError(f"chat_template tried an unsafe operation and was stopped: {_one_line(exc)}") from None
        except TemplateError as exc:
            raise ConfigError(f"chat_template failed to render: {_one_line(exc.message or exc)}") from None
        except Exception as exc:  # noqa: BLE001 - a template bug must not surface as a traceback
            raise ConfigError(f"chat_template failed to render: {type(exc).__name__}: {_one_line(exc)}") from None

    def __repr__(self) -> str:
        return f"Conversation({self.name!r}, stop_str={self.stop_str}, stop_token_ids={self.stop_token_ids})"


__all__ = ["Conversation", "normalize_messages", "spec_from_dict", "derive_jinja_stops", "JINJA"]
