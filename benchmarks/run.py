"""fewshot's benchmark against learn2learn and higher, all measured in one run.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--malloc tuned|lean|default]
        [--rounds N]

The parent process runs nothing itself: it spawns one fresh child process per
(workload, library), `run.py --single WORKLOAD --library LIB`, so that each peak-memory figure
(ru_maxrss) belongs to that pair alone and no library warms caches or allocators for another.
Children run one after another under the same interpreter, torch, thread count and allocator
settings; each prints one JSON line, which the parent collects into a markdown table and a JSON
file. Speed-ups are ratios of medians measured in this same run.

Use the interpreter of benchmarks/.peers-venv (benchmarks/run.sh does), which holds torch,
learn2learn and higher; fewshot is imported from src/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# `--malloc`'s allocator settings: `fewshot.cli`'s TUNED_MALLOC (what `fewshot` starts under,
# which keeps freed memory in the process) and LEAN_MALLOC (what `fewshot train
# --checkpoint-inner` starts under), copied so that this parent imports neither torch nor
# fewshot (tests/benchmarks/test_run.py keeps the copies equal).
MALLOC_SETTINGS: dict[str, dict[str, str]] = {
    "tuned": {
        "MALLOC_MMAP_THRESHOLD_": "10000000000",
        "MALLOC_TRIM_THRESHOLD_": "10000000000",
        "MALLOC_TOP_PAD_": "1000000000",
    },
    "lean": {
        "MALLOC_MMAP_THRESHOLD_": "6291456",
        "MALLOC_TRIM_THRESHOLD_": "67108864",
        "THP_MEM_ALLOC_ENABLE": "1",
    },
    "default": {},
}
# The variables `--malloc` sets (each child gets the chosen ones in place of the parent's).
SET_VARS = tuple(dict.fromkeys(name for settings in MALLOC_SETTINGS.values() for name in settings))
# The variables a child's allocator reads, recorded in each result.
ALLOCATOR_VARS = (*SET_VARS, "MALLOC_ARENA_MAX", "LD_PRELOAD", "PYTORCH_CUDA_ALLOC_CONF")
CHILD_TIMEOUT_S = 1800
RESULT_PREFIX = "FEWSHOT_BENCH_RESULT "


# --- child: one (workload, library) per process -------------------------------------------------


def run_single(
    workload_name: str,
    library: str,
    device: str,
    quick: bool,
    chunk_size: int | None = None,
    queries: int | None = None,
) -> dict:
    """Build, time and measure one library on one workload in this (fresh) process."""
    import builders
    import torch
    import workloads

    workload = workloads.WORKLOADS[workload_name]
    if queries is not None:
        workload = dataclasses.replace(workload, queries=queries)
    started = time.perf_counter()
    bench = builders.build(workload, library, device, chunk_size)
    setup_s = time.perf_counter() - started
    rss_after_setup = current_rss_mib()
    sync = cuda_sync if device == "cuda" else no_sync
    warmup, repeats, steps = schedule(workload, quick)
    times = measure(bench.step, warmup, repeats, steps, sync)
    result = {
        "workload": workload.name,
        "library": library,
        "package": builders.package_version(library)[0],
        "package_version": builders.package_version(library)[1],
        "unit": workload.unit,
        "units_per_step": bench.units_per_step,
        "warmup_steps": warmup,
        "repeats": repeats,
        "steps_per_repeat": steps,
        "seconds_per_step": times,
        "median_s": median(times),
        "check": bench.check,
        "setup_s": setup_s,
        "rss_after_setup_mib": rss_after_setup,
        # Read before any FLOP counting below, which is not part of the workload.
        "peak_rss_mib": peak_rss_mib(),
        "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "flops_per_step": bench.flops_per_step,
        "env": child_environment(device),
    }
    if workload.count_allocations:
        result["peak_allocated_mib"] = peak_allocated_mib(lambda: bench.step(0), device)
    if workload.count_flops:
        result["flops_executed"] = count_flops(lambda: bench.step(0))
        if bench.reference_flops is not None:
            result["flops_reference"] = bench.reference_flops()
    return result


def schedule(workload, quick: bool) -> tuple[int, int, int]:
    """(warm-up steps, timed repeats, steps per repeat); `--quick` cuts all three for smoke runs."""
    if quick:
        return 1, 2, max(1, workload.steps_per_repeat // 10)
    return workload.warmup, workload.repeats, workload.steps_per_repeat


def measure(
    step: Callable[[int], object], warmup: int, repeats: int, steps: int, sync: Callable[[], None]
) -> list[float]:
    """Seconds per step of each timed repeat, after `warmup` untimed steps.

    The clock stops only after the device has finished (`sync`), and garbage collection runs
    before each repeat so that no repeat pays for the previous one's garbage.
    """
    i = 0
    for _ in range(warmup):
        step(i)
        i += 1
    times = []
    for _ in range(repeats):
        gc.collect()
        sync()
        started = time.perf_counter()
        for _ in range(steps):
            step(i)
            i += 1
        sync()
        times.append((time.perf_counter() - started) / steps)
    return times


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs one step executes, by torch's FlopCounterMode (matmuls and convolutions only)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def peak_allocated_mib(step: Callable[[], object], device: str) -> float:
    """The most memory torch's allocator held for tensors during one `step`, above what it
    held before: the memory the step needs, without the freed memory that the C allocator
    keeps and RSS counts. CUDA: `max_memory_allocated`; CPU: the profiler's record of every
    allocation and free, summed in order."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in changes:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


def cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def no_sync() -> None:
    pass


def current_rss_mib() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_environment(device: str) -> dict:
    """What the numbers depend on, as this child process saw it."""
    import torch

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "allocator_env": {name: os.environ.get(name) for name in ALLOCATOR_VARS},
        "glibc": " ".join(platform.libc_ver()),
        "fewshot_path": str(Path(sys.modules["fewshot"].__file__).parent),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return env


# --- parent: spawn, collect, report ---------------------------------------------------------------


def child_env(malloc: str) -> dict[str, str]:
    """The environment of every child: the chosen allocator settings (`MALLOC_SETTINGS`, in
    place of any of theirs in this environment), fewshot's src/ on the path."""
    env = {k: v for k, v in os.environ.items() if k not in SET_VARS}
    env.update(MALLOC_SETTINGS[malloc])
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(python: str, workload: str, library: str, args: argparse.Namespace, env: dict) -> dict:
    """Run one child and return its result, or a record of how it failed."""
    command = [python, str(Path(__file__).resolve()), "--single", workload, "--library", library]
    command += ["--device", args.device] + (["--quick"] if args.quick else [])
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    if args.queries is not None:
        command += ["--queries", str(args.queries)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            command, env=env, cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return failure(workload, library, f"timed out after {CHILD_TIMEOUT_S} s")
    wall_s = time.perf_counter() - started
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result["process_wall_s"] = wall_s
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return failure(workload, library, f"exit code {proc.returncode}: " + " | ".join(tail))


def failure(workload: str, library: str, error: str) -> dict:
    """A result entry for a child that produced no result."""
    return {"workload": workload, "library": library, "error": error}


def machine_info() -> dict:
    """CPU model, core counts, host and date, read by the parent."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def git_revision() -> str:
    """The commit benchmarked, marked dirty when src/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' (src/ modified)' if dirty else ''}" if head else "unknown"


def run_all(args: argparse.Namespace) -> dict:
    """Every selected (workload, library) in its own child, the matmul reference first."""
    import workloads

    names = args.workloads or list(workloads.WORKLOADS)
    if "matmul" not in names:
        names = ["matmul", *names]
    env = child_env(args.malloc)
    rows = [
        (name, library)
        for name in names
        for library in workloads.WORKLOADS[name].libraries
        if not args.libraries or library in (*args.libraries, "torch")
    ]
    rounds: dict[tuple[str, str], list[dict]] = {row: [] for row in rows}
    for round_ in range(args.rounds):
        # Every other round in reverse order, so a machine that slows down or speeds up over
        # the run weighs on every row alike.
        for name, library in rows if round_ % 2 == 0 else rows[::-1]:
            print(f"[bench] {name} / {library} ...", end=" ", flush=True, file=sys.stderr)
            result = spawn(args.python, name, library, args, env)
            rounds[(name, library)].append(result)
            print(progress_line(result), flush=True, file=sys.stderr)
    results = [merge_rounds(rounds[row]) for row in rows]
    return {
        "meta": {
            **machine_info(),
            "device": args.device,
            "malloc": args.malloc,
            "allocator_env_set_for_children": MALLOC_SETTINGS[args.malloc],
            "quick": args.quick,
            "chunk_size": args.chunk_size,
            "queries": args.queries,
            "rounds": args.rounds,
            "python": args.python,
            "git": git_revision(),
            "command": " ".join(sys.argv),
        },
        "results": results,
    }


def merge_rounds(results: list[dict]) -> dict:
    """One row from its rounds (fresh processes): every timed step of every round, their
    median, and the memory figures of the round with the highest peak RSS; the first error if
    a round failed."""
    failed = [r for r in results if "error" in r]
    if failed or len(results) == 1:
        return (failed or results)[0]
    merged = dict(max(results, key=lambda r: r["peak_rss_mib"]))
    merged["seconds_per_step"] = [s for r in results for s in r["seconds_per_step"]]
    merged["median_s"] = median(merged["seconds_per_step"])
    merged["repeats"] = sum(r["repeats"] for r in results)
    merged["round_medians_s"] = [r["median_s"] for r in results]
    merged["round_peak_rss_mib"] = [r["peak_rss_mib"] for r in results]
    return merged


def progress_line(result: dict) -> str:
    """A short line for stderr while the run goes on."""
    if "error" in result:
        return f"FAILED ({result['error']})"
    return (
        f"{result['median_s'] * 1e3:.2f} ms/step, peak RSS {result['peak_rss_mib']:.0f} MiB "
        f"({result['process_wall_s']:.0f} s)"
    )


def median(values: list[float]) -> float:
    """The median (mean of the middle two for an even count)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke test")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--malloc",
        choices=tuple(MALLOC_SETTINGS),
        default="tuned",
        help="allocator settings in every child: tuned, those `fewshot` starts under (freed memory "
        "kept); lean, those of `fewshot train --checkpoint-inner`; default, none",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        help="tasks per vectorised pass for fewshot's MAML, Meta-SGD and ANIL rows, instead of "
        "the command line's",
    )
    parser.add_argument(
        "--queries",
        type=int,
        help="queries per class for every selected workload, instead of its paper's",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every row this many times, in fresh processes, every other round in reverse "
        "order; times pool all rounds' steps, memory is the round with the highest peak",
    )
    parser.add_argument("--workloads", type=lambda s: s.split(","), help="comma-separated subset")
    parser.add_argument("--libraries", type=lambda s: s.split(","), help="comma-separated subset")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the children")
    parser.add_argument("--json-out", type=Path, help="default benchmarks/results[-quick].json")
    parser.add_argument("--md-out", type=Path, help="default benchmarks/results[-quick].md")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    suffix = "-quick" if args.quick else ""
    args.json_out = args.json_out or HERE / f"results{suffix}.json"
    args.md_out = args.md_out or HERE / f"results{suffix}.md"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.single:
        result = run_single(
            args.single, args.library, args.device, args.quick, args.chunk_size, args.queries
        )
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    import report

    data = run_all(args)
    data["summary"] = report.summarize(data["results"])
    markdown = report.markdown(data)
    args.json_out.write_text(json.dumps(data, indent=2) + "\n")
    args.md_out.write_text(markdown)
    print(markdown)
    print(f"[bench] wrote {args.json_out} and {args.md_out}", file=sys.stderr)
    return 1 if any("error" in r for r in data["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
