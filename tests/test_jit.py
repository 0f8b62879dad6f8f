"""Model references and the compile cache: build once, reuse, rebuild what is damaged, one
builder at a time, `kiln cache`, and the README's main command on SmolLM2."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from kiln.errors import CheckpointError
from kiln.pipeline.jit import MANIFEST, prepare
from kiln.testing import make_hf_checkpoint, write_byte_tokenizer

from test_engine import CONFIG


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "kiln-home"
    monkeypatch.setenv("KILN_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("jit") / "tiny-llama", CONFIG, init_std=0.1)
    write_byte_tokenizer(path)
    return path


def test_a_checkpoint_is_built_once_and_reused(home, checkpoint):
    from kiln import Engine

    first = prepare(checkpoint, quantization="q4f32_2")
    assert first.built and first.lib.is_file() and first.model_dir.parent == home / "models"
    assert first.name == "tiny-llama" and first.model_dir.name.startswith("tiny-llama-q4f32_2-")
    stamp = (first.lib.stat().st_mtime_ns, (first.model_dir / MANIFEST).read_text())
    second = prepare(checkpoint, quantization="q4f32_2")
    assert not second.built and second.lib == first.lib
    assert (second.lib.stat().st_mtime_ns, (second.model_dir / MANIFEST).read_text()) == stamp
    # another quantization is another entry; the engine takes the checkpoint directly
    with Engine(checkpoint, quantization="q0f32", max_batch_size=1) as engine:
        out = engine.completions.create(prompt=[1, 2, 3], max_tokens=3, temperature=0, ignore_eos=True)
        assert out.usage.completion_tokens == 3 and engine.model_name == "tiny-llama"
    assert len(list((home / "models").iterdir())) == 2


def flip_a_byte(path, at=100):
    """Damage a file without changing its size."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["corrupt shard", "corrupt tokenizer", "corrupt config", "truncated library",
                                    "no manifest", "manifest of other inputs"])
def test_a_damaged_entry_is_rebuilt_not_loaded(home, checkpoint, damage, caplog):
    entry = prepare(checkpoint, quantization="q0f32")
    shard = entry.model_dir / "params_shard_0.bin"
    if damage == "corrupt shard":
        flip_a_byte(shard)
    elif damage == "corrupt tokenizer":
        flip_a_byte(entry.model_dir / "tokenizer.json", at=len((entry.model_dir / "tokenizer.json").read_bytes()) // 2)
    elif damage == "corrupt config":
        flip_a_byte(entry.model_dir / "mlc-chat-config.json", at=50)
    elif damage == "truncated library":
        entry.lib.write_bytes(entry.lib.read_bytes()[:1000])
    elif damage == "no manifest":  # a build that was interrupted before it finished
        (entry.model_dir / MANIFEST).unlink()
    else:
        manifest = json.loads((entry.model_dir / MANIFEST).read_text())
        manifest["key"]["kiln"] = "0.0.0"
        (entry.model_dir / MANIFEST).write_text(json.dumps(manifest))
    again = prepare(checkpoint, quantization="q0f32")
    assert again.built and again.model_dir == entry.model_dir
    assert "rebuilding it" in caplog.text
    if damage.startswith("corrupt") and damage != "corrupt shard":
        assert f"{'tokenizer.json' if 'tokenizer' in damage else 'mlc-chat-config.json'} fails its md5 check" \
            in caplog.text
    assert not prepare(checkpoint, quantization="q0f32").built  # and now it is whole


def test_size_overrides_are_part_of_the_cache_key(home, checkpoint):
    """Two different overrides give two entries, the same overrides (spelt either way) one,
    and the sizes reach the library and the engine."""
    from kiln import Engine

    small = prepare(checkpoint, quantization="q0f32", overrides="context_window_size=128;prefill_chunk_size=16")
    same = prepare(checkpoint, quantization="q0f32", overrides={"prefill_chunk_size": 16, "context_window_size": 128})
    other = prepare(checkpoint, quantization="q0f32", overrides="context_window_size=64")
    plain = prepare(checkpoint, quantization="q0f32")
    assert small.built and not same.built and same.model_dir == small.model_dir
    assert other.built and plain.built
    assert len({small.model_dir, other.model_dir, plain.model_dir}) == 3
    assert sorted(p.name for p in (home / "models").iterdir()) == sorted(
        p.model_dir.name for p in (small, other, plain))
    manifest = json.loads((small.model_dir / MANIFEST).read_text())
    assert manifest["key"]["overrides"] == {"context_window_size": 128, "prefill_chunk_size": 16}
    assert "overrides" not in json.loads((plain.model_dir / MANIFEST).read_text())["key"]
    config = json.loads((small.model_dir / "mlc-chat-config.json").read_text())
    assert (config["context_window_size"], config["prefill_chunk_size"]) == (128, 16)
    with Engine(checkpoint, quantization="q0f32", overrides="context_window_size=128;prefill_chunk_size=16",
                max_batch_size=1) as engine:
        assert engine.model.lib_path == small.lib
        assert (engine.context_window_size, engine.prefill_chunk_size) == (128, 16)
        assert (engine.model.context_window_size, engine.model.prefill_chunk_size) == (128, 16)
    assert len(list((home / "models").iterdir())) == 3  # the engine reused the entry


def test_a_change_in_kiln_or_plugin_code_gets_a_new_entry(home, checkpoint, monkeypatch):
    """Libraries built by other code (a kiln upgrade, an edited editable install, new kernels in
    a backend plugin) are never reused: the key holds a digest of the source of kiln and of the
    loaded plugins."""
    import kiln.pipeline.jit as jit
    from kiln.registry import get_registry

    digest = jit.code_fingerprint(get_registry())
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    first = prepare(checkpoint, quantization="q0f32")
    assert json.loads((first.model_dir / MANIFEST).read_text())["key"]["code"] == digest
    monkeypatch.setattr(jit, "_code_digest", "0" * 16)  # as if a plugin's kernels had changed
    changed = prepare(checkpoint, quantization="q0f32")
    assert changed.built and changed.model_dir != first.model_dir
    # the old entry is left alone (another install sharing the cache may use it), marked stale
    assert {e["path"]: e["stale"] for e in jit.list_entries()} == {str(first.model_dir): True,
                                                                  str(changed.model_dir): False}
    assert jit.clear(stale=True) == 1
    assert [p.name for p in (home / "models").iterdir()] == [changed.model_dir.name]


def test_editing_the_runtime_does_not_invalidate_the_cache():
    """Only the code that converts and compiles is in the key: the server, the engine, the CLI
    change nothing a cached library holds."""
    import kiln.pipeline.jit as jit

    assert "runtime" not in jit._BUILD_CODE and "cli.py" not in jit._BUILD_CODE
    assert {"pipeline", "quantization", "sources", "modeling.py"} <= set(jit._BUILD_CODE)


def test_a_build_killed_halfway_leaves_nothing_the_next_build_keeps(home, checkpoint):
    """A process killed while building (SIGKILL: no cleanup runs) leaves its staging directory;
    the next build of that entry removes it, and never loads it."""
    code = textwrap.dedent(f"""
        import os, signal
        import kiln.pipeline.compile as compile
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        compile.compile_model = killed
        from kiln.pipeline.jit import prepare
        prepare({str(checkpoint)!r}, quantization="q0f32")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "KILN_HOME": str(home)})
    assert res.returncode == -9
    left = [p for p in (home / "models").iterdir() if ".partial-" in p.name]
    assert len(left) == 1 and (left[0] / "tensor-cache.json").is_file()  # converted, never compiled
    built = prepare(checkpoint, quantization="q0f32")
    assert built.built
    assert [p.name for p in (home / "models").iterdir()] == [built.model_dir.name]


def test_a_model_directory_with_a_non_utf8_config_is_a_one_line_error(home, kiln_build, checkpoint, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(kiln_build(checkpoint).model_dir, model)
    (model / "mlc-chat-config.json").write_bytes(b'{"model_type": "ll\xffama"}')
    res = subprocess.run([sys.executable, "-m", "kiln.cli", "chat", str(model), "--prompt", "hi"],
                         capture_output=True, text=True, env={**os.environ, "KILN_HOME": str(home)})
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "it is not UTF-8 text" in res.stderr and "internal error" not in res.stderr


@pytest.mark.parametrize("overrides,error", [
    ("num_hidden_layers=1", "cannot override 'num_hidden_layers'; the sizes that can be overridden: "
                            "context_window_size, prefill_chunk_size, max_batch_size, sliding_window_size"),
    ("context_window_sise=64", "did you mean 'context_window_size'"),
    ("context_window_size=0", "override context_window_size must be positive, got 0"),
    ("max_batch_size=many", "override max_batch_size must be an integer, got 'many'"),
    ("context_window_size", "not of the form key=value"),
])
def test_bad_overrides_fail_before_any_work(home, checkpoint, overrides, error):
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match=re.escape(error)):
        prepare(checkpoint, quantization="q0f32", overrides=overrides)
    assert not home.exists() or not (home / "models").exists()


def test_a_checkpoint_with_its_own_library_and_overrides_builds_no_other_library(home, checkpoint, caplog):
    """With a library given, overrides are limits within it and backend options are ignored
    with a warning: the cache converts the weights once (the entry without overrides) and
    compiles nothing for either."""
    plain = prepare(checkpoint, quantization="q0f32")
    given = prepare(checkpoint, quantization="q0f32", model_lib=plain.lib, overrides="context_window_size=64")
    assert not given.built and given.model_dir == plain.model_dir and given.lib == plain.lib
    with caplog.at_level("WARNING", logger="kiln"):
        given = prepare(checkpoint, quantization="q0f32", model_lib=plain.lib, opts="activations=int8")
    assert not given.built and given.model_dir == plain.model_dir and given.lib == plain.lib
    assert f"ignoring --opt activations=int8: the library {plain.lib} is used as it was built" in caplog.text
    assert len(list((home / "models").iterdir())) == 1


def test_two_processes_building_the_same_model_build_it_once(home, checkpoint):
    code = textwrap.dedent(f"""
        from kiln.pipeline.jit import prepare
        p = prepare({str(checkpoint)!r}, quantization="q4f32_1")
        print("BUILT" if p.built else "REUSED", p.lib)
    """)
    env = {**os.environ, "KILN_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    words = sorted(out.split()[0] for out, _ in outs)
    assert words == ["BUILT", "REUSED"]
    assert len({out.split()[1] for out, _ in outs}) == 1
    assert [p.name for p in (home / "models").iterdir()] and not any(
        p.name.startswith(".") for p in (home / "models").iterdir())


def test_a_converted_model_without_library_gets_one_compiled(home, checkpoint, kiln_build, tmp_path):
    from kiln.pipeline.convert_weight import convert_weight
    from kiln.pipeline.gen_config import gen_config

    model_dir = tmp_path / "converted"
    convert_weight(checkpoint, "q0f32", model_dir, show_progress=False)
    gen_config(checkpoint, "q0f32", model_dir, conv_template="chatml")
    first = prepare(model_dir)
    assert first.built and first.model_dir == model_dir and first.lib.parent.parent == home / "libs"
    assert not prepare(model_dir).built
    # size overrides compile another library for the same weights
    small = prepare(model_dir, overrides="context_window_size=64")
    assert small.built and small.lib != first.lib and small.lib.parent.parent == home / "libs"
    assert not prepare(model_dir, overrides="context_window_size=64").built
    assert len(list((home / "libs").iterdir())) == 2


def test_unknown_references_say_what_is_accepted(home):
    with pytest.raises(CheckpointError, match=r"model 'no-such-model' not found: give a kiln model directory, a "
                                              r"Hugging Face checkpoint directory, a \.gguf file, or the name of a "
                                              r"packaged model \(installed: smollm2\)"):
        prepare("no-such-model")


def test_kiln_chat_and_serve_take_overrides(home, checkpoint):
    env = {**os.environ, "KILN_HOME": str(home), "KILN_NO_PROGRESS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, a)], capture_output=True, text=True,
                                    env=env, timeout=600)
    res = run("chat", checkpoint, "-q", "q0f32", "--overrides", "context_window_size=96;prefill_chunk_size=16",
              "--prompt", "hi", "--max-tokens", "3", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert "context window 96" in res.stderr
    [entry] = (home / "models").iterdir()
    assert json.loads((entry / MANIFEST).read_text())["key"]["overrides"] == {"context_window_size": 96,
                                                                              "prefill_chunk_size": 16}
    for command in ("chat", "serve"):
        res = run(command, checkpoint, "-q", "q0f32", "--overrides", "num_hidden_layers=1", "--prompt", "hi") \
            if command == "chat" else run(command, checkpoint, "-q", "q0f32", "--overrides", "num_hidden_layers=1")
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("error: cannot override 'num_hidden_layers'")
    assert list((home / "models").iterdir()) == [entry]


def test_kiln_cache_list_and_clear(home, checkpoint):
    prepare(checkpoint, quantization="q0f32")
    env = {**os.environ, "KILN_HOME": str(home)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "kiln.cli", "cache", *a], capture_output=True, text=True,
                                    env=env)
    listed = json.loads(run("list", "--json").stdout)
    assert listed["home"] == str(home) and len(listed["entries"]) == 1
    entry = listed["entries"][0]
    assert entry["complete"] and entry["quantization"] == "q0f32" and entry["device"] == "cpu" and entry["size"] > 0
    assert "tiny-llama-q0f32-" in run("list").stdout
    assert run("clear").stdout.strip() == "removed 1 cache entry"
    assert json.loads(run("list", "--json").stdout)["entries"] == []


def test_readme_main_command_answers_with_smollm2(home):
    """`kiln chat smollm2 --prompt ...`, exactly as the README writes it, on a fresh cache:
    converts, compiles, answers (greedy: the packaged model's default sampling) within its answer
    length; the second run finds everything in the cache, builds nothing and answers the same."""
    env = {**os.environ, "KILN_HOME": str(home)}
    cmd = [sys.executable, "-m", "kiln.cli", "chat", "smollm2", "--prompt", "What is the capital of France?"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout and len(first.stdout) < 2000, first.stdout
    assert "Converting" in first.stderr and "Compiling" in first.stderr
    entries = list((home / "models").iterdir())
    manifest = (entries[0] / MANIFEST).read_text()
    config = json.loads((entries[0] / "mlc-chat-config.json").read_text())
    assert (config["temperature"], config["top_p"], config["max_gen_len"]) == (0.0, 0.9, 512)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "Converting" not in second.stderr and "Compiling" not in second.stderr
    assert list((home / "models").iterdir()) == entries and (entries[0] / MANIFEST).read_text() == manifest


def test_backend_options_reach_the_compile_and_the_cache_key(home, checkpoint):
    """`--opt` on the commands that run a model compiles with it, as its own cache entry; a bad
    value is a one-line error before any work."""
    env = {**os.environ, "KILN_HOME": str(home), "KILN_NO_PROGRESS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, a)], capture_output=True, text=True,
                                    env=env, timeout=600)
    res = run("chat", checkpoint, "-q", "q0f32", "--opt", "activations=fp8", "--prompt", "hi")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "error: --opt activations must be one of int16, int8, got 'fp8'"
    assert not (home / "models").exists() or not list((home / "models").iterdir())
    res = run("bench", checkpoint, "-q", "q4f32_2", "--opt", "activations=int8", "--prompt-tokens", "8",
              "--gen-tokens", "4", "--runs", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["decode_tok_s"]["median"] > 0
    [entry] = (home / "models").iterdir()
    assert json.loads((entry / MANIFEST).read_text())["key"]["opts"] == "activations=int8"
