"""Where a running kiln process spends its CPU time, kernel by kernel, sampled with Linux perf.

    python bench/perf_kernels.py --warmup 30 --seconds 20 -- kiln bench smollm2 --batch 8 --runs 40

starts the command, waits ``--warmup`` seconds (compilation, loading, the first runs), records
``perf record -e cpu-clock`` of its process for ``--seconds``, stops it, and prints the share of samples
per kernel of the compiled model library, and per symbol elsewhere (TVM's runtime, the kernel's
scheduler: a TVM worker waiting at a barrier shows up as ``__schedule``/``sched_yield``).

Unlike ``kiln bench --profile``, nothing is instrumented: the figures include what the VM's
profiler cannot see (cache misses caused by neighbours, idle threads).  The kernels' parallel
bodies have no symbols of their own; each ``__tvm_ffi_NAME`` wrapper takes the address of its
body (``lea``), which is how samples are attributed to ``NAME@body``.  Needs ``perf`` and
``objdump`` (binutils) and permission to attach (``kernel.perf_event_paranoid`` <= 1, or root).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def kernel_starts(lib: str) -> dict[int, str]:
    """Start address -> name of every function of ``lib`` and of each wrapper's parallel body."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", lib], capture_output=True, text=True, check=True).stdout
    starts: dict[int, str] = {}
    code: set[int] = set()  # instruction addresses: a lea of a string constant is not a body
    bodies: dict[int, str] = {}
    current = None
    for line in dis.splitlines():
        head = re.match(r"^([0-9a-f]+) <(.+)>:", line)
        if head:
            current = head.group(2)
            starts[int(head.group(1), 16)] = current
            continue
        insn = re.match(r"^\s+([0-9a-f]+):", line)
        if insn:
            code.add(int(insn.group(1), 16))
        if current and current.startswith("__tvm_ffi_"):
            target = re.search(r"lea\s+-?0x[0-9a-f]+\(%rip\),%\w+\s+# ([0-9a-f]+)", line)
            if target:
                bodies.setdefault(int(target.group(1), 16), current[len("__tvm_ffi_"):] + "@body")
    for address, name in bodies.items():
        if address in code and address not in starts:
            starts[address] = name
    return starts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=float, default=30, help="seconds before recording starts")
    ap.add_argument("--seconds", type=float, default=20, help="seconds to record")
    ap.add_argument("--top", type=int, default=30, help="rows to print")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to profile after --")
    for tool in ("perf", "objdump"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed", file=sys.stderr)
            return 2
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        time.sleep(args.warmup)
        if proc.poll() is not None:
            print(f"error: the command ended (exit {proc.returncode}) before recording started; "
                  "lower --warmup or give it more work", file=sys.stderr)
            return 2
        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-p", str(proc.pid), "-o", str(data),
                        "--", "sleep", str(args.seconds)], check=True, stdout=subprocess.DEVNULL)
        if proc.poll() is None:  # what was to be seen is recorded; left running, it would disturb what follows
            proc.terminate()
        proc.wait()
        mmaps = subprocess.run(["perf", "script", "-i", str(data), "--show-mmap-events"], capture_output=True, text=True).stdout
        samples = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,dso,sym"], capture_output=True,
                                 text=True).stdout
    # executable mappings of compiled model libraries: [start(len) @ file offset] ... r-xp PATH
    libs = {}
    for m in re.finditer(r"\[0x([0-9a-f]+)\(0x([0-9a-f]+)\) @ 0x([0-9a-f]+) [^\]]*\]: r-xp (\S+\.so)", mmaps):
        path = m.group(4)
        if "/lib-" in path or path.endswith("lib.so"):
            libs[path] = (int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16))
    tables = {path: kernel_starts(path) for path in libs}
    ordered = {path: sorted(table) for path, table in tables.items()}
    counts: collections.Counter = collections.Counter()
    for line in samples.splitlines():
        parts = line.split(None, 1)
        if len(parts) < 2:
            continue
        ip = int(parts[0], 16)
        for path, (start, length, offset) in libs.items():
            if start <= ip < start + length:
                table, keys = tables[path], ordered[path]
                i = bisect.bisect_right(keys, ip - start + offset) - 1
                counts["kernel " + (table[keys[i]] if i >= 0 else "?")] += 1
                break
        else:
            counts[parts[1].strip()] += 1
    total = sum(counts.values())
    if not total:
        print("error: no samples (is perf allowed to attach? see kernel.perf_event_paranoid)", file=sys.stderr)
        return 2
    print(f"{total} samples over {args.seconds:.0f} s")
    for name, n in counts.most_common(args.top):
        print(f"{100 * n / total:6.2f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
