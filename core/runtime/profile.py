"""Per-kernel timing of one model call, through the Relax VM's instrumentation hook.

This TVM build has no VM profiler, so kiln times every call instruction itself: the VM calls
an instrument function before and after each kernel/builtin, and the wall time in between is
attributed to that function's symbol.  The hook costs a few microseconds per call (reported
separately as overhead), so the table shows where the time goes, not exact totals.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class KernelTime:
    name: str
    calls: int
    seconds: float


def profile_decode(model, steps: int = 5, seq_ids: list[int] | None = None) -> tuple[list[KernelTime], float]:
    """Run ``steps`` decode steps of a :class:`LoadedModel` (whose KV cache is created and holds
    the sequences ``seq_ids``, default ``[0]``), all sequences in one batched step, with every VM
    call timed; return per-kernel times averaged per step (slowest first) and the plain
    (uninstrumented) seconds per step for comparison.  The sequences are left as they were (the
    steps' tokens are popped again).  Only the thread that owns the model may call this (in an
    engine: its scheduler thread)."""
    seq_ids = list(seq_ids) if seq_ids is not None else [0]
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    started: list[float] = []

    def instrument(func, symbol, before_run, ret_value, *args):
        if before_run:
            started.append(time.perf_counter())
        else:
            entry = totals[str(symbol)]
            entry[0] += 1
            entry[1] += time.perf_counter() - started.pop()
        return 0

    def step():
        model.decode(seq_ids, [5] * len(seq_ids))

    for _ in range(2):  # warm-up
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    plain = (time.perf_counter() - t0) / steps
    model.vm.set_instrument(_convert(instrument))
    try:
        for _ in range(steps):
            step()
    finally:
        model.vm.set_instrument(_convert(lambda *a: 0))
    rows = [KernelTime(name, calls // steps, secs / steps) for name, (calls, secs) in totals.items()]
    rows.sort(key=lambda r: -r.seconds)
    for seq in seq_ids:
        model.popn(seq, 2 * steps + 2)
    return rows, plain


def _convert(fn):
    import tvm_ffi

    return tvm_ffi.convert(fn)


def format_table(rows: list[KernelTime], plain: float, top: int = 25) -> str:
    total = sum(r.seconds for r in rows)
    lines = [f"{'kernel':48s} {'calls':>5s} {'us/step':>9s} {'share':>6s}"]
    for r in rows[:top]:
        lines.append(f"{r.name[:48]:48s} {r.calls:5d} {r.seconds * 1e6:9.1f} {100 * r.seconds / total:5.1f}%")
    rest = rows[top:]
    if rest:
        lines.append(f"{'(' + str(len(rest)) + ' more)':48s} {sum(r.calls for r in rest):5d} "
                     f"{sum(r.seconds for r in rest) * 1e6:9.1f} {100 * sum(r.seconds for r in rest) / total:5.1f}%")
    lines.append(f"instrumented total {total * 1e3:.2f} ms/step; uninstrumented step {plain * 1e3:.2f} ms "
                 f"({1 / plain:.1f} tok/s)")
    return "\n".join(lines)


__all__ = ["KernelTime", "profile_decode", "format_table"]
