"""The plugin system: entry points, isolation of broken plugins, duplicates, blocking, listing.

Plugins here are real distributions (a package plus its ``*.dist-info`` with entry points)
written into a directory that a subprocess puts on its path, exactly as pip would leave them.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest


def make_dist(site, name: str, code: str, entry: str | None = None, version: str = "0.1"):
    """Write package ``name`` with ``code`` and a dist-info registering it in group ``kiln``."""
    pkg = site / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(code))
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[kiln]\n{entry or name} = {name}\n")


def kiln(site, *args, env=None):
    environ = {**os.environ, "PYTHONPATH": str(site), **(env or {})}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, env=environ)


def listing(site, env=None) -> dict:
    res = kiln(site, "plugins", "--json", env=env)
    assert res.returncode == 0, res.stderr
    return {p["name"]: p for p in json.loads(res.stdout)["plugins"]}


def test_installed_plugins_are_listed_with_what_they_registered(tmp_path):
    plugins = listing(tmp_path)
    assert plugins["llama"]["status"] == "loaded"
    assert plugins["llama"]["distribution"] == "kiln-llama" and plugins["llama"]["version"]
    assert plugins["llama"]["registered"] == {"architectures": ["llama"]}
    assert plugins["backends"]["registered"] == {"backends": ["cpu"]}
    assert plugins["kiln.quantization"]["registered"]["quantizations"] == ["q0f32", "q0f16", "q4f16_1", "q4f32_1", "q4f16_2",
                                                                              "q4f32_2"]
    assert "chatml" in plugins["kiln.conv_templates"]["registered"]["conv_templates"]
    assert plugins["kiln.sources"]["registered"]["model_sources"] == ["huggingface-safetensors", "huggingface-torch", "gguf"]
    text = kiln(tmp_path, "plugins")
    assert text.returncode == 0 and "llama  [loaded]  kiln-llama" in text.stdout


def test_a_plugin_that_fails_to_import_is_isolated(tmp_path):
    make_dist(tmp_path, "kiln_broken", "import does_not_exist_anywhere\n")
    plugins = listing(tmp_path)
    assert plugins["kiln_broken"]["status"] == "failed"
    assert "ModuleNotFoundError" in plugins["kiln_broken"]["error"] and "does_not_exist_anywhere" in plugins["kiln_broken"]["error"]
    assert plugins["llama"]["status"] == "loaded" and plugins["backends"]["status"] == "loaded"
    text = kiln(tmp_path, "plugins").stdout
    assert "kiln_broken  [failed]" in text and "error: ModuleNotFoundError" in text


def test_a_plugin_whose_hook_raises_is_isolated(tmp_path):
    make_dist(tmp_path, "kiln_raises", """
        from kiln import hookimpl

        @hookimpl
        def register_conv_templates():
            raise RuntimeError("template file missing")
    """)
    plugins = listing(tmp_path)
    assert plugins["kiln_raises"]["status"] == "failed"
    assert plugins["kiln_raises"]["error"] == "register_conv_templates raised RuntimeError: template file missing"
    assert "chatml" in plugins["kiln.conv_templates"]["registered"]["conv_templates"]


def test_a_plugin_whose_commands_fail_to_register_does_not_take_the_cli_down(tmp_path):
    make_dist(tmp_path, "kiln_badcmd", """
        from kiln import hookimpl

        @hookimpl
        def register_commands(app):
            @app.command("half-made")
            def half_made():
                print("should not exist")

            raise RuntimeError("no typer today")
    """)
    plugins = listing(tmp_path)
    assert plugins["kiln_badcmd"]["status"] == "failed"
    assert plugins["kiln_badcmd"]["error"] == "register_commands raised RuntimeError: no typer today"
    assert plugins["llama"]["status"] == "loaded"
    res = kiln(tmp_path, "--help")
    assert res.returncode == 0 and "convert_weight" in res.stdout
    assert "plugin 'kiln_badcmd' failed to register its commands: no typer today" in res.stderr
    assert "half-made" not in res.stdout  # what it registered before failing is gone with it
    assert kiln(tmp_path, "half-made").returncode != 0


def test_a_misspelled_hook_fails_loudly(tmp_path):
    make_dist(tmp_path, "kiln_typo", """
        from kiln import hookimpl

        @hookimpl
        def register_architecture():
            return []
    """)
    plugins = listing(tmp_path)
    assert plugins["kiln_typo"]["status"] == "failed"
    assert plugins["kiln_typo"]["error"] == (
        "implements unknown hook(s): register_architecture (did you mean 'register_architectures'?)"
    )


def test_duplicate_registrations_are_an_error_naming_both_plugins(tmp_path):
    make_dist(tmp_path, "kiln_dup", """
        from kiln import hookimpl
        from kiln.specs import QuantizationSpec
        from kiln.quantization import NoQuant

        @hookimpl
        def register_quantizations():
            return [QuantizationSpec("q4f16_1", NoQuant("float16"))]
    """)
    message = ("quantization 'q4f16_1' is registered twice: by plugin 'kiln.quantization' and by plugin 'kiln_dup'; "
               "uninstall one of them or block one with KILN_DISABLE_PLUGINS=kiln_dup")
    # the listing still works and shows the conflict on the later plugin, which is left out
    plugins = listing(tmp_path)
    assert plugins["kiln_dup"]["status"] == "failed" and plugins["kiln_dup"]["error"] == message
    assert plugins["kiln_dup"]["registered"] == {} and plugins["llama"]["status"] == "loaded"
    res = kiln(tmp_path, "plugins")
    assert res.returncode == 0 and "kiln_dup  [failed]" in res.stdout and f"error: {message}" in res.stdout
    res = kiln(tmp_path, "--version")
    assert res.returncode == 0 and res.stdout.startswith("kiln ")
    # a command that uses the registry refuses to guess which plugin wins
    res = kiln(tmp_path, "gen_config", str(tmp_path / "nope"), "-q", "q0f32", "-o", str(tmp_path / "o"))
    assert res.returncode == 1 and res.stderr.strip() == f"error: {message}"
    res = kiln(tmp_path, "compile", str(tmp_path / "nope"), "--device", "cpu", "-o", str(tmp_path / "x.so"))
    assert res.returncode == 1 and res.stderr.strip() == f"error: {message}"
    # blocking one of them resolves it
    plugins = listing(tmp_path, env={"KILN_DISABLE_PLUGINS": "kiln_dup"})
    assert plugins["kiln_dup"]["status"] == "disabled"


def test_disabled_plugins_are_blocked_and_their_absence_is_explained(tmp_path):
    plugins = listing(tmp_path, env={"KILN_DISABLE_PLUGINS": "llama, backends"})
    assert plugins["llama"]["status"] == "disabled" and plugins["backends"]["status"] == "disabled"
    assert plugins["llama"]["registered"] == {}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"lm_head.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "ckpt" / "model.safetensors"))
    res = kiln(tmp_path, "gen_config", str(tmp_path / "ckpt"), "-q", "q0f32", "-o", str(tmp_path / "o"),
               env={"KILN_DISABLE_PLUGINS": "llama"})
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "error: architecture 'LlamaForCausalLM' comes from kiln-llama, which is installed but disabled by "
        "KILN_DISABLE_PLUGINS (remove 'llama' from it to use it)"
    )
    res = kiln(tmp_path, "compile", str(tmp_path / "o"), "--device", "cpu", "-o", "x.so",
               env={"KILN_DISABLE_PLUGINS": "backends"})
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "error: device 'cpu' comes from kiln-backends, which is installed but disabled by KILN_DISABLE_PLUGINS "
        "(remove 'backends' from it to use it)"
    )


def _checkpoint(path, arch: str, model_type: str):
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": model_type}))
    save_file({"lm_head.weight": np.zeros((2, 2), np.float32)}, str(path / "model.safetensors"))
    return path


def test_an_architecture_whose_plugin_failed_to_load_says_so(tmp_path):
    site = tmp_path / "site"
    make_dist(site, "kiln_mamba", "import does_not_exist_anywhere\n", entry="mamba")
    assert listing(site)["mamba"]["distribution"] == "kiln-mamba"
    why = ("comes from kiln-mamba, which is installed but failed to load: ModuleNotFoundError: "
           "No module named 'does_not_exist_anywhere' (see `kiln plugins`)")
    ckpt = _checkpoint(tmp_path / "mamba", "MambaForCausalLM", "mamba")
    res = kiln(site, "convert_weight", str(ckpt), "-q", "q0f32", "-o", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.strip() == f"error: architecture 'MambaForCausalLM' {why}"
    res = kiln(site, "gen_config", str(ckpt), "-q", "q0f32", "-o", str(tmp_path / "o"), "--model-type", "mamba")
    assert res.returncode == 2 and res.stderr.strip() == f"error: architecture 'mamba' {why}"
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    res = kiln(site, "convert_weight", str(tmp_path / "m.gguf"), "-q", "q0f32", "-o", str(tmp_path / "o"))
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: GGUF architecture 'mamba' in '{tmp_path / 'm.gguf'}' {why}"
    # an architecture nobody provides mentions the broken plugin, which might have been the one
    alien = _checkpoint(tmp_path / "alien", "AlienForCausalLM", "alien")
    res = kiln(site, "convert_weight", str(alien), "-q", "q0f32", "-o", str(tmp_path / "o"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.strip().endswith("; plugin(s) that failed to load: mamba (see `kiln plugins`)")


def test_plugin_manager_is_created_without_import_side_effects():
    code = "import kiln.plugins, kiln.registry; print(kiln.registry._registry is None)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "True"


@pytest.mark.parametrize("hook", ["register_architectures", "register_quantizations", "register_backends",
                                  "register_conv_templates", "register_model_sources", "register_commands",
                                  "resolve_architecture"])
def test_every_hook_is_documented(hook):
    from kiln import hookspecs

    doc = getattr(hookspecs, hook).__doc__
    assert "Called:" in doc and "Returns:" in doc
