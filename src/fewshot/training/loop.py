"""The meta-training loop shared by every algorithm: sample, meta-step, validate, checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import trange

from fewshot.algorithms.base import Algorithm
from fewshot.errors import ConfigError
from fewshot.tasks import Task
from fewshot.training import checkpoint
from fewshot.training.config import TrainConfig
from fewshot.training.evaluation import EvalResult, evaluate
from fewshot.training.factory import TaskSources, build_algorithm, build_sources

LOG_EVERY = 10
VALIDATION_SEED = 1  # validation episodes stay fixed across the run; tests use another seed


def meta_step(algorithm: Algorithm, optimizer: torch.optim.Optimizer, tasks: Task) -> float:
    """One outer update: theta <- Adam(theta, grad_theta meta_loss(tasks))."""
    optimizer.zero_grad(set_to_none=True)
    loss = algorithm.meta_loss(tasks)
    loss.backward()
    optimizer.step()
    return loss.item()


def is_better(result: EvalResult, best: EvalResult | None) -> bool:
    if best is None:
        return True
    return result.mean > best.mean if result.metric == "accuracy" else result.mean < best.mean


def prepare_run_dir(run_dir: Path) -> None:
    if (run_dir / checkpoint.CONFIG_FILE).exists():
        raise ConfigError(f"{run_dir} already holds a run; choose another --out folder.")
    run_dir.mkdir(parents=True, exist_ok=True)


def train(
    config: TrainConfig,
    run_dir: Path,
    data_root=None,
    download: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[Algorithm, TaskSources, EvalResult]:
    """Meta-train as `config` says, writing the run folder; returns the best validation result.

    The best weights by validation score go to model.safetensors, the final ones to
    last.safetensors; every LOG_EVERY iterations and every validation append a metrics line.
    """
    config = config.resolved()
    run_dir = Path(run_dir)
    sources = build_sources(config, data_root, download)  # fails early, before anything is written
    prepare_run_dir(run_dir)
    checkpoint.write_config(run_dir, config)
    torch.manual_seed(config.seed)
    algorithm = build_algorithm(config).to(device)
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=config.outer_lr)
    generator = torch.Generator().manual_seed(config.seed)
    best: EvalResult | None = None
    started = time.perf_counter()
    bar = trange(1, config.iterations + 1, desc="meta-training", disable=not progress)
    running = None
    for iteration in bar:
        tasks = sources.train.sample(config.meta_batch, generator).to(device)
        loss = meta_step(algorithm, optimizer, tasks)
        running = loss if running is None else 0.9 * running + 0.1 * loss
        if iteration % LOG_EVERY == 0:
            elapsed = time.perf_counter() - started
            checkpoint.append_metrics(
                run_dir, {"iteration": iteration, "loss": loss, "seconds": round(elapsed, 3)}
            )
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if iteration % config.val_every == 0 or iteration == config.iterations:
            result = evaluate(algorithm, sources.val, config.val_episodes, VALIDATION_SEED,
                              device=device)
            record = {"iteration": iteration, "split": "val", **result.to_dict()}
            if is_better(result, best):
                best = result
                checkpoint.save_weights(algorithm, run_dir / checkpoint.BEST_WEIGHTS)
                record["best"] = True
            checkpoint.append_metrics(run_dir, record)
            bar.write(f"iteration {iteration}: validation {result}")
    checkpoint.save_weights(algorithm, run_dir / checkpoint.LAST_WEIGHTS)
    checkpoint.load_weights(algorithm, run_dir / checkpoint.BEST_WEIGHTS)
    return algorithm, sources, best


def load_run(run_dir: Path, data_root=None, download: bool = False, device: str = "cpu"):
    """The configuration, best weights and test-episode sampler of a finished run."""
    run_dir = Path(run_dir)
    config = checkpoint.read_config(run_dir)
    algorithm = build_algorithm(config)
    checkpoint.load_weights(algorithm, run_dir / checkpoint.BEST_WEIGHTS)
    sources = build_sources(config, data_root, download, parts=("test",))
    return config, algorithm.to(device), sources
