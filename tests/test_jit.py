"""Model references and the compile cache: build once, reuse, rebuild what is damaged, one
builder at a time, `kiln cache`, and the README's main command on SmolLM2."""

import json
import os
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


@pytest.mark.parametrize("damage", ["corrupt shard", "truncated library", "no manifest", "manifest of other inputs"])
def test_a_damaged_entry_is_rebuilt_not_loaded(home, checkpoint, damage, caplog):
    entry = prepare(checkpoint, quantization="q0f32")
    shard = entry.model_dir / "params_shard_0.bin"
    if damage == "corrupt shard":
        data = bytearray(shard.read_bytes())
        data[100] ^= 0xFF
        shard.write_bytes(bytes(data))
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
    assert not prepare(checkpoint, quantization="q0f32").built  # and now it is whole


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


def test_unknown_references_say_what_is_accepted(home):
    with pytest.raises(CheckpointError, match=r"model 'no-such-model' not found: give a kiln model directory, a "
                                              r"Hugging Face checkpoint directory, a \.gguf file, or the name of a "
                                              r"packaged model \(installed: smollm2\)"):
        prepare("no-such-model")


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
    """`kiln chat smollm2 --prompt ...` on a fresh cache: converts, compiles, answers; the second
    run finds everything in the cache and builds nothing."""
    env = {**os.environ, "KILN_HOME": str(home)}
    cmd = [sys.executable, "-m", "kiln.cli", "chat", "smollm2", "--prompt", "What is the capital of France?",
           "--temperature", "0", "--max-tokens", "30"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout
    assert "Converting" in first.stderr and "Compiling" in first.stderr
    entries = list((home / "models").iterdir())
    manifest = (entries[0] / MANIFEST).read_text()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "Converting" not in second.stderr and "Compiling" not in second.stderr
    assert list((home / "models").iterdir()) == entries and (entries[0] / MANIFEST).read_text() == manifest
