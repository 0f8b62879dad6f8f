"""ChatModule (the seed's Python interface) and `kiln chat` (interactive and one-shot)."""

import io
import os
import re
import subprocess
import sys

import pytest

from kiln import ChatModule
from kiln.runtime.chat_module import GenerationConfig
from kiln.callback import StreamToStdout
from kiln.errors import CheckpointError, MismatchError
from kiln.runtime.chat_cli import interactive
from kiln.testing import make_hf_checkpoint, write_byte_tokenizer

from test_engine import CONFIG


@pytest.fixture(scope="module")
def built(tmp_path_factory, kiln_build):
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", CONFIG, init_std=0.1)
    write_byte_tokenizer(ckpt)
    return kiln_build(ckpt, "q0f32", conv_template="chatml", context_window_size=256, prefill_chunk_size=32)


@pytest.fixture(scope="module")
def cm(built):
    with ChatModule(model=built.model_dir, model_lib_path=built.lib, device="cpu") as module:
        module.generation_config.temperature = 0
        module.generation_config.max_gen_len = 12
        yield module


def test_generate_streams_to_stdout_and_keeps_history(cm, capsys):
    cm.reset_chat()
    reply = cm.generate(prompt="What is the meaning of life?", progress_callback=StreamToStdout(callback_interval=2))
    out = capsys.readouterr().out
    assert out == reply + "\n"
    assert cm.history == [{"role": "user", "content": "What is the meaning of life?"},
                          {"role": "assistant", "content": reply}]
    cached_before = cm.engine.stats.cached_prompt_tokens
    second = cm.generate("And then?")
    # the second turn reuses the KV cache of the first turn's prompt (at least) instead of
    # recomputing it (the random model's reply bytes need not survive a text round trip)
    first_prompt = cm.engine.tokenizer.encode(cm.engine.conversation.render(cm.history[:1]))
    assert cm.engine.stats.cached_prompt_tokens - cached_before >= len(first_prompt)
    assert len(cm.history) == 4 and cm.history[-1]["content"] == second
    stats = cm.stats()
    assert stats.startswith("prefill: ") and " tok/s, decode: " in stats and stats.endswith(" tok/s")
    cm.reset_chat()
    assert cm.history == [] and cm.generate("What is the meaning of life?") == reply


def test_an_answer_is_at_most_max_gen_len_tokens_unless_asked(built, tmp_path):
    """A chat answer stops at the model's max_gen_len (mlc-chat-config.json), as MLC's does,
    instead of running to the end of the context window when the model never says EOS."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(built.model_dir, model)
    config = json.loads((model / "mlc-chat-config.json").read_text())
    config["max_gen_len"] = 7
    (model / "mlc-chat-config.json").write_text(json.dumps(config))
    with ChatModule(model=model, model_lib_path=built.lib, device="cpu") as module:
        module.generation_config.temperature = 0
        module.generate("Tell me everything.")
        assert module._last["decode_tokens"] + 1 == 7  # completion tokens; the random model never says EOS this soon
        module.generate("More.", generation_config=GenerationConfig(temperature=0, max_gen_len=20))
        assert module._last["decode_tokens"] + 1 == 20


def test_missing_model_and_foreign_library_are_refused(built, tmp_path, kiln_build):
    with pytest.raises(CheckpointError, match="model '.*nowhere' not found: give a kiln model directory"):
        ChatModule(model=tmp_path / "nowhere", model_lib_path=built.lib)
    other = make_hf_checkpoint(tmp_path / "other", {**CONFIG, "num_hidden_layers": 3})
    write_byte_tokenizer(other)
    foreign = kiln_build(other, "q0f32", conv_template="chatml")
    with pytest.raises(MismatchError, match="num_hidden_layers"):
        ChatModule(model=built.model_dir, model_lib_path=foreign.lib)


def test_stats_report_the_speed_of_the_last_answer(cm):
    cm.reset_chat()
    cm.engine.clear_prefix_cache()  # every prompt token is computed, none reused
    before = (cm.engine.stats.prefill_tokens, cm.engine.stats.decode_tokens)
    config = GenerationConfig(temperature=0, max_gen_len=12, stop=["\x00never"])
    cm.generate("Tell me a story.", generation_config=config)
    prefill = cm.engine.stats.prefill_tokens - before[0]
    decode = cm.engine.stats.decode_tokens - before[1]
    assert prefill > 0 and decode > 0
    m = re.fullmatch(r"prefill: ([\d.]+) tok/s, decode: ([\d.]+) tok/s \(prefill (\d+) tokens in ([\d.]+) s, "
                     r"decode (\d+) tokens in ([\d.]+) s\)", cm.stats(verbose=True))
    assert m, cm.stats(verbose=True)
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    # the token counts are the engine's: the prompt's tokens, and every generated token after
    # the first (which the prefill produced)
    assert (int(m.group(3)), int(m.group(5))) == (prefill, decode)
    assert cm.stats() == f"prefill: {m.group(1)} tok/s, decode: {m.group(2)} tok/s"


def test_interactive_commands(cm):
    cm.reset_chat()
    script = ("/help\n/set temperature=0;max_gen_len=5\n/set nonsense=1\nhello\n/stats\n/reset\n/bogus\n/exit\n"
              "after exit\n/bogus-after-exit\n")
    inp, out = io.StringIO(script), io.StringIO()
    interactive(cm, inp=inp, out=out)
    text = out.getvalue()
    assert "/reset" in text and "/stats" in text  # the help
    assert "set temperature=0.0, max_gen_len=5" in text
    assert "error: cannot set 'nonsense=1'" in text
    assert "prefill: " in text and "conversation reset" in text and "unknown command /bogus;" in text
    # /exit left the loop: the lines after it were not read, let alone answered
    assert inp.read() == "after exit\n/bogus-after-exit\n"
    assert "/bogus-after-exit" not in text and "unknown command /exit" not in text
    assert text.endswith(">>> ") and cm.history == []


def kiln_cli(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env={**os.environ, "KILN_NO_PROGRESS": "1", **(env or {})})


def test_kiln_chat_one_shot_prompt_and_stdin(built, cm):
    res = kiln_cli("chat", built.model_dir, "--model-lib", built.lib, "--prompt", "hello", "--temperature", "0",
                   "--max-tokens", "8")
    assert res.returncode == 0, res.stderr
    cm.reset_chat()
    cm.generation_config.max_gen_len = 8
    assert res.stdout == cm.generate("hello") + "\n"
    for words in ("Device: cpu", "Total memory usage:", "Parameters:", "KVCache:", "Temporary buffer:"):
        assert words in res.stderr
    # the hint names options that `kiln chat` has, and only those
    hint = re.search(r"To reduce memory, lower (.*)\.$", res.stderr, re.M).group(1)
    assert hint == "--max-total-tokens or --context-window-size"
    help_ = kiln_cli("chat", "--help", env={"COLUMNS": "250"}).stdout  # wide: no option names cut short
    assert all(re.search(rf"{option}\b", help_) for option in re.findall(r"--[a-z-]+", hint))
    piped = kiln_cli("chat", built.model_dir, "--model-lib", built.lib, "--temperature", "0", "--max-tokens", "8",
                     stdin="hello\n")
    assert piped.returncode == 0 and piped.stdout == res.stdout


def test_kiln_chat_errors(built, tmp_path):
    res = kiln_cli("chat", tmp_path / "nowhere", "--prompt", "hi")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: model '{tmp_path / 'nowhere'}' not found: give a kiln model directory, a Hugging Face checkpoint "
        "directory, a .gguf file, or the name of a packaged model (installed: smollm2)"]
    res = kiln_cli("chat", built.model_dir, "--model-lib", tmp_path / "missing.so", "--prompt", "hi")
    assert res.returncode == 1 and "missing.so' does not exist" in res.stderr
    res = kiln_cli("chat", built.model_dir, "--model-lib", built.lib, "--device", "cuda", "--prompt", "hi")
    assert res.returncode != 0 and "error: " in res.stderr and "Traceback" not in res.stderr
