"""Conversation templates (kiln.runtime.conversation): built-in templates, Jinja chat templates
(checked against transformers' apply_chat_template), MLC template objects, the multi-turn
prefix property, request validation and the Jinja sandbox."""

from datetime import datetime
from pathlib import Path

import pytest

from kiln.errors import ConfigError, RequestError, UnknownNameError
from kiln.runtime.conv_templates import TEMPLATES
from kiln.runtime.conversation import Conversation, spec_from_dict
from kiln.testing import smollm2_gguf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]

# The prompt each built-in template gives CHAT (with the cue for the assistant's reply),
# composed by hand from the template's fields as ConvTemplateSpec's docstring describes.
EXPECTED = {
    "llama-2": "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! [INST] 2+2? [/INST] ",
    "llama-3": (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "vicuna_v1.1": "You are terse. USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT:",
    "wizardlm": "You are terse. USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT:",
    "wizardlm_7b": "You are terse.\n\nHi\n\n### Response:Hello!</s>2+2?\n\n### Response:",
    "redpajama_chat": "You are terse.\n<human>: Hi\n<bot>: Hello!\n<human>: 2+2?\n<bot>:",
    "dolly": (
        "You are terse.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### End\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n"
    ),
    "moss": "You are terse.\n<|Human|>: Hi<eoh>\n<|MOSS|>: Hello!<eom>\n<|Human|>: 2+2?<eoh>\n<|MOSS|>:",
    "rwkv": "You are terse.\n\nBob: Hi\n\nAlice: Hello!\n\nBob: 2+2?\n\nAlice:",
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "mistral_default": "[INST] You are terse.\n\nHi [/INST] Hello!</s>[INST] 2+2? [/INST]",
    "LM": "HiHello!2+2?",
}
BUILTIN = {t.name: t for t in TEMPLATES}

# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def smollm2_chat_template() -> str:
    """SmolLM2's chat template, as the GGUF file stores it (metadata ``tokenizer.chat_template``)."""
    import gguf
    reader = gguf.GGUFReader(str(smollm2_gguf()))
    return reader.fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="module")
def hf_tokenizer():
    import transformers
    path = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm2_tokenizer(hf_tokenizer, tmp_path_factory):
    from kiln.runtime.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    hf_tokenizer.save_pretrained(str(out))
    return Tokenizer.from_model_dir(out, {"bos_token_id": 1, "eos_token_id": 2})


# ------------------------------------------------------------------------------------ built-in templates
def test_every_builtin_template_has_an_expected_prompt():
    assert set(EXPECTED) == set(BUILTIN)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_template_renders_a_two_turn_chat(name):
    conv = Conversation(BUILTIN[name])
    assert conv.render(CHAT) == EXPECTED[name]
    assert conv.stop_str == tuple(BUILTIN[name].stop_str)
    assert conv.stop_token_ids == tuple(BUILTIN[name].stop_token_ids)
    assert conv.system_prefix_token_ids == tuple(BUILTIN[name].system_prefix_token_ids)


def test_default_system_message_is_used_without_a_system_message():
    chatml = Conversation(BUILTIN["chatml"])
    assert chatml.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
        "helpful and honest answers.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    llama2 = Conversation(BUILTIN["llama-2"])
    assert llama2.render([{"role": "user", "content": "Hi"}]) == (
        "[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\nHi [/INST] "
    )
    assert llama2.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                         add_generation_prompt=False) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi "


def test_template_without_assistant_role_is_refused():
    from kiln.specs import ConvTemplateSpec

    with pytest.raises(ConfigError, match="template 'half' has no 'assistant' role"):
        Conversation(ConvTemplateSpec(name="half", roles={"user": "U"}))
    with pytest.raises(TypeError):
        Conversation()


def test_lm_template_is_plain_text():
    conv = Conversation(BUILTIN["LM"])
    assert conv.plain_text and not Conversation(BUILTIN["chatml"]).plain_text
    assert conv.render([{"role": "user", "content": "Once upon a time"}]) == "Once upon a time"


def test_content_is_inserted_literally():
    conv = Conversation(BUILTIN["chatml"])
    tricky = "{role} {content} {system_message} {{x}} }{"
    assert conv.render([{"role": "user", "content": tricky}], add_generation_prompt=False).endswith(
        f"<|im_start|>user\n{tricky}<|im_end|>\n")


def test_text_parts_are_joined():
    conv = Conversation(BUILTIN["chatml"])
    parts = [{"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]}]
    assert conv.render(parts) == conv.render([{"role": "user", "content": "line one\nline two"}])


# ------------------------------------------------------------------------------------ prefix property
TURNS = [("Hi", "Hello! How can I help?"), ("What is 2+2?", "4."), ("Thanks", "You're welcome.")]


def check_prefix_property(conv: Conversation, system: bool):
    history = [{"role": "system", "content": "Be kind."}] if system else []
    for user, reply in TURNS:
        history.append({"role": "user", "content": user})
        prompt = conv.render(history)
        history.append({"role": "assistant", "content": reply})
        turn = conv.render(history, add_generation_prompt=False)  # prompt + reply + separator
        assert turn.startswith(prompt), (prompt, turn)
        assert reply in turn[len(prompt):]
        next_prompt = conv.render(history + [{"role": "user", "content": "next"}])
        assert next_prompt.startswith(turn), (turn, next_prompt)


@pytest.mark.parametrize("name", sorted(BUILTIN))
@pytest.mark.parametrize("system", [True, False])
def test_each_turn_extends_the_previous_one(name, system):
    """The prompt of turn N, the reply and its separator are the start of turn N+1's prompt, so
    the engine reuses the KV cache of earlier turns."""
    check_prefix_property(Conversation(BUILTIN[name]), system)


def test_jinja_turns_extend_too(smollm2_chat_template):
    for system in (True, False):
        check_prefix_property(Conversation.from_jinja(smollm2_chat_template), system)


# ------------------------------------------------------------------------------------ Jinja
MESSAGE_LISTS = [
    [{"role": "user", "content": "Hi"}],
    CHAT,
    CHAT[1:],
    [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Bonjour 👋 — ça va?"}],
    [{"role": "user", "content": "def f():\n    return 1\n"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": "sure"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(MESSAGE_LISTS)))
def test_smollm2_template_matches_transformers(smollm2_chat_template, hf_tokenizer, index, add_generation_prompt):
    messages = MESSAGE_LISTS[index]
    conv = Conversation.from_jinja(smollm2_chat_template, bos_token=hf_tokenizer.bos_token,
                                   eos_token=hf_tokenizer.eos_token)
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert conv.render(messages, add_generation_prompt=add_generation_prompt) == expected


# A template of our own that leans on what Hugging Face templates use: whitespace control with
# trim_blocks/lstrip_blocks, namespace, loop controls, tojson, raise_exception, bos/eos tokens.
FEATURE_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system='', count=0) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] %}
{%- endif %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if ns.count > 20 %}{% break %}{% endif %}
[{{ loop.index0 }}|{{ message.role | upper }}]
    {%- if ns.system and ns.count == 1 %} {{ {'system': ns.system, 'x': '<&>é'} | tojson }}{% endif %}

    {{ message['content'] | trim }}
    {% if message.role == 'assistant' %}{{ eos_token }}{% endif %}

{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}"""


@pytest.mark.parametrize("index", range(len(MESSAGE_LISTS)))
def test_jinja_features_match_transformers(hf_tokenizer, index):
    messages = MESSAGE_LISTS[index]
    conv = Conversation.from_jinja(FEATURE_TEMPLATE, bos_token="<s>", eos_token="</s>")
    for add in (True, False):
        expected = hf_tokenizer.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, tokenize=False,
                                                    add_generation_prompt=add, bos_token="<s>", eos_token="</s>")
        assert conv.render(messages, add_generation_prompt=add) == expected


def test_jinja_globals():
    conv = Conversation.from_jinja("{{ strftime_now('%Y') }}|{{ bos_token }}|{{ eos_token }}|"
                                   "{% generation %}{{ messages[0].content }}{% endgeneration %}",
                                   bos_token="<s>", eos_token="</s>")
    assert conv.render([{"role": "user", "content": "x"}]) == f"{datetime.now().year}|<s>|</s>|x"


def test_jinja_stops_are_derived():
    smol_like = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    conv = Conversation.from_jinja(smol_like, eos_token="<|endoftext|>", stop_token_ids=[2, 2, 0])
    assert conv.stop_str == ("<|endoftext|>", "<|im_end|>")
    assert conv.stop_token_ids == (2, 0)
    assert conv.system_prefix_token_ids == ()
    llama3_like = "{{ bos_token }}{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}"
    assert Conversation.from_jinja(llama3_like).stop_str == ("<|eot_id|>",)


def test_template_raise_exception_is_a_request_error():
    conv = Conversation.from_jinja(FEATURE_TEMPLATE)
    rejecting = Conversation.from_jinja("{{ raise_exception('Unknown role: tool') }}")
    with pytest.raises(RequestError, match="Unknown role: tool") as err:
        rejecting.render([{"role": "user", "content": "x"}])
    assert err.value.param == "messages"
    assert conv.render([{"role": "user", "content": "x"}])  # the same template renders good messages


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ ''.__class__ }}",  # the stock sandbox would print nothing; kiln stops at once
    "{{ cycler.__init__.__globals__['os'] }}",
    "{{ raise_exception.__globals__ }}",
    "{% set x = messages.append({'role': 'user', 'content': 'injected'}) %}",
    "{{ messages[0].update({'content': 'changed'}) }}",
])
def test_unsafe_template_is_stopped(source):
    conv = Conversation.from_jinja(source)
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ConfigError, match="unsafe") as err:
        conv.render(messages)
    assert "\n" not in str(err.value)
    assert messages == [{"role": "user", "content": "x"}]


def test_invalid_jinja_is_a_config_error():
    with pytest.raises(ConfigError, match=r"not valid Jinja: .*\(line 1\)"):
        Conversation.from_jinja("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ConfigError, match="empty"):
        Conversation.from_jinja("  ")
    with pytest.raises(ConfigError, match="failed to render"):
        Conversation.from_jinja("{{ messages[0].content + 1 }}").render([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------------------------ bad requests
@pytest.mark.parametrize("messages, fragment, param", [
    ("hello", "must be a list", "messages"),
    ([], "must not be empty", "messages"),
    (["hello"], r"messages\[0\] must be an object with 'role' and 'content', got string", "messages[0]"),
    ([{"content": "x"}], r"'messages\[0\]\.role' is required", "messages[0].role"),
    ([{"role": "bot", "content": "x"}], r"role 'bot'; expected one of 'system', 'user', 'assistant'",
     "messages[0].role"),
    # a missing or null content names the field, not Python's "NoneType"
    ([{"role": "user", "content": None}], r"^'messages\[0\]\.content' is required", "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], r"^'messages\[1\]\.content' is required",
     "messages[1].content"),
    ([{"role": "user", "content": 42}], r"'messages\[0\]\.content' must be a string or an array of text parts, "
                                        r"got integer$", "messages[0].content"),
    ([{"role": "user", "content": {"text": "x"}}], r"content' must be a string .*got object$", "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text is supported",
     "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], r"content\[0\] must be", "messages[0].content[0]"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], r"messages\[1\] is a system message",
     "messages"),
])
def test_bad_messages_are_request_errors(messages, fragment, param):
    with pytest.raises(RequestError, match=fragment) as err:
        Conversation(BUILTIN["chatml"]).render(messages)
    assert err.value.param == param
    assert "NoneType" not in str(err.value)


def test_jinja_checks_messages_too(smollm2_chat_template):
    with pytest.raises(RequestError, match="role 'tool'") as err:
        Conversation.from_jinja(smollm2_chat_template).render([{"role": "tool", "content": "x"}])
    assert err.value.param == "messages[0].role"


# ------------------------------------------------------------------------------------ from_chat_config
def test_from_chat_config_by_name():
    conv = Conversation.from_chat_config({"conv_template": "llama-3"})
    assert conv.name == "llama-3" and conv.render(CHAT) == EXPECTED["llama-3"]
    with pytest.raises(UnknownNameError, match="chatm"):
        Conversation.from_chat_config({"conv_template": "chatm"})


def test_from_chat_config_jinja(smollm2_chat_template, smollm2_tokenizer, hf_tokenizer):
    cfg = {"conv_template": "jinja", "chat_template": smollm2_chat_template, "bos_token_id": 1, "eos_token_id": 2}
    conv = Conversation.from_chat_config(cfg)
    assert conv.name == "jinja" and conv.stop_str == ("<|im_end|>",) and conv.stop_token_ids == (2,)
    assert conv.render(CHAT) == hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    with_tok = Conversation.from_chat_config(cfg, tokenizer=smollm2_tokenizer)
    assert with_tok.bos_token == "<|im_start|>" and with_tok.eos_token == "<|im_end|>"
    assert with_tok.stop_token_ids == (2,)


def test_from_chat_config_with_tokenizer_adds_single_token_stops(smollm2_tokenizer):
    conv = Conversation.from_chat_config({"conv_template": "chatml"}, tokenizer=smollm2_tokenizer)
    assert conv.stop_str == ("<|im_end|>",) and conv.stop_token_ids == (2,)


def test_from_chat_config_errors():
    with pytest.raises(ConfigError, match="no conv_template"):
        Conversation.from_chat_config({})
    with pytest.raises(ConfigError, match="no chat_template"):
        Conversation.from_chat_config({"conv_template": "jinja", "chat_template": None})
    with pytest.raises(ConfigError, match="conv_template.seps must be a list of strs"):
        Conversation.from_chat_config({"conv_template": {"roles": {"user": "U", "assistant": "A"}, "seps": [1]}})
    with pytest.raises(ConfigError, match="lacks the 'assistant' role"):
        Conversation.from_chat_config({"conv_template": {"roles": {"user": "U"}}})
    with pytest.raises(ConfigError, match="template name or object"):
        Conversation.from_chat_config({"conv_template": 3})


# The llama-2 template object as MLC-LLM writes it into mlc-chat-config.json.
MLC_LLAMA2 = {
    "name": "llama-2",
    "system_template": "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
    "system_message": "You are a helpful, respectful and honest assistant.",
    "system_prefix_token_ids": [1],
    "add_role_after_system_message": False,
    "roles": {"user": "[INST]", "assistant": "[/INST]", "tool": "[INST]"},
    "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"},
    "messages": [],
    "seps": [" "],
    "role_content_sep": " ",
    "role_empty_sep": " ",
    "stop_str": ["[INST]"],
    "stop_token_ids": [2],
    "function_string": "",
    "use_function_calling": False,
}


def test_from_chat_config_mlc_template_object():
    conv = Conversation.from_chat_config({"conv_template": MLC_LLAMA2})
    assert conv.render(CHAT) == EXPECTED["llama-2"]
    assert conv.stop_str == ("[INST]",) and conv.stop_token_ids == (2,) and conv.system_prefix_token_ids == (1,)
    assert "tool" in conv.roles
    check_prefix_property(conv, system=True)


def test_mlc_role_templates_wrap_the_content():
    data = dict(MLC_LLAMA2, role_templates={"user": "<<{user_message}>>"}, add_role_after_system_message=True)
    spec = spec_from_dict(data)
    assert spec.role_templates["user"] == "{role}{role_content_sep}<<{content}>>"
    assert Conversation(spec).render(CHAT[:2]).endswith("[INST] <<Hi>> [/INST] ")


def test_kiln_style_template_object():
    data = {"name": "mine", "system_template": "", "roles": {"user": "Q", "assistant": "A"},
            "role_templates": {"user": "{role}> {content}"}, "seps": ["\n"], "role_content_sep": ": ",
            "role_empty_sep": ":", "stop_str": "Q>"}
    conv = Conversation.from_chat_config({"conv_template": data})
    assert conv.render(CHAT[1:]) == "Q> Hi\nA: Hello!\nQ> 2+2?\nA:"
    assert conv.stop_str == ("Q>",)
