"""`kiln bench` and kiln.runtime.bench on a tiny random Llama: every figure is printed, the JSON
holds sane values, the profile lists kernels, bad input is one line and a non-zero exit.

No timed assertions: only that the figures exist, are positive and count the right tokens.
"""

import json
import os
import subprocess
import sys

import pytest

from kiln.cli import main
from kiln.runtime.bench import BenchResult, make_prompts, measure, open_engine, run_bench
from kiln.testing import make_hf_checkpoint, write_byte_tokenizer

from test_engine import CONFIG  # the suite's tiny Llama

CONTEXT = 64
MAX_BATCH = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory, kiln_build):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt", CONFIG, init_std=0.1)
    write_byte_tokenizer(path)
    return kiln_build(path, "q0f32", conv_template="chatml", context_window_size=CONTEXT, prefill_chunk_size=32,
                      max_batch_size=MAX_BATCH)


def kiln(capsys, *args):
    code = main(["bench", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prints_every_figure(built, capsys):
    code, out, err = kiln(capsys, built.model_dir, "--model-lib", built.lib, "--prompt-tokens", 8, "--gen-tokens", 6,
                          "--runs", 2, "--batch", 2)
    assert code == 0, err
    for label in ("prefill", "time to first token", "decode", "aggregate decode", "peak memory", "generated tokens"):
        assert f"\n  {label} " in out, (label, out)
    assert "tok/s per request" in out and " ms" in out and " MB" in out
    assert "generated tokens       6 per request" in out
    assert "median (min–max) of 2 runs after 1 warm-up" in out


def test_json_fields_are_sane(built, capsys):
    code, out, err = kiln(capsys, built.model_dir, "--model-lib", built.lib, "--prompt-tokens", 10, "--gen-tokens", 7,
                          "--runs", 2, "--batch", 3, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert (res["prompt_tokens"], res["gen_tokens"], res["batch"], res["runs"]) == (10, 7, 3, 2)
    assert res["generated_tokens"] == 7
    for key in ("prefill_tok_s", "ttft_ms", "decode_tok_s", "aggregate_decode_tok_s"):
        fig = res[key]
        assert 0 < fig["min"] <= fig["median"] <= fig["max"], key
    assert res["peak_rss_mb"] > 0 and res["threads"] >= 1 and res["quantization"] == "q0f32"
    assert len(res["per_run"]) == 2
    for run in res["per_run"]:
        assert run["generated_tokens"] == [7, 7, 7]
        assert run["ttft_s"] > 0 and run["wall_s"] >= run["ttft_s"]
    assert res["profile"] is None


def test_single_request_has_no_aggregate(built, capsys):
    code, out, err = kiln(capsys, built.model_dir, "--model-lib", built.lib, "--prompt-tokens", 5, "--gen-tokens", 4,
                          "--runs", 1, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["aggregate_decode_tok_s"] is None and res["decode_tok_s"]["median"] > 0 and res["generated_tokens"] == 4


def test_profile_lists_kernels(built, capsys):
    code, out, err = kiln(capsys, built.model_dir, "--model-lib", built.lib, "--prompt-tokens", 12, "--gen-tokens", 3,
                          "--runs", 1, "--profile", "--json")
    assert code == 0, err
    res = json.loads(out)
    rows = res["profile"]
    assert rows and all(r["calls"] > 0 and r["us_per_step"] >= 0 for r in rows)
    names = {r["kernel"] for r in rows}
    assert any("matmul" in n for n in names), names
    assert res["profile_step_ms"] > 0
    code, out, err = kiln(capsys, built.model_dir, "--model-lib", built.lib, "--prompt-tokens", 12, "--gen-tokens", 3,
                          "--runs", 1, "--profile")
    assert code == 0, err
    assert "kernel profile of one decode step (1 sequence," in out and "us/step" in out and "uninstrumented step" in out
    # the profile is of a step of the benchmark's batch: every kernel runs once per step whatever the batch
    code, out, err = kiln(capsys, built.model_dir, "--model-lib", built.lib, "--prompt-tokens", 12, "--gen-tokens", 3,
                          "--runs", 1, "--batch", 2, "--profile", "--json")
    assert code == 0, err
    batched = json.loads(out)
    assert {r["kernel"]: r["calls"] for r in batched["profile"]} == {r["kernel"]: r["calls"] for r in rows}


def test_api_leaves_the_engine_usable(built):
    engine = open_engine(built.model_dir, built.lib, batch=2)
    try:
        result = run_bench(engine, prompt_tokens=9, gen_tokens=5, batch=2, runs=1, profile=True)
        assert isinstance(result, BenchResult) and result.generated_tokens == 5
        assert result.aggregate_decode_tok_s.median > 0
        assert engine.kv_pages_in_use() == 0  # the profiled sequence and the requests are gone
        timing = measure(engine, make_prompts(engine.model.vocab_size, 4, 1, seed=3), 2)
        assert timing.generated_tokens == [2]
        out = engine.completions.create(prompt=[1, 2, 3], max_tokens=3, temperature=0, ignore_eos=True)
        assert out.usage.completion_tokens == 3
    finally:
        engine.close()


def test_prompts_are_reproducible_and_in_the_vocabulary():
    a = make_prompts(260, 50, 2, seed=1)
    assert a == make_prompts(260, 50, 2, seed=1) and a[0] != a[1]
    assert all(0 <= t < 260 for p in a for t in p) and all(len(p) == 50 for p in a)


@pytest.mark.parametrize("args, code, message", [
    (["--prompt-tokens", 0], 2, "error: --prompt-tokens must be at least 1, got 0"),
    (["--gen-tokens", 0], 2, "error: --gen-tokens must be at least 1, got 0"),
    (["--runs", 0], 2, "error: --runs must be at least 1, got 0"),
    (["--prompt-tokens", 60, "--gen-tokens", 10], 2,
     f"error: --prompt-tokens 60 + --gen-tokens 10 = 70 tokens exceed the context window of {CONTEXT} tokens"),
    (["--batch", MAX_BATCH + 1], 2,
     f"error: --batch {MAX_BATCH + 1} is more than the engine allows ({MAX_BATCH}: the model library's "
     f"max_batch_size); add --overrides max_batch_size={MAX_BATCH + 1}"),
])
def test_bad_numbers(built, capsys, args, code, message):
    got, out, err = kiln(capsys, built.model_dir, "--model-lib", built.lib, *args)
    assert got == code and out == ""
    assert err.strip().splitlines()[-1] == message


def test_overrides_give_a_library_sized_for_the_batch(built, capsys, tmp_path, monkeypatch):
    """The hint of the batch error works: --overrides compiles (and caches) a library with room
    for the batch."""
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    code, out, err = kiln(capsys, built.model_dir, "--batch", MAX_BATCH + 2, "--overrides", f"max_batch_size={MAX_BATCH + 2}",
                          "--prompt-tokens", 8, "--gen-tokens", 4, "--runs", 1, "--json")
    assert code == 0, err
    assert json.loads(out)["batch"] == MAX_BATCH + 2


def test_errors_from_the_command_line(built, tmp_path):
    env = {**os.environ, "KILN_NO_PROGRESS": "1"}
    res = subprocess.run([sys.executable, "-m", "kiln.cli", "bench", str(tmp_path / "nowhere")], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"error: model '{tmp_path / 'nowhere'}' not found: give a kiln model directory, a Hugging Face checkpoint "
        "directory, a .gguf file, or the name of a packaged model (installed: smollm2)"]
    res = subprocess.run([sys.executable, "-m", "kiln.cli", "bench", str(built.model_dir), "--model-lib", str(built.lib),
                          "--gen-tokens", "-3"], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == ["error: --gen-tokens must be at least 1, got -3"]


def test_perf_kernels_finds_each_kernels_parallel_body(built):
    """bench/perf_kernels.py attributes samples through the address each ``__tvm_ffi_`` wrapper
    takes of its parallel body: every kernel of a compiled library that runs on the thread pool
    must have one (else the tool would charge its time to whatever symbol precedes it)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "perf_kernels.py"
    spec = importlib.util.spec_from_file_location("perf_kernels", script)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    names = list(tool.kernel_starts(str(built.lib)).values())
    bodies = [n for n in names if n.endswith("@body")]
    assert {"batch_decode_paged_kv_cpu@body", "rms_norm@body", "swiglu@body"} <= set(bodies)
    assert bodies.count("batch_decode_paged_kv_cpu@body") == 1  # string constants the wrapper loads are not bodies
    assert all("__tvm_ffi_" + b[:-len("@body")] in names for b in bodies)
    res = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "give the command to profile after --" in res.stderr


def _bench_table(script: str, args: list[str], unsupported: str, why: str) -> list[list[str]]:
    """Run ``bench/<script>`` with ``args`` and return its table's rows (after two header lines),
    split into fields; skip when the script exits 2 saying ``unsupported`` (a CPU it cannot run on)."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / script
    res = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=600)
    if res.returncode == 2 and unsupported in res.stderr:
        pytest.skip(why)
    assert res.returncode == 0, res.stderr
    return [line.split() for line in res.stdout.splitlines()[2:]]


@pytest.mark.parametrize("extra", [[], ["--int8"], ["--mcpu", "znver3"]], ids=["int16", "int8", "avx2"])
def test_interleaved_gemv_bench_runs_both_kernels_and_they_agree(extra):
    """bench/interleaved_gemv.py times kiln's interleaved projection kernel against its row-major
    one on the same weights, and exits 1 if their results disagree: on small shapes (a batch of 3
    among them) the two must agree, row for row."""
    from tvm.target import Target
    from tvm.target.codegen import llvm_cpu_has_features

    from kiln_backends.cpu import host_target

    if extra[:1] == ["--mcpu"] and not llvm_cpu_has_features(["avx2"], Target(host_target({}))):
        pytest.skip("this CPU cannot run code compiled for an AVX2 machine")
    rows = _bench_table("interleaved_gemv.py", ["--shapes", "32x64,48x96", "--batch", "1,3", *extra],
                        "needs AVX2 or AVX-512", "this CPU has neither AVX2 nor AVX-512, which the interleaved kernel is written for")
    assert [(r[0], r[1]) for r in rows] == [("32x64", "1"), ("32x64", "3"), ("48x96", "1"), ("48x96", "3")]
    assert all(float(r[-1]) < 1e-5 for r in rows)


def test_dot_peak_bench_measures_both_dot_products():
    """bench/dot_peak.py prints the multiply-adds a second of vpdpwssd (int16) and vpdpbusd
    (int8), alone and with the interleaved kernel's float work mixed in: the figures behind the
    README's ceiling for a batched decode step.  Four rows, positive rates, int8 twice int16's
    multiply-adds per instruction, and the float work never making the loop faster."""
    rows = _bench_table("dot_peak.py", ["--threads", "1", "--float-ops", "0,3", "--seconds", "0.05"],
                        "no VNNI", "this CPU has no VNNI dot products")
    assert [(r[1], r[2]) for r in rows] == [("int16", "0"), ("int16", "3"), ("int8", "0"), ("int8", "3")]
    instr = {(r[1], r[2]): float(r[3]) for r in rows}
    macs = {(r[1], r[2]): float(r[4]) for r in rows}
    assert all(v > 0 for v in instr.values())
    for name in ("int16", "int8"):
        assert instr[(name, "3")] <= instr[(name, "0")] * 1.15
    # the same instruction rate (within the noise of a shared machine) and twice the products
    assert macs[("int8", "0")] / instr[("int8", "0")] == pytest.approx(2 * macs[("int16", "0")] / instr[("int16", "0")], rel=0.01)


def test_step_floor_bench_sums_a_steps_projections_per_thread_count():
    """bench/step_floor.py times the CPU backend's projection kernel on each shape of a step, warm
    and streamed from memory, on 1 and 2 threads (a process each), and sums the step: the figures
    behind the README's bound on a batched decode step.  A row per shape and thread count, each
    total the calls-weighted sum of its rows, and the perfect-scaling line from the one-thread
    total; a malformed shape is refused with a message saying what a shape is."""
    from pathlib import Path

    # a total of about a millisecond, so that its printed digits (and the rows' 0.1 us) can tell sums apart
    shapes = [("256x1024", 4, 100), ("48x96", 8, 10)]
    rows = _bench_table("step_floor.py", ["--shapes", "256x1024x4x100,48x96x8x10", "--batch", "3", "--rounds", "1",
                                          "--stream-mb", "1"],
                        "needs AVX2 or AVX-512", "this CPU has neither AVX2 nor AVX-512, which the interleaved kernel is written for")
    table, after = rows[:rows.index([])], rows[rows.index([]) + 1:]
    assert [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in table] == [
        (s, b, c, t) for s, b, c in shapes for t in (1, 2)]
    warm = {(r[0], int(r[3])): float(r[4]) for r in table}
    streamed = {(r[0], int(r[3])): float(r[5]) for r in table}
    assert all(v > 0 for v in [*warm.values(), *streamed.values()])
    totals = [r for r in after if r[:2] == ["step's", "projections,"]]
    assert len(totals) == 2
    for fields, t in zip(totals, (1, 2)):
        want = sum(streamed[(s, t)] * c for s, _, c in shapes) / 1e3
        assert float(fields[fields.index("streamed") + 1]) == pytest.approx(want, rel=0.02)
    perfect = next(r for r in after if r[:5] == ["perfect", "scaling", "to", "2", "threads:"])
    one = sum(streamed[(s, 1)] * c for s, _, c in shapes) / 1e3
    assert float(perfect[5]) == pytest.approx(one / 2, rel=0.02)
    bad = subprocess.run([sys.executable, Path(__file__).resolve().parent.parent / "bench" / "step_floor.py", "--shapes", "3072x576"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "expected NxKxBITSxCALLS" in bad.stderr
