"""The CLI pipeline: convert_weight, gen_config, compile; formats, metadata, atomicity, memory."""

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from kiln.cli import main
from kiln.pipeline.compile import read_metadata
from kiln.pipeline.tensor_cache import verify_md5
from kiln.testing import make_hf_checkpoint

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def kiln(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("pipe") / "ckpt", LLAMA, init_std=0.1)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 5]}))
    (path / "tokenizer.json").write_text("{}")
    return path


def test_seed_commands_produce_a_working_model(checkpoint, tmp_path, capsys):
    out = tmp_path / "dist" / "tiny-q4f16_1"
    lib = tmp_path / "dist" / "libs" / "tiny-q4f16_1-cpu.so"
    assert kiln(capsys, "convert-weight", checkpoint, "--quantization", "q4f16_1", "-o", out)[0] == 0
    assert kiln(capsys, "gen-config", checkpoint, "--quantization", "q4f16_1", "--conv-template", "chatml",
                "-o", out, "--context-window-size", "256", "--prefill-chunk-size", "32", "--max-batch-size", "4")[0] == 0
    code, _, err = kiln(capsys, "compile", out / "mlc-chat-config.json", "--device", "cpu", "-o", lib,
                        "--opt", "schedule=1")
    assert code == 0, err

    # weights: TVM's own tensor-cache reader loads them; every shard passes its md5
    from tvm.contrib import tvmjs
    import tvm

    params, meta = tvmjs.load_tensor_cache(str(out), tvm.cpu())
    assert "model.layers.0.self_attn.qkv_proj.q_weight" in params
    assert meta["kiln"]["quantization"] == "q4f16_1"
    verify_md5(out)

    # config: the seed's fields, generation defaults from generation_config.json
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    for key in ("model_type", "quantization", "model_config", "vocab_size", "context_window_size",
                "sliding_window_size", "prefill_chunk_size", "attention_sink_size", "tensor_parallel_shards",
                "temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                "mean_gen_len", "max_gen_len", "conv_template", "pad_token_id", "bos_token_id", "eos_token_id",
                "tokenizer_files", "version"):
        assert key in cfg, key
    assert (cfg["context_window_size"], cfg["prefill_chunk_size"], cfg["max_batch_size"]) == (256, 32, 4)
    assert cfg["temperature"] == 0.6 and cfg["top_p"] == 0.9 and cfg["eos_token_id"] == [2, 5]
    assert cfg["conv_template"] == "chatml" and cfg["tokenizer_files"] == ["tokenizer.json"]
    assert (out / "tokenizer.json").exists()

    # library: records what it was built for
    from tvm import relax

    meta = read_metadata(relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu()))
    assert meta["model_type"] == "llama" and meta["quantization"] == "q4f16_1" and meta["device"] == "cpu"
    assert meta["kiln_version"] and "llvm" in meta["target"]
    assert meta["model_config"]["context_window_size"] == 256
    names = {p["name"]: p for p in meta["params"]}
    assert names["model.embed_tokens.q_weight"] == {"name": "model.embed_tokens.q_weight", "shape": [256, 8],
                                                    "dtype": "uint32"}


def test_output_with_weights_is_refused_unless_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "m"
    assert kiln(capsys, "convert_weight", checkpoint, "--quantization", "q0f32", "-o", out)[0] == 0
    before = (out / "tensor-cache.json").read_text()
    code, _, err = kiln(capsys, "convert_weight", checkpoint, "--quantization", "q4f32_1", "-o", out)
    assert code == 1 and "already holds converted weights" in err and "--overwrite" in err
    assert (out / "tensor-cache.json").read_text() == before
    # gen_config beside the weights is the normal flow
    assert kiln(capsys, "gen_config", checkpoint, "--quantization", "q0f32", "-o", out)[0] == 0
    code, _, _ = kiln(capsys, "convert_weight", checkpoint, "--quantization", "q4f32_1", "-o", out, "--overwrite")
    assert code == 0
    index = json.loads((out / "tensor-cache.json").read_text())
    assert index["metadata"]["kiln"]["quantization"] == "q4f32_1"
    assert sorted(p.name for p in out.glob("params_shard_*.bin")) == sorted(s["dataPath"] for s in index["records"])
    assert (out / "mlc-chat-config.json").exists()


def test_failed_conversion_leaves_no_output(checkpoint, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((checkpoint / "config.json").read_text())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :32].copy()  # the last tensor written
    save_file(tensors, str(bad / "model.safetensors"))
    out = tmp_path / "out"
    code, _, err = kiln(capsys, "convert_weight", bad, "--quantization", "q0f32", "-o", out)
    assert code == 1
    assert "lm_head.weight" in err and "(256, 32)" in err and "(256, 64)" in err
    assert not out.exists() or not any(out.iterdir())
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


SLOW_KILN = """
import sys, time
from kiln.sources import huggingface
get = huggingface.SafetensorsCheckpoint.get
def slow_get(self, name):  # a conversion that takes long enough to be killed half-way
    time.sleep(0.2)
    return get(self, name)
huggingface.SafetensorsCheckpoint.get = slow_get
from kiln.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_conversion_cleans_up_like_ctrl_c(checkpoint, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_KILN, "convert_weight", str(checkpoint), "-q", "q0f32",
                             "-o", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "the conversion never started staging"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated", err
    assert not (out / "tensor-cache.json").exists()
    assert not any("partial" in p.name for p in tmp_path.iterdir())


def test_staging_left_by_a_killed_process_is_removed_by_the_next_run(checkpoint, tmp_path, capsys):
    import os
    import time

    from kiln.pipeline.output import STALE_AFTER_S, staging_prefix

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = {
        "dead": tmp_path / (staging_prefix(out, int(dead.stdout)) + "abcd1234"),  # SIGKILLed owner
        "alive": tmp_path / (staging_prefix(out) + "efgh5678"),  # this process: still working on it
        "old": tmp_path / ".out.partial-x7k2m9qa",  # owner unknown (an older kiln), untouched for 2 days
        "recent": tmp_path / ".out.partial-p3n8r1zz",  # owner unknown, recent: might still be running
    }
    for path in leftovers.values():
        path.mkdir()
        (path / "params_shard_0.bin").write_bytes(b"\0" * 1024)
    two_days_ago = time.time() - 2 * STALE_AFTER_S
    os.utime(leftovers["old"], (two_days_ago, two_days_ago))
    assert kiln(capsys, "convert_weight", checkpoint, "-q", "q0f32", "-o", out)[0] == 0
    assert (out / "tensor-cache.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == sorted(
        leftovers[k].name for k in ("alive", "recent"))


def test_conversion_streams_tensor_by_tensor(tmp_path):
    """Peak memory stays near one tensor, not the model (here ~2 x 4 MB embedding tables)."""
    from kiln.pipeline.convert_weight import convert_weight

    cfg = {**LLAMA, "vocab_size": 8192, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4}
    ckpt = make_hf_checkpoint(tmp_path / "big", cfg)
    total = (ckpt / "model.safetensors").stat().st_size
    tracemalloc.start()
    convert_weight(ckpt, "q0f32", tmp_path / "out", show_progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    largest = 8192 * 128 * 4
    assert total > 8 * 1024 * 1024
    assert peak < 3 * largest, f"peak {peak / 1e6:.1f} MB for a {total / 1e6:.1f} MB checkpoint"


def test_cli_error_is_one_line_and_debug_shows_traceback(tmp_path):
    cmd = [sys.executable, "-m", "kiln.cli", "convert_weight", str(tmp_path / "nope"), "--quantization", "q0f32",
           "-o", str(tmp_path / "o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"error: checkpoint '{tmp_path / 'nope'}' not found: give a Hugging Face checkpoint directory, a .gguf file, "
        "or the name of a packaged model (installed: smollm2)"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "KILN_DEBUG": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr


@pytest.fixture
def broken_checkpoints(checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    made = {}
    d = made["no_config"] = tmp_path / "no_config"
    d.mkdir()
    (d / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())

    d = made["bad_json"] = tmp_path / "bad_json"
    d.mkdir()
    (d / "config.json").write_text("{ not json")

    d = made["bad_utf8"] = tmp_path / "bad_utf8"
    d.mkdir()
    (d / "config.json").write_bytes((checkpoint / "config.json").read_bytes().replace(b'"llama"', b'"ll\xe4ma"'))
    (d / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())

    d = made["corrupt"] = tmp_path / "corrupt"
    d.mkdir()
    (d / "config.json").write_text((checkpoint / "config.json").read_text())
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)

    d = made["no_weights"] = tmp_path / "no_weights"
    d.mkdir()
    (d / "config.json").write_text((checkpoint / "config.json").read_text())

    for name, arch, model_type in (("neox", "GPTNeoXForCausalLM", "gpt_neox"), ("alien", "AlienForCausalLM", "alien")):
        d = made[name] = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**LLAMA, "architectures": [arch], "model_type": model_type}))
        (d / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())

    d = made["missing_tensors"] = tmp_path / "missing_tensors"
    d.mkdir()
    (d / "config.json").write_text((checkpoint / "config.json").read_text())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    return made


@pytest.mark.parametrize(
    "case,code,message",
    [
        ("no_config", 1, "no config.json in"),
        ("bad_json", 1, "is not valid JSON"),
        ("bad_utf8", 1, "is not valid JSON: it is not UTF-8 text (byte 0xe4"),
        ("corrupt", 1, "cannot read"),
        ("no_weights", 1, "no weights found"),
        ("neox", 2, "pip install kiln-gpt-neox"),
        ("alien", 2, "'AlienForCausalLM' is not served by any installed plugin (installed architectures: llama)"),
        ("missing_tensors", 1, "lacks 2 tensor(s) the llama model needs: model.layers.1.mlp.down_proj.weight, "
                               "model.norm.weight"),
    ],
)
def test_bad_checkpoints_get_clear_errors(broken_checkpoints, tmp_path, capsys, case, code, message):
    got, _, err = kiln(capsys, "convert_weight", broken_checkpoints[case], "--quantization", "q0f32", "-o",
                       tmp_path / "out")
    assert got == code
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "tensor-cache.json").exists()


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json", "mlc-chat-config.json"])
def test_non_utf8_json_files_are_config_errors(checkpoint, tmp_path, capsys, name):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in checkpoint.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    bad = b'{"chat_template": "caf\xe9"}'
    if name == "mlc-chat-config.json":
        out = tmp_path / "out"
        assert main(["gen_config", str(ckpt), "-q", "q0f32", "-o", str(out)]) == 0
        (out / name).write_bytes(bad)
        argv = ["compile", out, "--device", "cpu", "-o", tmp_path / "x.so"]
    else:
        (ckpt / name).write_bytes(bad)
        argv = ["gen_config", ckpt, "-q", "q0f32", "-o", tmp_path / "out"]
    code, _, err = kiln(capsys, *argv)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {name} ") and "is not valid JSON: it is not UTF-8 text (byte 0xe9" in err


def test_model_type_option_overrides_detection(broken_checkpoints, tmp_path, capsys):
    code, _, err = kiln(capsys, "convert_weight", broken_checkpoints["alien"], "--quantization", "q0f32",
                        "--model-type", "llama", "-o", tmp_path / "out")
    assert code == 0, err


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["convert_weight", "{ckpt}", "-q", "q3f7", "-o", "{tmp}/o"], 2,
         "unknown quantization 'q3f7'; installed: q0f16, q0f32, q4f16_1, q4f16_2, q4f32_1, q4f32_2"),
        (["convert_weight", "{ckpt}", "-q", "q0f32", "-o", "{tmp}/o", "--source-format", "gguff"], 2,
         "unknown model source 'gguff'"),
        (["gen_config", "{ckpt}", "-q", "q0f32", "-o", "{tmp}/o", "--conv-template", "vicuna"], 2,
         "unknown conversation template 'vicuna' (did you mean 'vicuna_v1.1'?)"),
        (["gen_config", "{ckpt}", "-q", "q0f32", "-o", "{tmp}/o", "--overrides", "context_windw_size=9"], 2,
         "unknown override 'context_windw_size' (did you mean 'context_window_size'?)"),
        (["gen_config", "{ckpt}", "-q", "q0f32", "-o", "{tmp}/o", "--context-window-size", "0"], 1,
         "context_window_size must be positive"),
        (["compile", "{tmp}/none.json", "--device", "cpu", "-o", "{tmp}/x.so"], 1, "does not exist: run `kiln gen_config`"),
        (["gen_config", "{ckpt}", "-q", "q0f32", "-o", "{tmp}/o", "--sliding-window-size", "64"], 1,
         "sliding_window_size=64: architecture 'llama' (kiln-llama) does not implement sliding-window attention; "
         "leave --sliding-window-size unset (or -1)"),
        (["gen_config", "{ckpt}", "-q", "q0f32", "-o", "{tmp}/o", "--overrides", "sliding_window_size=16"], 1,
         "sliding_window_size=16: architecture 'llama' (kiln-llama) does not implement sliding-window attention"),
    ],
)
def test_bad_options_get_clear_errors(checkpoint, tmp_path, capsys, argv, code, message):
    argv = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in argv]
    got, _, err = kiln(capsys, *argv)
    assert (got, err.count("\n")) == (code, 1), err
    assert message in err


@pytest.fixture(scope="module")
def config_dir(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg")
    assert main(["gen_config", str(checkpoint), "-q", "q0f32", "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "device,opt,code,message",
    [
        ("tpu", None, 2, "unknown device 'tpu' (did you mean 'cpu'?); installed: cpu"),
        ("cpu", "unroll=4", 2, "unknown --opt key 'unroll' for device 'cpu'; valid keys: activations, interleave, mcpu, "
                               "schedule"),
        ("cpu", "schedule", 2, "--opt item 'schedule' is not of the form key=value"),
        ("cpu", "activations=fp8", 2, "--opt activations must be one of int16, int8, got 'fp8'"),
        ("cpu", "interleave=yes", 2, "--opt interleave must be one of 0, 1, got 'yes'"),
    ],
)
def test_compile_rejects_unknown_device_and_options(config_dir, tmp_path, capsys, device, opt, code, message):
    argv = ["compile", config_dir, "--device", device, "-o", tmp_path / "x.so"] + (["--opt", opt] if opt else [])
    got, _, err = kiln(capsys, *argv)
    assert got == code and message in err
    assert not (tmp_path / "x.so").exists()


@pytest.mark.parametrize("overrides,message", [
    ("hidden_size=128", "cannot override 'hidden_size'; the sizes that can be overridden: context_window_size, "
                        "prefill_chunk_size, max_batch_size, sliding_window_size (other fields come from `kiln gen_config`)"),
    ("context_window=64", "cannot override 'context_window' (did you mean 'context_window_size'?); the sizes"),
])
def test_compile_overrides_are_limited_to_the_size_fields(config_dir, tmp_path, capsys, overrides, message):
    code, _, err = kiln(capsys, "compile", config_dir, "--device", "cpu", "-o", tmp_path / "x.so", "--overrides", overrides)
    assert (code, err.count("\n")) == (2, 1), err
    assert message in err
    assert not (tmp_path / "x.so").exists()


def test_compile_refuses_a_sliding_window_the_architecture_does_not_implement(config_dir, tmp_path, capsys):
    code, _, err = kiln(capsys, "compile", config_dir, "--device", "cpu", "-o", tmp_path / "x.so",
                        "--overrides", "sliding_window_size=32")
    assert (code, err.count("\n")) == (1, 1), err
    assert "sliding_window_size=32: architecture 'llama' (kiln-llama) does not implement sliding-window attention" in err
    # a config written before this check, holding a window, is refused too
    cfg = json.loads((config_dir / "mlc-chat-config.json").read_text())
    bad = tmp_path / "old"
    bad.mkdir()
    (bad / "mlc-chat-config.json").write_text(json.dumps({**cfg, "sliding_window_size": 64}))
    code, _, err = kiln(capsys, "compile", bad, "--device", "cpu", "-o", tmp_path / "x.so")
    assert code == 1 and "sliding_window_size=64: architecture 'llama'" in err
    assert not (tmp_path / "x.so").exists()


def test_library_refuses_weights_and_configs_it_was_not_built_for(checkpoint, kiln_build, tmp_path):
    from kiln.errors import MismatchError
    from kiln.runtime.model import LoadedModel

    f32 = kiln_build(checkpoint, "q0f32")
    q4 = kiln_build(checkpoint, "q4f16_1")
    with pytest.raises(MismatchError, match="built for quantization='q0f32' but the model's mlc-chat-config.json has "
                                            "quantization='q4f16_1'"):
        LoadedModel(q4.model_dir, f32.lib)
    other = make_hf_checkpoint(tmp_path / "other", {**LLAMA, "hidden_size": 128})
    wide = kiln_build(other, "q0f32")
    with pytest.raises(MismatchError, match="model_config.hidden_size"):
        LoadedModel(wide.model_dir, f32.lib)
    # weights swapped under an unchanged config are caught by their shapes
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in f32.model_dir.iterdir():
        if f.name == "mlc-chat-config.json":
            (mixed / f.name).write_text(f.read_text())
    for f in wide.model_dir.glob("params_shard_*.bin"):
        (mixed / f.name).write_bytes(f.read_bytes())
    (mixed / "tensor-cache.json").write_text((wide.model_dir / "tensor-cache.json").read_text())
    with pytest.raises(MismatchError, match=r"parameter 'model\.embed_tokens\.weight'.*\[256, 128\].*\[256, 64\]"):
        LoadedModel(mixed, f32.lib)
    # weights converted for another quantization under an unchanged config: the field is named
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "mlc-chat-config.json").write_text((f32.model_dir / "mlc-chat-config.json").read_text())
    for f in q4.model_dir.glob("params_shard_*.bin"):
        (swapped / f.name).write_bytes(f.read_bytes())
    (swapped / "tensor-cache.json").write_text((q4.model_dir / "tensor-cache.json").read_text())
    with pytest.raises(MismatchError) as err:
        LoadedModel(swapped, f32.lib)
    assert str(err.value).startswith(
        f"weights in {swapped} were converted with quantization='q4f16_1' but the library was built for 'q0f32'")
    bogus = tmp_path / "bogus.so"
    _plain_library(bogus)
    with pytest.raises(MismatchError, match="is not a kiln model library"):
        LoadedModel(f32.model_dir, bogus)


def _plain_library(path):
    """A valid TVM library that is not a kiln model."""
    import tvm
    from tvm import te

    a = te.placeholder((4,), name="a")
    b = te.compute((4,), lambda i: a[i] + 1, name="b")
    tvm.compile(te.create_prim_func([a, b]), "llvm").export_library(str(path))


def test_unscheduled_and_scheduled_libraries_agree(checkpoint, kiln_build):
    from kiln.runtime.model import LoadedModel

    tokens = list(range(3, 40))
    outs = []
    for opt in ("schedule=0", "schedule=1"):
        built = kiln_build(checkpoint, "q4f32_1", opt=opt)
        m = LoadedModel(built.model_dir, built.lib)
        m.create_kv_cache(1, 256, 64)
        m.add_sequence(0)
        outs.append(np.concatenate([m.prefill([0], [tokens], all_logits=True), m.decode([0], [7])]))
    # the scheduled library's 4-bit kernels round activations to int16 steps (kiln_backends.cpu_kernels)
    np.testing.assert_allclose(outs[0], outs[1], atol=5e-3, rtol=0)


def test_compile_errors_quote_tvmscripts_error_line_and_where_it_points():
    """A TVMScript diagnostic ends with the offending source line and a row of carets; the one
    line kiln shows (``CompileError``) is its ``error:`` line and the place it points at."""
    from tvm.script import tirx as T

    from kiln.pipeline.compile import error_line

    def code(i):
        return 1 if i > 0 else 2  # a TIR expression in a Python condition: rejected while parsing

    with pytest.raises(Exception) as info:
        @T.prim_func
        def f(a: T.Buffer((4,), "int32")):
            for i in T.unroll(4):
                a[i] = code(i)

    assert str(info.value).strip().splitlines()[-1].strip().strip("|").strip().startswith("^")
    line = error_line(info.value)
    assert "Cannot use and / or / not operator to Expr" in line and "test_pipeline.py:" in line, line
