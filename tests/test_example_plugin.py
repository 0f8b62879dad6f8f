"""docs/examples/kiln-example-plugin, built and installed by the test suite, proves the plugin
guide: a third-party distribution adds an architecture (checked against transformers' Qwen2 by
kiln's contract tests), a backend, a quantization scheme, a chat template, a model source, a
command and an architecture resolver, without any change to kiln."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.registry import reset_registry
from kiln.testing import dequantized_checkpoint, hf_logits, hf_model, make_hf_checkpoint
from kiln.testing.contracts import ArchitectureContract

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "kiln-example-plugin"

QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module", autouse=True)
def example_plugin(tmp_path_factory):
    """pip-install the example into a private directory and make this process see it."""
    site = tmp_path_factory.mktemp("example-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(site), str(EXAMPLE)],
        check=True, capture_output=True,
    )
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    reset_registry()
    yield site
    sys.path.remove(str(site))
    reset_registry()


def run_kiln(site, *args):
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True, env=env)


def test_example_registers_through_every_hook(example_plugin):
    res = run_kiln(example_plugin, "plugins", "--json")
    plugins = {p["name"]: p for p in json.loads(res.stdout)["plugins"]}
    example = plugins["example"]
    assert example["status"] == "loaded" and example["distribution"] == "kiln-example-plugin"
    assert example["registered"] == {
        "architectures": ["qwen2"],
        "quantizations": ["q8f32_1"],
        "backends": ["cpu-portable"],
        "conv_templates": ["example-chat"],
        "model_sources": ["npz"],
    }
    res = run_kiln(example_plugin, "example-info")
    assert res.returncode == 0 and "architecture qwen2" in res.stdout


class TestQwen2FromThePlugin(ArchitectureContract):
    hf_config = QWEN2


class TestQwen2OnThePluginBackend(ArchitectureContract):
    hf_config = {**QWEN2, "tie_word_embeddings": False}
    device = "cpu-portable"
    prompt_lengths = (5,)


def test_plugin_quantization_scheme_matches_its_dequantized_weights(tmp_path, kiln_build):
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", QWEN2, init_std=0.1)
    built = kiln_build(ckpt, "q8f32_1")
    from kiln.runtime.model import LoadedModel

    model = LoadedModel(built.model_dir, built.lib)
    model.create_kv_cache(1, 128, 32)
    model.add_sequence(0)
    tokens = list(range(1, 30))
    got = model.prefill([0], [tokens], all_logits=True)
    reference = hf_model(dequantized_checkpoint(ckpt, built.model_dir, tmp_path / "deq"))
    # the CPU kernels round activations to int16 steps (kiln_backends.cpu_kernels): ~1e-3 here
    np.testing.assert_allclose(got, hf_logits(reference, tokens), atol=5e-3, rtol=0)
    meta = json.loads((built.model_dir / "tensor-cache.json").read_text())
    assert meta["metadata"]["BitsPerParam"] > 8  # 8-bit codes plus a float32 scale per 32


def test_plugin_source_template_and_resolver(tmp_path, capsys):
    from kiln.cli import main
    from safetensors.numpy import load_file

    ckpt = make_hf_checkpoint(tmp_path / "ckpt", QWEN2)
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "weights.npz", **load_file(str(ckpt / "model.safetensors")))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "qwen2-finetuned"  # only the plugin's resolve_architecture knows this one
    cfg["architectures"] = ["Qwen2ForFineTunedLM"]
    (npz / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["convert_weight", str(npz), "-q", "q0f32", "-o", str(out)]) == 0
    assert main(["gen_config", str(npz), "-q", "q0f32", "-o", str(out), "--conv-template", "example-chat"]) == 0
    capsys.readouterr()
    index = json.loads((out / "tensor-cache.json").read_text())
    assert index["metadata"]["kiln"]["source_format"] == "npz"
    assert index["metadata"]["kiln"]["model_type"] == "qwen2"
    assert json.loads((out / "mlc-chat-config.json").read_text())["conv_template"] == "example-chat"


def test_a_model_the_plugin_ships_is_found_by_name(tmp_path, capsys):
    from kiln.cli import main

    out = tmp_path / "out"
    assert main(["convert_weight", "tiny-qwen2-example", "-q", "q4f32_1", "-o", str(out)]) == 0
    assert main(["gen_config", "tiny-qwen2-example", "-q", "q4f32_1", "-o", str(out)]) == 0
    capsys.readouterr()
    meta = json.loads((out / "tensor-cache.json").read_text())["metadata"]["kiln"]
    assert (meta["source_format"], meta["model_type"], meta["quantization"]) == ("npz", "qwen2", "q4f32_1")
    assert meta["source"] == "tiny-qwen2-example"
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["model_config"]["hidden_size"] == 32
    # a name nobody ships is refused with the names that are installed, the plugin's among them
    assert main(["convert_weight", "tiny-qwen3-example", "-q", "q0f32", "-o", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert "checkpoint 'tiny-qwen3-example' not found" in err and "tiny-qwen2-example" in err.split("installed: ")[1]
