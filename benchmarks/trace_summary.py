"""Where a traced step's device time goes: a summary of a JAX Perfetto trace.

  python benchmarks/trace_summary.py TRACE [--process=REGEX] [--thread=REGEX] [--top=15]
      [--steps=N]

TRACE is a ``perfetto_trace.json.gz`` written by ``jax.profiler.start_trace(...,
create_perfetto_trace=True)`` (``bench_train.py --profile_dir`` writes one per
measurement), or a folder holding one. The events of the chosen threads (process name
matching ``--process``, default ``^/device:``, the GPU / TPU devices; thread name matching
``--thread``, default ``Stream``, the CUDA streams and their kernels; ``--thread="XLA Ops"``
gives the same time by HLO op instead) are summed by name and sorted into kinds:

  matmul     cuBLAS / cuBLASLt / CUTLASS / Triton GEMM kernels, XLA dot fusions
  attention  cuDNN fused attention (flash) kernels, XLA softmax fusions
  conv       cuDNN convolution kernels (forward, data and weight gradients)
  copy       memory copies and sets (host <-> device and on the device)
  fusion     XLA's other fused elementwise / reduction kernels
  other      the rest

It prints one JSON line (``span_us``: first event start to last event end over the
streams; ``busy_us``: the union of the events' intervals, so overlapping streams count
once; ``idle_fraction``: 1 - busy / span, where the device waited for the host;
``kernels``: the outermost events of each stream, which ``kinds`` and ``top`` sum; ``kinds``:
microseconds per kind; ``top``: the longest kernels with their calls and microseconds),
then a readable table on stderr. With ``--steps`` the per-step figures are added.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

KINDS = (
    ("attention", r"fmha|flash|cudnn.*(attn|attention|sdpa)|softmax"),
    ("conv", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|xmma|dot|matmul|sm\d+_.*mma|triton_"),
    ("copy", r"memcpy|memset|copy|transpose|dynamic.update.slice"),
    ("fusion", r"fusion|reduce|loop_|input_|broadcast|convert|select|add|multiply"),
)
DEFAULT_PROCESS = r"^/device:"
DEFAULT_THREAD = r"Stream"


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


def find_trace(path: Path) -> Path:
    if path.is_dir():
        found = sorted(path.rglob("perfetto_trace.json.gz"))
        if not found:
            raise SystemExit(f"trace_summary: no perfetto_trace.json.gz under {path}")
        return found[-1]
    return path


def load_events(path: Path, process: str, thread: str) -> list[dict]:
    """The complete ('X') events of the threads whose process and thread names match."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    process_re, thread_re = re.compile(process), re.compile(thread)
    chosen, seen = [], collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        names = (processes.get(e.get("pid"), ""), threads.get((e.get("pid"), e.get("tid")), ""))
        seen[names] += 1
        if process_re.search(names[0]) and thread_re.search(names[1]):
            chosen.append(e)
    if not chosen:
        listing = "; ".join(f"{p!r} / {t!r} ({n})" for (p, t), n in seen.most_common(20))
        raise SystemExit(f"trace_summary: no events of a thread matching --process={process!r} "
                         f"--thread={thread!r} in {path}; the trace has (process / thread "
                         f"(events)): {listing}")
    return chosen


def busy_time(events: list[dict]) -> float:
    """The length of the union of the events' [ts, ts + dur] intervals."""
    total, end = 0.0, None
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarize(events: list[dict], *, top: int = 15, steps: int | None = None) -> dict:
    if not events:
        raise SystemExit("trace_summary: no events on the selected threads (see --process, "
                         "--thread)")
    # Nested events (an op's "end:" marker inside the op, an executor span around its ops)
    # would count twice: keep the outermost events of each thread. Kernels on GPU streams do
    # not nest, so there every kernel is kept.
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    leaves = []
    for group in by_thread.values():
        group.sort(key=lambda e: (e["ts"], -e["dur"]))
        enclosing_end = None
        for e in group:
            if enclosing_end is not None and e["ts"] + e["dur"] <= enclosing_end:
                continue
            leaves.append(e)
            enclosing_end = e["ts"] + e["dur"]
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    busy = busy_time(events)
    per_name = collections.defaultdict(lambda: [0, 0.0])
    kinds = collections.Counter()
    for e in leaves:
        per_name[e["name"]][0] += 1
        per_name[e["name"]][1] += e["dur"]
        kinds[kind_of(e["name"])] += e["dur"]
    ranked = sorted(per_name.items(), key=lambda item: -item[1][1])[:top]
    leaf_total = sum(kinds.values())
    out = {
        "events": len(events), "kernels": len(leaves), "span_us": round(span, 1),
        "busy_us": round(busy, 1), "idle_fraction": round(1 - busy / span, 4) if span else None,
        "kernel_us": round(leaf_total, 1),
        "kinds": {k: round(v, 1) for k, v in kinds.most_common()},
        "kind_fractions": {k: round(v / leaf_total, 4) for k, v in kinds.most_common()},
        "top": [{"name": name, "kind": kind_of(name), "calls": calls, "us": round(us, 1)}
                for name, (calls, us) in ranked],
    }
    if steps:
        out["steps"] = steps
        out["span_us_per_step"] = round(span / steps, 1)
        out["busy_us_per_step"] = round(busy / steps, 1)
    return out


def table(summary: dict) -> str:
    rows = [f"span {summary['span_us'] / 1e3:.2f} ms, busy {summary['busy_us'] / 1e3:.2f} ms "
            f"(idle {100 * (summary['idle_fraction'] or 0):.1f} %), "
            f"{summary['kernels']} kernels"]
    for kind, us in summary["kinds"].items():
        share = 100 * summary["kind_fractions"][kind]
        rows.append(f"  {kind:<10} {us / 1e3:9.2f} ms  {share:5.1f} %")
    rows.append(f"  {'calls':>6} {'ms':>9}  kind       name")
    for item in summary["top"]:
        rows.append(f"  {item['calls']:>6} {item['us'] / 1e3:9.3f}  {item['kind']:<10} "
                    f"{item['name'][:90]}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--process", default=DEFAULT_PROCESS,
                        help="regex over process names (default: the devices)")
    parser.add_argument("--thread", default=DEFAULT_THREAD,
                        help="regex over thread names (default: the CUDA streams)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--steps", type=int, default=None,
                        help="steps in the trace, for per-step figures")
    args = parser.parse_args(argv)
    path = find_trace(args.trace)
    events = load_events(path, args.process, args.thread)
    summary = summarize(events, top=args.top, steps=args.steps)
    summary["trace"] = str(path)
    print(json.dumps(summary))
    print(table(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
