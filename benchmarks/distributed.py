"""Meta-training throughput with 1 and 2 processes under torchrun, in tasks per second.

Each measurement trains a fresh run with `fewshot train` as a user would launch it, and reads the
clock its metrics.jsonl records every 10 iterations: tasks/s = meta_batch * (iterations after
the warm-up) / (seconds between the warm-up's record and the last). Process start, data loading
and the final validation are outside that window. The configurations (processes x threads per
process) alternate within each repeat; the table gives medians and the ratio to one process
with one thread.

    python benchmarks/distributed.py [--repeats 3] [--workloads omniglot,sinusoid]

Omniglot is read from $FEWSHOT_DATA_ROOT (default ../shared/data/omniglot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 10  # iterations before the timed window (metrics are recorded every 10)
# (processes, threads per process)
CONFIGURATIONS = [(1, 1), (1, 2), (2, 1)]
WORKLOADS = {
    # Finn et al.'s Omniglot MAML: Conv4, 5-way 1-shot, 15 queries, 32 tasks per meta-batch,
    # one second-order inner step (as in training).
    "omniglot": {
        "iterations": 20,
        "options": ["--algorithm", "maml", "--dataset", "omniglot", "--meta-batch", "32"],
    },
    # Finn et al.'s sinusoid MAML, 16 tasks per meta-batch: a small model, where each step's
    # communication is large beside its computation.
    "sinusoid": {
        "iterations": 410,
        "options": ["--algorithm", "maml", "--dataset", "sinusoid", "--meta-batch", "16"],
    },
}


def tasks_per_second(workload: str, processes: int, threads: int) -> float:
    """One fresh run of `workload` under torchrun; its tasks per second after the warm-up."""
    settings = WORKLOADS[workload]
    iterations = settings["iterations"]
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc-per-node", str(processes), "-m", "fewshot", "train"),
            *settings["options"],
            *("--iterations", str(iterations), "--val-every", str(iterations)),
            *("--val-episodes", "2", "--test-episodes", "0", "--device", "cpu"),
            *("--threads", str(threads), "--out", str(run)),
        ]
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    clock = {r["iteration"]: r["seconds"] for r in records if "split" not in r}
    meta_batch = int(settings["options"][settings["options"].index("--meta-batch") + 1])
    return meta_batch * (iterations - WARMUP) / (clock[iterations] - clock[WARMUP])


def measure(workloads: list[str], repeats: int) -> dict:
    samples = {(w, p, t): [] for w in workloads for p, t in CONFIGURATIONS}
    for repeat in range(repeats):
        for workload in workloads:
            for processes, threads in CONFIGURATIONS:
                value = tasks_per_second(workload, processes, threads)
                samples[(workload, processes, threads)].append(value)
                print(
                    f"repeat {repeat + 1}/{repeats} {workload}: {processes} process(es) x "
                    f"{threads} thread(s): {value:.1f} tasks/s",
                    flush=True,
                )
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "repeats": repeats,
        "rows": [
            {
                "workload": w,
                "processes": p,
                "threads_per_process": t,
                "tasks_per_second": values,
                "median": statistics.median(values),
            }
            for (w, p, t), values in samples.items()
        ],
    }


def table(results: dict) -> str:
    lines = [
        "| workload | processes x threads | tasks/s (median) | vs 1 x 1 | repeats |",
        "|---|---|---|---|---|",
    ]
    base = {
        r["workload"]: r["median"]
        for r in results["rows"]
        if r["processes"] == 1 and r["threads_per_process"] == 1
    }
    for r in results["rows"]:
        values = ", ".join(f"{v:.1f}" for v in r["tasks_per_second"])
        lines.append(
            f"| {r['workload']} | {r['processes']} x {r['threads_per_process']} | "
            f"{r['median']:.1f} | x{r['median'] / base[r['workload']]:.2f} | {values} |"
        )
    machine = results["machine"]
    return (
        f"Machine: {machine['cpus']} CPUs ({machine['processor']}), torch {machine['torch']}.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    out = ROOT / "benchmarks" / "results-distributed"
    parser.add_argument("--json-out", type=Path, default=out.with_suffix(".json"))
    parser.add_argument("--md-out", type=Path, default=out.with_suffix(".md"))
    args = parser.parse_args()
    os.environ.setdefault("FEWSHOT_DATA_ROOT", str(ROOT.parent / "shared/data/omniglot"))
    results = measure(args.workloads.split(","), args.repeats)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    report = table(results)
    args.md_out.write_text(
        "# Meta-training throughput with 1 and 2 processes\n\n"
        "`python benchmarks/distributed.py` (see its docstring for the method).\n\n" + report
    )
    print(report)


if __name__ == "__main__":
    main()
