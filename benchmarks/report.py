"""Turns the children's results into derived figures (speed-ups, FLOP rates) and markdown.

Every ratio here divides two medians measured in the same run of run.py, on the same machine,
under the same interpreter, torch and allocator settings.
"""

from __future__ import annotations

from workloads import WORKLOADS, label

BASELINE = "fewshot"  # speed-ups are given relative to this library's row
CHECK_TOLERANCE = 1e-3  # relative; float32 rounding differs between implementations


def summarize(results: list[dict]) -> dict:
    """Per-row derived figures, keyed "workload/library", plus the matmul reference rate."""
    ok = [r for r in results if "error" not in r]
    matmul = next((r for r in ok if r["workload"] == "matmul"), None)
    matmul_gflops = matmul["flops_per_step"] / matmul["median_s"] / 1e9 if matmul else None
    baselines = {r["workload"]: r for r in ok if r["library"] == BASELINE}
    rows = {}
    for r in ok:
        base = baselines.get(r["workload"])
        rows[f"{r['workload']}/{r['library']}"] = derived(r, base, matmul_gflops)
    return {"matmul_gflops": matmul_gflops, "rows": rows}


def derived(result: dict, base: dict | None, matmul_gflops: float | None) -> dict:
    """Throughput, speed-up over the baseline row, FLOP rates and agreement with the baseline."""
    per_unit = result["median_s"] / result["units_per_step"]
    row: dict = {
        "throughput_per_s": 1 / per_unit,
        "min_s": min(result["seconds_per_step"]),
        "max_s": max(result["seconds_per_step"]),
    }
    if base is not None:
        # How many times faster the baseline is than this row, per task or episode.
        row["baseline_speedup"] = per_unit / (base["median_s"] / base["units_per_step"])
        reference = base.get("flops_reference")
        if reference:
            row["reference_gflops_per_s"] = reference / result["median_s"] / 1e9
            if matmul_gflops:
                row["fraction_of_matmul"] = row["reference_gflops_per_s"] / matmul_gflops
        row["check_rel_diff"] = {
            key: abs(value - base["check"][key]) / max(abs(base["check"][key]), 1e-12)
            for key, value in result["check"].items()
            if key in base["check"]
        }
    if result.get("flops_executed"):
        row["executed_gflops_per_s"] = result["flops_executed"] / result["median_s"] / 1e9
    if result.get("flops_per_step"):
        row["gflops_per_s"] = result["flops_per_step"] / result["median_s"] / 1e9
    return row


def markdown(data: dict) -> str:
    """The whole report: conditions, the main table, FLOP details and the agreement check."""
    sections = [
        ["# fewshot benchmark"],
        conditions(data),
        main_table(data),
        peer_ratio_table(data),
        flop_table(data),
        agreement(data),
        failures(data),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def conditions(data: dict) -> list[str]:
    """What the numbers depend on: machine, software, threads, allocator, schedule."""
    meta, results = data["meta"], data["results"]
    envs = [r["env"] for r in results if "env" in r]
    env = envs[0] if envs else {}
    versions = sorted({f"{r['package']} {r['package_version']}" for r in results if "env" in r})
    allocator = env.get("allocator_env", {})
    allocator_text = ", ".join(f"{k}={v}" for k, v in allocator.items() if v) or "none set"
    consistent = all(e.get("allocator_env") == allocator for e in envs) and all(
        e.get("num_threads") == env.get("num_threads") for e in envs
    )
    matmul = data["summary"]["matmul_gflops"]
    lines = [
        f"- Date (UTC): {meta['date_utc']}; fewshot commit {meta['git']}; "
        f"{'QUICK smoke run (too few repeats to trust)' if meta['quick'] else 'full run'}",
        f"- Device: {meta['device']}"
        + (f" ({env.get('gpu')}, CUDA {env.get('cuda')})" if meta["device"] == "cuda" else ""),
        f"- CPU: {meta['cpu_model']}, {meta['logical_cpus']} logical CPUs "
        f"({meta['cpus_available']} available), kernel {meta['kernel']}",
        f"- torch {env.get('torch')} (Python {env.get('python')}, {env.get('glibc')}); "
        f"torch.get_num_threads() = {env.get('num_threads')}, "
        f"interop threads = {env.get('num_interop_threads')}",
        f"- Libraries: {', '.join(versions)}; fewshot imported from {env.get('fewshot_path')}",
        f"- Allocator (--malloc {meta['malloc']}), in every child: {allocator_text}"
        + ("" if consistent else " — WARNING: children saw different settings"),
        "- One fresh process per row; warm-up steps, then the median of timed repeats "
        "(each repeat averages several steps); speed-ups are ratios of medians of this run, "
        "per task or episode, of fewshot's default row over each row",
        "- Memory is the process's resident set (RSS): its peak, its size once the workload is "
        "set up, and the growth between them during the timed steps. The growth is not a step's "
        "memory: memory that setup freed and the allocator kept is reused without growing RSS, "
        "and the tuned allocator keeps freed memory; compare peaks across libraries",
    ]
    if meta.get("queries") is not None:
        lines.append(
            f"- --queries {meta['queries']}: every workload ran with {meta['queries']} queries "
            "per class (the workload titles name their defaults)"
        )
    if meta.get("chunk_size") is not None:
        lines.append(f"- fewshot MAML rows with --chunk-size {meta['chunk_size']}")
    if matmul:
        lines.append(f"- float32 matmul reference: {matmul:.1f} GFLOP/s ({matmul_note(data)})")
    return lines


def matmul_note(data: dict) -> str:
    for r in data["results"]:
        if r["workload"] == "matmul" and "error" not in r:
            n = round((r["flops_per_step"] / 2) ** (1 / 3))
            return f"{n}x{n} torch.mm, median of {r['repeats']}"
    return ""


def main_table(data: dict) -> list[str]:
    """One row per (workload, library): time, throughput, speed-up, memory, FLOP rate."""
    cuda = data["meta"]["device"] == "cuda"
    header = [
        "Workload",
        "Library",
        "Time/step median (min–max), repeats",
        "Throughput",
        "fewshot speed-up",
        "Peak RSS MiB",
        "RSS after setup MiB",
        "RSS growth in the steps MiB",
        *(["GPU peak MiB"] if cuda else []),
        "GFLOP/s (% of matmul)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = data["summary"]["rows"]
    for r in data["results"]:
        if "error" in r:
            continue
        d = rows[f"{r['workload']}/{r['library']}"]
        speedup = d.get("baseline_speedup")
        cells = [
            WORKLOADS[r["workload"]].title,
            label(r["workload"], r["library"]),
            f"{duration(r['median_s'])} ({duration(d['min_s'])}–{duration(d['max_s'])}), "
            f"{r['repeats']}×{r['steps_per_repeat']}",
            f"{d['throughput_per_s']:,.1f} {r['unit']}/s",
            speedup_cell(r["library"], speedup),
            f"{r['peak_rss_mib']:.0f}",
            f"{r['rss_after_setup_mib']:.0f}",
            f"{r['peak_rss_mib'] - r['rss_after_setup_mib']:.0f}",
            *([f"{r['gpu_peak_mib']:.0f}"] if cuda else []),
            flop_cell(d),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def speedup_cell(library: str, speedup: float | None) -> str:
    """How many times faster fewshot's default row is than this one, per task or episode;
    below 1 the row itself is faster (e.g. another fewshot setting), and the cell says so."""
    if library == BASELINE or speedup is None:
        return "—"
    if speedup < 1:
        return f"×{speedup:.2f} (this row ×{1 / speedup:.2f} faster)"
    return f"×{speedup:.2f}"


def flop_cell(row: dict) -> str:
    """Achieved GFLOP/s on the common FLOP count, and its share of the matmul rate."""
    if "gflops_per_s" in row:
        return f"{row['gflops_per_s']:.1f} (reference)"
    if "reference_gflops_per_s" not in row:
        return ""
    text = f"{row['reference_gflops_per_s']:.1f}"
    if "fraction_of_matmul" in row:
        text += f" ({100 * row['fraction_of_matmul']:.0f}%)"
    return text


PEER = "learn2learn"  # the library the memory and time ratios divide by


def peer_ratio_table(data: dict) -> list[str]:
    """For workloads whose fewshot rows include a setting of their own (`fewshot-checkpoint`):
    each row's peak RSS, its growth over setup and its median time, each as a ratio to
    learn2learn's row of the same run."""
    ok = [r for r in data["results"] if "error" not in r]
    peers = {r["workload"]: r for r in ok if r["library"] == PEER}
    workloads = {r["workload"] for r in ok if r["library"] == "fewshot-checkpoint"}
    rows = [r for r in ok if r["workload"] in workloads and r["workload"] in peers]
    if not rows:
        return []
    allocated = all(r.get("peak_allocated_mib") for r in rows)
    lines = [
        f"Ratios to {PEER} (same run): peak RSS, RSS growth over setup (the steps' own memory), "
        + (
            "the peak of the memory torch allocated for tensors in one meta-batch (untimed, "
            "after the timed ones; on a GPU, `max_memory_allocated`) "
            if allocated
            else ""
        )
        + "and median time per meta-batch.",
        "",
        "| Workload | Library | Peak RSS MiB (× l2l) | RSS growth MiB (× l2l) "
        + ("| Peak allocated MiB (× l2l) " if allocated else "")
        + "| Median time (× l2l) |",
        "|---|---|---|---|---|" + ("---|" if allocated else ""),
    ]
    for r in rows:
        peer = peers[r["workload"]]
        growth, peer_growth = (x["peak_rss_mib"] - x["rss_after_setup_mib"] for x in (r, peer))
        cells = [
            WORKLOADS[r["workload"]].title,
            label(r["workload"], r["library"]),
            f"{r['peak_rss_mib']:.0f} (×{r['peak_rss_mib'] / peer['peak_rss_mib']:.2f})",
            f"{growth:.0f} (×{growth / peer_growth:.2f})",
        ]
        if allocated:
            ratio = r["peak_allocated_mib"] / peer["peak_allocated_mib"]
            cells.append(f"{r['peak_allocated_mib']:.0f} (×{ratio:.2f})")
        cells += [
            f"{duration(r['median_s'])} (×{r['median_s'] / peer['median_s']:.2f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    rounds = [r for r in rows if r.get("round_medians_s")]
    if rounds:
        lines += [
            "",
            "Median time (and peak RSS) of each round (fresh processes; every other round in "
            "reverse order), in run order:",
            "",
        ]
        for r in rounds:
            peaks = r.get("round_peak_rss_mib") or [None] * len(r["round_medians_s"])
            medians = ", ".join(
                duration(s) + ("" if p is None else f" ({p:.0f} MiB)")
                for s, p in zip(r["round_medians_s"], peaks, strict=True)
            )
            lines.append(f"- {label(r['workload'], r['library'])}: {medians}")
    return lines


def flop_table(data: dict) -> list[str]:
    """FLOPs per meta-step: the common (per-task) count and what each library executed."""
    counted = [r for r in data["results"] if "error" not in r and r.get("flops_executed")]
    if not counted:
        return []
    rows = data["summary"]["rows"]
    lines = [
        "FLOPs of one meta-step by torch.utils.flop_counter.FlopCounterMode (matmuls and "
        "convolutions, forward and all backward passes, second order included; elementwise "
        "ops not counted). The GFLOP/s column above divides the per-task count (fewshot with "
        "vectorize=False, the work a per-task autograd loop does) by each row's median step "
        "time, so it ranks like speed; the executed count is what each implementation ran.",
        "",
        "| Workload | Library | Per-task GFLOP/step | Executed GFLOP/step | Executed GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    bases = {r["workload"]: r for r in counted if r["library"] == BASELINE}
    for r in counted:
        reference = bases.get(r["workload"], {}).get("flops_reference")
        d = rows[f"{r['workload']}/{r['library']}"]
        cells = [
            WORKLOADS[r["workload"]].title,
            label(r["workload"], r["library"]),
            f"{reference / 1e9:.1f}" if reference else "?",
            f"{r['flops_executed'] / 1e9:.1f}",
            f"{d['executed_gflops_per_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def agreement(data: dict) -> list[str]:
    """Whether each library's first meta-gradient matches fewshot's (same init, same tasks)."""
    rows = data["summary"]["rows"]
    checks = []
    for r in data["results"]:
        if "error" in r or r["library"] == BASELINE or not r.get("check"):
            continue
        diff = rows[f"{r['workload']}/{r['library']}"].get("check_rel_diff", {})
        if not diff:
            checks.append(f"- {r['workload']} / {r['library']}: no {BASELINE} row to compare with")
            continue
        verdict = "agrees" if max(diff.values()) <= CHECK_TOLERANCE else "DIFFERS"
        detail = ", ".join(f"{k} {v:.1e}" for k, v in diff.items())
        checks.append(f"- {r['workload']} / {r['library']}: {verdict} ({detail})")
    if not checks:
        return []
    return [
        "Same computation check: loss and gradient norm of the first meta-gradient (same "
        "initial weights, same meta-batch, before any update), relative difference to fewshot:",
        "",
        *checks,
    ]


def failures(data: dict) -> list[str]:
    """Rows whose child process produced no result."""
    failed = [r for r in data["results"] if "error" in r]
    if not failed:
        return []
    return ["Failed rows:", ""] + [
        f"- {r['workload']} / {r['library']}: {r['error']}" for r in failed
    ]


def duration(seconds: float) -> str:
    """A duration with three significant digits in a fitting unit."""
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"
