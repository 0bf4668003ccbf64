"""Parity of one method: fewshot against an independent reference, trained side by side.

    benchmarks/.peers-venv/bin/python benchmarks/parity/run.py METHOD --iterations N \
        [--val-every V] [--val-episodes E] [--test-episodes 600] --out DIR

(`bash benchmarks/parity/run.sh METHOD ...` sets PYTHONPATH=src and the peers venv.) Both sides
start at once as child processes, one thread each, fewshot on core 0 and the reference on
core 1: fewshot is the real `fewshot train`; the reference is trained by this file's loop on
exactly fewshot's training episodes (the same sampler, generator and seed), validated on
fewshot's validation episodes, and its best-validated weights kept. Both best models are then
scored by fewshot's evaluator on the same test episodes, and compared paired. Writes
benchmarks/parity/results/METHOD.json and docs/plots/parity-METHOD.png; `report.py` puts the
result in docs/parity.md's table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results"
PLOTS = REPO / "docs" / "plots"
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from references import REFERENCES, algorithm_of  # noqa: E402
from references import build as build_reference  # noqa: E402

TEST_SEED = 0  # fewshot eval's default: the meta-test episodes of every published figure
REFERENCE_LOG = "metrics.jsonl"
REFERENCE_WEIGHTS = "best.pt"
SCORES = "test_scores.json"


# -- the configuration both sides train with ---------------------------------------------------


def parse_flags(flags: tuple[str, ...]) -> dict:
    """`fewshot train` flags ("--train-queries", "1", "--first-order") as TrainConfig keyword
    arguments; a flag that is not a TrainConfig field is a method setting."""
    from dataclasses import fields

    from fewshot.training.config import TrainConfig

    run_fields = {f.name for f in fields(TrainConfig)}
    values: dict = {"settings": {}}
    i = 0
    while i < len(flags):
        name = flags[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            value: object = flags[i + 1]
            for kind in (int, float):
                try:
                    value = kind(value)
                    break
                except ValueError:
                    pass
            i += 2
        else:
            value, i = True, i + 1
        (values if name in run_fields else values["settings"])[name] = value
    return values


def train_config(method: str, args: argparse.Namespace):
    """fewshot's resolved TrainConfig for this pair, as `fewshot train` builds it from the
    command that `fewshot_command` writes."""
    from fewshot.training.config import TrainConfig

    values = parse_flags(REFERENCES[method].fewshot_flags)
    for name in ("iterations", "val_every", "val_episodes"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return TrainConfig(
        algorithm=algorithm_of(method), dataset="omniglot", test_episodes=0, **values
    ).resolved()


def fewshot_command(method: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The real `fewshot train`, one thread, with the method's paper defaults and the flags
    that make its episodes those of the reference."""
    command = [sys.executable, "-m", "fewshot", "train", "--threads", "1"]
    command += ["--algorithm", algorithm_of(method), "--dataset", "omniglot"]
    command += ["--iterations", str(args.iterations)]
    if args.val_every is not None:
        command += ["--val-every", str(args.val_every)]
    if args.val_episodes is not None:
        command += ["--val-episodes", str(args.val_episodes)]
    if args.data_root is not None:
        command += ["--data-root", str(args.data_root)]
    command += ["--test-episodes", "0", *REFERENCES[method].fewshot_flags, "--out", str(out)]
    return command


def child_environment() -> dict[str, str]:
    """One thread everywhere, and fewshot imported from src/."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def recorded(command: list[str]) -> str:
    """A command as the result records it: this machine's interpreter as `python`, paths in the
    repository relative to it."""
    parts = ["python" if part == sys.executable else part for part in command]
    return shlex.join([part.replace(f"{REPO}{os.sep}", "") for part in parts])


def pinned(core: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *command]


# -- the reference side (a child process) ------------------------------------------------------


class ReferenceModel(torch.nn.Module):
    """A reference as fewshot's evaluator takes a method: `predict(tasks, inner_steps)`,
    `is_transductive`, eval/train, `adapts_by_steps`, and `eval_inner_steps` where it adapts
    by steps (the references that do have it)."""

    def __init__(self, reference: torch.nn.Module) -> None:
        super().__init__()
        self.reference = reference
        self.is_transductive = reference.is_transductive
        self.adapts_by_steps = hasattr(reference, "eval_inner_steps")
        if self.adapts_by_steps:
            self.eval_inner_steps = reference.eval_inner_steps

    def predict(self, tasks, inner_steps: int | None = None) -> torch.Tensor:
        return self.reference.predict(tasks, inner_steps)


def same_initial_weights(config, reference_state: dict[str, torch.Tensor]) -> bool:
    """Whether the reference, as built, starts from the weights fewshot's loop starts from:
    each tensor of fewshot's initial model (seeding as its loop does) equals a tensor of the
    reference's of its own, one to one. References with networks of their own (Chen et al.'s,
    Antoniou et al.'s, ...) start elsewhere, and the result says so. Necessary, not sufficient:
    constant tensors (batch norm's scales and shifts) match any of their shape."""
    from fewshot.training.factory import build_algorithm
    from fewshot.training.loop import seed_everything

    with torch.random.fork_rng():
        seed_everything(config.seed)
        fewshot_state = build_algorithm(config).state_dict()
    pool = [t for t in reference_state.values() if t.is_floating_point()]
    for tensor in (v for v in fewshot_state.values() if v.is_floating_point() and v.dim() > 0):
        match = next(
            (i for i, t in enumerate(pool) if t.shape == tensor.shape and torch.equal(t, tensor)),
            None,
        )
        if match is None:
            return False
        pool.pop(match)
    return True


def train_reference(method: str, args: argparse.Namespace) -> None:
    """Train the reference on fewshot's training episodes, validate it on fewshot's validation
    episodes, keep its best weights and score them on the test episodes."""
    from fewshot.tasks import stream_generator
    from fewshot.training.evaluation import evaluate, evaluate_episodes
    from fewshot.training.factory import build_sources
    from fewshot.training.loop import VALIDATION_SEED, is_better

    torch.set_num_threads(1)
    out = Path(args.out) / "reference"
    out.mkdir(parents=True, exist_ok=True)
    config = train_config(method, args)
    sources = build_sources(config, args.data_root)
    config.settings = config.settings.fit_data(sources.train)
    reference = build_reference(method, config)
    check = same_initial_weights(config, reference.state_dict())
    model = ReferenceModel(reference)
    generator = stream_generator("train", config.seed)
    log = (out / REFERENCE_LOG).open("w")

    def record(line: dict) -> None:
        log.write(json.dumps(line) + "\n")
        log.flush()

    record({"config": config.to_dict(), "source": reference.source, "same_initial_weights": check})
    best, best_state = None, None
    started = time.perf_counter()
    for iteration in range(1, config.iterations + 1):
        step_started = time.perf_counter()
        tasks = sources.train.sample(config.meta_batch, generator)
        loss = reference.train_step(tasks)
        now = time.perf_counter()
        line = {"iteration": iteration, "loss": loss, "step_seconds": now - step_started}
        record({**line, "seconds": round(now - started, 3)})
        if iteration % config.val_every == 0 or iteration == config.iterations:
            result = evaluate(
                model, sources.val, config.val_episodes, VALIDATION_SEED, stream="val"
            )
            line = {"iteration": iteration, "split": "val", **result.to_dict()}
            if is_better(result, best):  # fewshot's loop's rule, so both sides keep alike
                best, best_state = result, copy.deepcopy(reference.state_dict())
                torch.save(best_state, out / REFERENCE_WEIGHTS)
                line["best"] = True
            record(line)
            print(f"reference iteration {iteration}: validation {result}", flush=True)
    log.close()
    reference.load_state_dict(best_state)
    result, scores = evaluate_episodes(
        model, sources.test, args.test_episodes, TEST_SEED, stream="eval"
    )
    write_scores(out / SCORES, result, scores)
    print(f"reference test: {result}", flush=True)


# -- scoring fewshot's run (a child process) ---------------------------------------------------


def score_fewshot(
    args: argparse.Namespace, run_dir: Path | None = None, batch_norm: str | None = None
) -> None:
    """The best weights of fewshot's side (or of `run_dir`), as `fewshot eval` reads them, on
    the test episodes; the scores go to the run folder's test_scores.json."""
    from fewshot.training.evaluation import evaluate_episodes
    from fewshot.training.factory import build_sources
    from fewshot.training.loading import load

    torch.set_num_threads(1)
    run_dir = run_dir or Path(args.out) / "fewshot"
    algorithm = load(run_dir, batch_norm=batch_norm)
    sources = build_sources(algorithm.config, args.data_root, parts=("test",))
    result, scores = evaluate_episodes(
        algorithm, sources.test, args.test_episodes, TEST_SEED, stream="eval"
    )
    write_scores(run_dir / SCORES, result, scores)
    print(f"{run_dir} test: {result}", flush=True)


def score_control(args: argparse.Namespace) -> None:
    """Score a control run (fewshot trained with one thing changed, say `--init` from
    init_control.py) on the pair's test episodes and print its paired difference from each
    side of the pair in `--out`."""
    from fewshot.training.evaluation import paired_difference

    control = Path(args.score_control)
    score_fewshot(args, control, args.batch_norm)
    mine = torch.tensor(json.loads((control / SCORES).read_text())["scores"])
    print(f"{control}: {100 * mine.mean():.2f}%")
    for side in ("fewshot", "reference"):
        theirs = torch.tensor(json.loads((Path(args.out) / side / SCORES).read_text())["scores"])
        difference = paired_difference(mine, theirs)
        print(
            f"  {control} - {side} side: {100 * difference.mean:+.2f} ± "
            f"{100 * difference.ci95:.2f} points (p = {difference.p_value:.3g})"
        )


def write_scores(path: Path, result, scores: torch.Tensor) -> None:
    path.write_text(json.dumps({"result": result.to_dict(), "scores": scores.tolist()}))


# -- the parent: both sides at once, then the comparison ---------------------------------------


def run_side(commands: list[list[str]], log: Path, failures: list[str]) -> None:
    """Run `commands` one after another, output to `log`; record a failure."""
    with log.open("w") as out:
        for command in commands:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT,
                                   env=child_environment(), cwd=REPO)  # fmt: skip
            if code != 0:
                failures.append(f"{shlex.join(command)} exited {code}; see {log}")
                return


def child_command(mode: str, method: str, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), method, mode]
    command += ["--iterations", str(args.iterations), "--out", str(args.out)]
    command += ["--test-episodes", str(args.test_episodes)]
    for name in ("val_every", "val_episodes", "data_root"):
        if getattr(args, name) is not None:
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return command


LOG_EVERY = 10  # fewshot's loop logs every 10th iteration; both sides are timed over those


def interval_seconds(lines: list[dict]) -> list[float]:
    """Wall seconds per iteration over each interval between consecutive records of every
    `LOG_EVERY`-th iteration, from the cumulative "seconds" of a metrics log, so both sides are
    timed over the same intervals (validation falls in a few of them)."""
    points = [(0, 0.0)] + [
        (r["iteration"], r["seconds"])
        for r in lines
        if "seconds" in r and "split" not in r and r["iteration"] % LOG_EVERY == 0
    ]
    return [(s1 - s0) / (i1 - i0) for (i0, s0), (i1, s1) in zip(points, points[1:]) if i1 > i0]


def seconds_per_iteration(lines: list[dict]) -> float | None:
    """The median of `interval_seconds`, which leaves the validation intervals out."""
    rates = interval_seconds(lines)
    return statistics.median(rates) if rates else None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validation_curve(lines: list[dict]) -> list[dict]:
    return [
        {k: r[k] for k in ("iteration", "accuracy", "ci95", "episodes")}
        for r in lines
        if r.get("split") == "val"
    ]


def compare(method: str, args: argparse.Namespace, commands: dict) -> dict:
    """The result record of a finished pair."""
    from fewshot.training import checkpoint
    from fewshot.training.evaluation import paired_difference

    out = Path(args.out)
    fewshot_scores = json.loads((out / "fewshot" / SCORES).read_text())
    reference_scores = json.loads((out / "reference" / SCORES).read_text())
    difference = paired_difference(
        torch.tensor(fewshot_scores["scores"]), torch.tensor(reference_scores["scores"])
    )
    fewshot_log = checkpoint.read_metrics(out / "fewshot")
    reference_log = read_jsonl(out / "reference" / REFERENCE_LOG)
    header = reference_log[0]
    fewshot_config = checkpoint.read_config(out / "fewshot").to_dict()
    reference_config = dict(header["config"])
    differing = sorted(
        name
        for name in set(fewshot_config) | set(reference_config)
        if name not in ("data_root", "test_episodes")
        and fewshot_config.get(name) != reference_config.get(name)
    )
    spec = REFERENCES[method]
    return {
        "method": method,
        "reference": {
            "repository": spec.repository,
            "version": spec.version,
            "source": header["source"],
        },
        "iterations": args.iterations,
        "val_every": reference_config.get("val_every"),
        "val_episodes": reference_config.get("val_episodes"),
        "seconds_per_iteration": {
            "fewshot": seconds_per_iteration(fewshot_log),
            "reference": seconds_per_iteration(reference_log[1:]),
        },
        "interval_seconds": {
            "fewshot": interval_seconds(fewshot_log),
            "reference": interval_seconds(reference_log[1:]),
        },
        "test": {
            "episodes": args.test_episodes,
            "seed": TEST_SEED,
            "fewshot": fewshot_scores["result"],
            "reference": reference_scores["result"],
        },
        "paired_difference": {
            "mean": difference.mean,
            "ci95": difference.ci95,
            "t": difference.t,
            "p": difference.p_value,
            "episodes": difference.episodes,
        },
        "validation": {
            "fewshot": validation_curve(fewshot_log),
            "reference": validation_curve(reference_log),
        },
        "checks": {
            "same_initial_weights": header["same_initial_weights"],
            "config_differences": differing,
        },
        "config": {k: v for k, v in fewshot_config.items() if k != "data_root"},
        "commands": commands,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
    }


def git_commit() -> str | None:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def pair_commands(method: str, args: argparse.Namespace) -> tuple[list, list, dict]:
    """The fewshot side's and the reference side's commands, and how the result records them."""
    out = Path(args.out)
    fewshot_core, reference_core = (int(c) for c in args.cores.split(","))
    fewshot_side = [
        pinned(fewshot_core, fewshot_command(method, args, out / "fewshot")),
        pinned(fewshot_core, child_command("--score-fewshot", method, args)),
    ]
    reference_side = [pinned(reference_core, child_command("--reference", method, args))]
    argv = [a for a in sys.argv[1:] if a != "--compare-only"]
    commands = {
        "pair": shlex.join([Path(sys.executable).name, "benchmarks/parity/run.py", *argv]),
        "fewshot": [recorded(c) for c in fewshot_side],
        "reference": [recorded(c) for c in reference_side],
    }
    return fewshot_side, reference_side, commands


def run_pair(method: str, args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if (out / "fewshot").exists() or (out / "reference").exists():
        sys.exit(f"{out} already holds a pair; choose a new --out.")
    out.mkdir(parents=True, exist_ok=True)
    fewshot_side, reference_side, commands = pair_commands(method, args)
    failures: list[str] = []
    threads = [
        threading.Thread(target=run_side, args=(fewshot_side, out / "fewshot.log", failures)),
        threading.Thread(target=run_side, args=(reference_side, out / "reference.log", failures)),
    ]
    print(f"training both sides; logs in {out}/fewshot.log and {out}/reference.log", flush=True)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        sys.exit("\n".join(failures))
    return compare(method, args, commands)


def write_result(result: dict, results_dir: Path = RESULTS, plots_dir: Path = PLOTS) -> Path:
    """results/METHOD.json, and the validation-curve figure where matplotlib is installed."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result['method']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    if importlib.util.find_spec("matplotlib") is None:  # the peers venv has none
        print("matplotlib missing here: `python benchmarks/parity/report.py` draws the figure")
        return path
    from report import draw_curves

    draw_curves(result, plots_dir / f"parity-{result['method']}.png")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=sorted(REFERENCES))
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--val-episodes", type=int, default=None)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", required=True, help="folder for both runs (new or empty)")
    parser.add_argument(
        "--cores",
        default="0,1",
        help="the CPU cores of the fewshot side and of the reference side [default: 0,1]",
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder of the result JSON")
    parser.add_argument(
        "--batch-norm",
        choices=("transductive", "inductive"),
        help="with --score-control: the policy the control is scored with [default: its own]",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    mode.add_argument("--score-fewshot", action="store_true", help=argparse.SUPPRESS)
    mode.add_argument(
        "--score-control",
        metavar="RUN",
        help="score fewshot run folder RUN on the test episodes; its paired difference from "
        "each side of the pair in --out",
    )
    mode.add_argument(
        "--compare-only",
        action="store_true",
        help="write the result of a pair already run in --out (same arguments), training nothing",
    )
    args = parser.parse_args(argv)
    if args.reference:
        return train_reference(args.method, args)
    if args.score_fewshot:
        return score_fewshot(args)
    if args.score_control:
        return score_control(args)
    if args.compare_only:
        result = compare(args.method, args, pair_commands(args.method, args)[2])
    else:
        result = run_pair(args.method, args)
    path = write_result(result, Path(args.results))
    test, difference = result["test"], result["paired_difference"]
    print(
        f"{args.method}: fewshot {100 * test['fewshot']['accuracy']:.2f}%, reference "
        f"{100 * test['reference']['accuracy']:.2f}%, paired difference "
        f"{100 * difference['mean']:+.2f} ± {100 * difference['ci95']:.2f} points "
        f"(p = {difference['p']:.3g}); s/iteration fewshot "
        f"{result['seconds_per_iteration']['fewshot']}, reference "
        f"{result['seconds_per_iteration']['reference']}; checks {result['checks']}; "
        f"wrote {path}"
    )


if __name__ == "__main__":
    main()
