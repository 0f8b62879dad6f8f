"""The ``kiln`` command line (typer).

Every error a user can cause is a :class:`kiln.errors.KilnError` and is printed as one line
(``error: ...``) with a non-zero exit code; ``KILN_DEBUG=1`` shows tracebacks instead.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import KilnError

app = typer.Typer(
    name="kiln",
    help="Compile large language models with Apache TVM and run them on the device at hand.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
log = logging.getLogger("kiln")


def _version(value: bool):
    if value:
        typer.echo(f"kiln {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print kiln's version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more."),
):
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


# ---------------------------------------------------------------------------------- pipeline
def convert_weight_cmd(
    checkpoint: Path = typer.Argument(..., help="Hugging Face checkpoint directory (or other model source)."),
    quantization: str = typer.Option(..., "--quantization", "-q", help="Quantization scheme, e.g. q4f16_1, q0f32."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for tensor-cache.json and the weight shards."),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="Architecture to use (default: from config.json)."),
    source_format: str = typer.Option("auto", "--source-format", help="Checkpoint format (default: detected)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace weights already in the output directory."),
):
    """Convert and quantize a checkpoint's weights into kiln's (MLC's) tensor-cache format."""
    from .pipeline.convert_weight import convert_weight

    out = convert_weight(checkpoint, quantization, output, model_type=model_type, source_format=source_format,
                         overwrite=overwrite)
    typer.echo(f"weights written to {out}")


def gen_config_cmd(
    checkpoint: Path = typer.Argument(..., help="Hugging Face checkpoint directory (or other model source)."),
    quantization: str = typer.Option(..., "--quantization", "-q", help="Quantization scheme the weights use."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write mlc-chat-config.json into."),
    conv_template: Optional[str] = typer.Option(
        None, "--conv-template", help="Conversation template name, or 'jinja' for the checkpoint's chat_template."
    ),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="Architecture to use (default: from config.json)."),
    context_window_size: Optional[int] = typer.Option(None, "--context-window-size", help="Longest sequence, in tokens."),
    prefill_chunk_size: Optional[int] = typer.Option(None, "--prefill-chunk-size", help="Most tokens per prefill step."),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="Most sequences decoded together."),
    sliding_window_size: Optional[int] = typer.Option(None, "--sliding-window-size", help="Sliding attention window (-1: off)."),
    overrides: Optional[str] = typer.Option(None, "--overrides", help='Model config overrides: "key=value;key=value".'),
    source_format: str = typer.Option("auto", "--source-format", help="Checkpoint format (default: detected)."),
):
    """Write mlc-chat-config.json (and copy the tokenizer) for converted weights."""
    from .pipeline.gen_config import gen_config

    path = gen_config(
        checkpoint, quantization, output, conv_template=conv_template, model_type=model_type,
        context_window_size=context_window_size, prefill_chunk_size=prefill_chunk_size,
        max_batch_size=max_batch_size, sliding_window_size=sliding_window_size, overrides=overrides,
        source_format=source_format,
    )
    typer.echo(f"config written to {path}")


app.command("convert_weight")(convert_weight_cmd)
app.command("convert-weight", hidden=True)(convert_weight_cmd)
app.command("gen_config")(gen_config_cmd)
app.command("gen-config", hidden=True)(gen_config_cmd)


@app.command("compile")
def compile_cmd(
    config: Path = typer.Argument(..., help="mlc-chat-config.json, or the directory holding it."),
    device: str = typer.Option(..., "--device", "-d", help="Device to compile for: cpu, ... (see `kiln plugins`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Model library to write (e.g. model-cpu.so)."),
    opt: Optional[str] = typer.Option(None, "--opt", help='Backend options: "key=value;key=value".'),
    overrides: Optional[str] = typer.Option(
        None, "--overrides", help='Change context_window_size, prefill_chunk_size, max_batch_size: "key=value;...".'
    ),
):
    """Compile a model library for a device."""
    from .pipeline.compile import compile_model

    out = compile_model(config, device, output, opt=opt, overrides=overrides)
    typer.echo(f"model library written to {out}")


# ---------------------------------------------------------------------------------- runtime
# the options every command that runs a model takes (chat, serve, bench)
def _model_arg():
    return typer.Argument(..., help="Packaged model name (smollm2), .gguf file, Hugging Face checkpoint directory or "
                                    "kiln model directory.")


def _model_lib_opt():
    return typer.Option(None, "--model-lib", help="Compiled model library (default: compiled and cached on first use).")


def _device_opt():
    return typer.Option("auto", "--device", "-d", help="Device to run on (auto: the best one present).")


def _quantization_opt():
    return typer.Option(None, "--quantization", "-q", help="Scheme when converting (default: the device's).")


def _backend_opt():
    return typer.Option(None, "--opt", help='Backend options when compiling, as for `kiln compile` (a cache entry '
                                            'of their own): e.g. "activations=int8" on CPUs.')


@app.command("chat")
def chat_cmd(
    model: str = _model_arg(),
    model_lib: Optional[Path] = _model_lib_opt(),
    device: str = _device_opt(),
    quantization: Optional[str] = _quantization_opt(),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this and exit (stdin works too)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (0: greedy)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Longest answer, in tokens."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    context_window_size: Optional[int] = typer.Option(None, "--context-window-size", help="Shorter context (less memory)."),
    max_total_tokens: Optional[int] = typer.Option(None, "--max-total-tokens", help="KV-cache size in tokens."),
    overrides: Optional[str] = typer.Option(
        None, "--overrides", help='Sizes compiled into the model library (a cache entry of its own): '
                                  '"context_window_size=4096;prefill_chunk_size=512;max_batch_size=16;'
                                  'sliding_window_size=N".'),
    opt: Optional[str] = _backend_opt(),
):
    """Chat with a model in the terminal (or answer one --prompt / stdin for scripts)."""
    from .runtime.chat_cli import interactive, one_shot
    from .runtime.chat_module import ChatModule, GenerationConfig

    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            from .errors import UsageError

            raise UsageError("no prompt: stdin was empty")
    config = GenerationConfig(temperature=temperature, max_gen_len=max_tokens, seed=seed)
    with ChatModule(model, model_lib, device, generation_config=config, quantization=quantization,
                    context_window_size=context_window_size, max_total_tokens=max_total_tokens,
                    overrides=overrides, opt=opt, front_end="chat") as cm:
        if prompt is not None:
            one_shot(cm, prompt)
        else:
            interactive(cm)


@app.command("serve")
def serve_cmd(
    model: str = _model_arg(),
    model_lib: Optional[Path] = _model_lib_opt(),
    device: str = _device_opt(),
    quantization: Optional[str] = _quantization_opt(),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="KILN_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on /v1 (the environment variable keeps it out of `ps`)."),
    allowed_origins: Optional[str] = typer.Option(
        None, "--allowed-origins", help="CORS: comma-separated origins that may call the API ('*': any)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests that may wait beyond a full batch; more get 429."),
    max_body_bytes: int = typer.Option(8 << 20, "--max-body-bytes", help="Largest request body; larger gets 413."),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="Most sequences decoded together."),
    context_window_size: Optional[int] = typer.Option(None, "--context-window-size", help="Shorter context (less memory)."),
    max_total_tokens: Optional[int] = typer.Option(None, "--max-total-tokens", help="KV-cache size in tokens."),
    overrides: Optional[str] = typer.Option(
        None, "--overrides", help='Sizes compiled into the model library (a cache entry of its own): '
                                  '"context_window_size=4096;prefill_chunk_size=512;max_batch_size=16;'
                                  'sliding_window_size=N".'),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache",
                                      help="Keep finished sequences' KV for later requests that share the prefix."),
    shutdown_grace: float = typer.Option(5.0, "--shutdown-grace", help="Seconds requests in flight may run on after "
                                                                        "SIGINT/SIGTERM before they are cancelled."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log every HTTP request."),
    opt: Optional[str] = _backend_opt(),
):
    """Serve a model through an OpenAI-compatible REST API (/v1/chat/completions, /v1/completions, ...)."""
    from .runtime.server import serve

    serve(model, model_lib, device, host=host, port=port, api_key=api_key, allowed_origins=allowed_origins,
          max_queue=max_queue, max_body_bytes=max_body_bytes, max_batch_size=max_batch_size,
          context_window_size=context_window_size, max_total_tokens=max_total_tokens, prefix_cache=prefix_cache,
          shutdown_grace=shutdown_grace, access_log=access_log, quantization=quantization, overrides=overrides,
          opt=opt)


_BENCH_HELP = "\n\n".join([
    "Measure a model's prefill and decode speed through the engine: random-token prompts, greedy, exactly M "
    "generated tokens, B requests at once; one warm-up run, then R runs; each figure is the median (min–max).",
    "prefill tok/s = prompt tokens / time to first token (B>1: all B prompts' tokens / time until the last "
    "request's first token, which is also the time to first token shown).",
    "decode tok/s per request = (M-1) / (time of its last token - time of its first token).",
    "aggregate decode tok/s (B>1) = tokens per second while all B requests are decoding: from the last request's "
    "first token to the first request's last token, B x the decode steps in that interval / its length.",
    "peak memory = the RSS high-water mark after the model is loaded.",
])


@app.command("bench", help=_BENCH_HELP)
def bench_cmd(
    model: str = _model_arg(),
    model_lib: Optional[Path] = _model_lib_opt(),
    device: str = _device_opt(),
    quantization: Optional[str] = _quantization_opt(),
    prompt_tokens: int = typer.Option(100, "--prompt-tokens", help="Prompt length N (random token ids, fixed seed)."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", help="Tokens M each request generates (greedy, ignore_eos)."),
    batch: int = typer.Option(1, "--batch", help="Requests B submitted at the same time."),
    runs: int = typer.Option(3, "--runs", help="Measured runs R (after one warm-up run)."),
    profile: bool = typer.Option(False, "--profile", help="Also print a per-kernel time table of one decode step."),
    overrides: Optional[str] = typer.Option(
        None, "--overrides", help='Sizes compiled into the model library, as for chat and serve '
                                  '(e.g. "max_batch_size=64" for --batch 64).'),
    opt: Optional[str] = _backend_opt(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    from .runtime.bench import bench, check_args

    check_args(prompt_tokens, gen_tokens, batch, runs)
    result = bench(model, model_lib, device, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, batch=batch,
                   runs=runs, profile=profile, quantization=quantization, overrides=overrides, opt=opt)
    typer.echo(result.to_json() if as_json else result.format())


# ---------------------------------------------------------------------------------- cache
cache_app = typer.Typer(help="The compile cache ($KILN_HOME, default ~/.cache/kiln).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List cached models and libraries."""
    from .pipeline.jit import kiln_home, list_entries

    entries = list_entries()
    if as_json:
        typer.echo(json.dumps({"home": str(kiln_home()), "entries": entries}, indent=2))
        return
    typer.echo(f"{kiln_home()}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for e in entries:
        state = "" if e["complete"] else "  [incomplete: rebuilt on next use]"
        state = "  [stale: built by other kiln code, never loaded; `kiln cache clear --stale`]" if e["stale"] else state
        typer.echo(f"  {Path(e['path']).name}  {e['size'] / 1e6:.1f} MB  {e['device']}  {e['source']}{state}")


@cache_app.command("clear")
def cache_clear_cmd(
    entries: Optional[list[str]] = typer.Argument(None, help="Entries to remove (default: all)."),
    stale: bool = typer.Option(False, "--stale", help="Only entries built by other kiln code (before an upgrade)."),
):
    """Remove cached models and libraries (all, the named entries, or the stale ones)."""
    from .pipeline.jit import clear

    removed = clear(entries, stale=stale)
    typer.echo(f"removed {removed} cache entr{'y' if removed == 1 else 'ies'}")


# ---------------------------------------------------------------------------------- plugins
@app.command("plugins")
def plugins_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List installed plugins: version, status and what each registered."""
    from .registry import get_registry

    reg = get_registry()
    rows = [info.to_dict() for info in reg.plugins.values()]
    if as_json:
        typer.echo(json.dumps({"kiln_version": __version__, "plugins": rows}, indent=2))
        return
    for row in rows:
        where = f"{row['distribution']} {row['version']}".strip() or row["module"]
        typer.echo(f"{row['name']}  [{row['status']}]  {where}")
        if row["error"]:
            typer.echo(f"    error: {row['error']}")
        for kind, names in sorted(row["registered"].items()):
            typer.echo(f"    {kind}: {', '.join(names)}")


# ---------------------------------------------------------------------------------- entry point
_commands_registered = False


def _register_plugin_commands():
    global _commands_registered
    if _commands_registered:
        return
    _commands_registered = True
    from .registry import get_registry

    registry = get_registry()
    for impl in registry.pm.hook.register_commands.get_hookimpls():
        info = registry.plugins.get(impl.plugin_name)
        if info is not None and info.status != "loaded":
            continue
        before = (len(app.registered_commands), len(app.registered_groups))
        try:  # one plugin's broken command must not take the CLI (and `kiln plugins`) down
            impl.function(app=app)
        except Exception as exc:  # noqa: BLE001 - isolate a broken plugin
            del app.registered_commands[before[0]:], app.registered_groups[before[1]:]  # none of its commands stay
            registry._fail(impl.plugin_name, f"register_commands raised {type(exc).__name__}: {exc}")
            log.warning("plugin '%s' failed to register its commands: %s (see `kiln plugins`)", impl.plugin_name, exc)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (staging directories, locks) runs as for
    Ctrl-C.  Not a KeyboardInterrupt: code that treats Ctrl-C as "stop this answer" (the chat REPL)
    must not swallow a request to end the process."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import threading

    debug = os.environ.get("KILN_DEBUG", "") not in ("", "0")
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _register_plugin_commands()
        app(args=argv, prog_name="kiln", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KilnError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            raise
        detail = str(exc).strip().splitlines()
        print(
            f"error: internal error: {type(exc).__name__}: {detail[-1] if detail else ''} "
            "(run with KILN_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 70
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
