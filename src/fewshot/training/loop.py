"""The meta-training loop shared by every algorithm: sample, meta-step, validate, checkpoint.

A run can be stopped at any point (Ctrl-C, SIGTERM, SIGKILL) and resumed from its last
checkpoint with bitwise-identical results on CPU: the checkpoint holds the weights, the optimizer,
every random-generator state and the best result so far, and the metrics log is cut back to it.

Launched by torchrun, the same loop runs in every process, each on its share of the meta-batch
(`training.distributed`); rank 0 alone validates, logs and writes the run folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.distributed as dist

from fewshot.algorithms.base import Algorithm
from fewshot.backbones import require_trusted, start_from_weights
from fewshot.datasets.preprocessing import write_preprocessing
from fewshot.datasets.registry import get_dataset
from fewshot.devices import describe_device
from fewshot.episodes import MetaDatasetSampler
from fewshot.errors import (
    CheckpointError,
    ConfigError,
    DivergenceError,
    NothingToDo,
    RunStopped,
    require_positive,
)
from fewshot.files import atomic_write_text
from fewshot.progress import progress_bar
from fewshot.tasks import ExampleSampler, Task, TaskSampler, stream_generator
from fewshot.training import checkpoint
from fewshot.training.config import TrainConfig
from fewshot.training.distributed import (
    SINGLE_PROCESS,
    World,
    agree,
    average_step,
    broadcast,
    broadcast_module,
    gather,
    main_first,
    process_group,
)
from fewshot.training.evaluation import EvalResult, evaluate
from fewshot.training.factory import (
    TaskSources,
    build_algorithm,
    build_sources,
    data_root_for,
    has_per_way_head,
    training_preprocessing,
)
from fewshot.training.feature_cache import cached_backbone, on_features, skipped
from fewshot.training.state import (
    STATE_FILE,
    TrainingState,
    capture_rngs,
    load_state,
    restore_rngs,
    save_state,
    saved_iteration,
)

LOG_EVERY = 10
VALIDATION_SEED = 1  # validation episodes stay fixed across the run; tests use another seed


class NonFiniteError(ArithmeticError):
    """Raised by `meta_step` when the loss or a gradient is NaN or infinite."""


def meta_step(
    algorithm: Algorithm,
    optimizer: torch.optim.Optimizer,
    tasks: Task,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    world: World = SINGLE_PROCESS,
) -> dict[str, float]:
    """One outer update from the method's `training_step`, refused if not finite; returns the
    step's metrics.

    In a distributed run, `tasks` is this process's share of the meta-batch, and the gradients
    and metrics are averaged across processes, each weighted by its share (one all-reduce),
    before anything else. The norm of the whole gradient is then clipped to the method's
    `gradient_clip`, where it has one.
    The update is skipped when the loss or any gradient is NaN or infinite, so the parameters
    stay at their last finite values.
    """
    optimizer.zero_grad(set_to_none=True)
    metrics = average_step(world, algorithm, algorithm.training_step(tasks), share=len(tasks))
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteError(f"loss is {metrics['loss']}")
    grads = [p.grad for p in algorithm.parameters() if p.grad is not None]
    if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
        raise NonFiniteError("a gradient is not finite")
    algorithm.clip_gradients()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return metrics


def is_better(result: EvalResult, best: EvalResult | None) -> bool:
    """Whether `result` improves on `best`; any result improves on none or on a NaN."""
    if best is None or math.isnan(best.mean):
        return True
    return result.mean > best.mean if result.metric == "accuracy" else result.mean < best.mean


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def stop_requests():
    """Turn the first SIGINT/SIGTERM into a request to stop after the current iteration.

    Yields a dict whose "signal" entry is set when one arrives; a second signal aborts at once.
    """
    request: dict = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request["signal"] is not None:
            raise KeyboardInterrupt
        request["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def truncate_metrics(run_dir: Path, iteration: int) -> None:
    """Keep only the metrics lines up to `iteration`, so a resumed run neither repeats nor skips."""
    if not (run_dir / checkpoint.METRICS_FILE).exists():
        return
    kept = [r for r in checkpoint.read_metrics(run_dir) if r["iteration"] <= iteration]
    atomic_write_text(
        run_dir / checkpoint.METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept)
    )


# Called with every record written to metrics.jsonl (a training line, or a validation result
# with "split": "val"): TensorBoard logging, a tuner's pruning (which may raise to end the run).
Listener = Callable[[dict], None]


class Run:
    """A run folder being trained: owns the algorithm, optimizer, samplers and bookkeeping."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        sources: TaskSources,
        device: str,
        listeners: Sequence[Listener] = (),
        world: World = SINGLE_PROCESS,
    ):
        self.config, self.run_dir, self.sources, self.device = config, run_dir, sources, device
        self.listeners, self.world = listeners, world
        self.progress = False
        seed_everything(config.seed)  # the same initial weights in every process
        # A resolved configuration: these have their values.
        assert config.outer_lr is not None and config.iterations is not None
        assert config.meta_batch is not None
        self.algorithm = build_algorithm(config).to(device)
        self.optimizer, self.scheduler = self.algorithm.configure_optimizers(
            config.outer_lr, config.iterations
        )
        self.share = world.share(config.meta_batch)
        self.generator = stream_generator(world.stream("train"), config.seed)
        if world.rank > 0:  # its own dropout and augmentation draws
            seed_everything(world.seed(config.seed))
        self.iteration = 0
        self.time_limit = config.time_limit  # minutes this invocation may train, or None
        self.best: EvalResult | None = None
        self.elapsed = 0.0
        self.checkpointed = 0

    def state(self) -> TrainingState:
        """The run's state, with every process's generators (gathered from all of them)."""
        rngs = gather(self.world, capture_rngs(self.generator))
        return TrainingState(
            iteration=self.iteration,
            algorithm=self.algorithm.state_dict(),
            optimizer=self.optimizer.state_dict(),
            sampler_rng=rngs[0]["sampler_rng"],
            torch_rng=rngs[0]["torch_rng"],
            python_rng=rngs[0]["python_rng"],
            numpy_rng=rngs[0]["numpy_rng"],
            best=None if self.best is None else self.best.to_dict(),
            elapsed=self.elapsed,
            scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
            cuda_rng=rngs[0]["cuda_rng"],
            processes=self.world.size,
            other_ranks=rngs[1:],
        )

    def restore(self, state: TrainingState) -> None:
        self.algorithm.load_state_dict(state.algorithm)
        self.optimizer.load_state_dict(state.optimizer)
        if (self.scheduler is None) != (state.scheduler is None):
            raise CheckpointError(
                f"the checkpoint in {self.run_dir} does not fit {self.config.algorithm}'s "
                "learning-rate schedule; it was written by another version of the method."
            )
        if self.scheduler is not None:
            assert state.scheduler is not None  # the checkpoint has one too (checked above)
            self.scheduler.load_state_dict(state.scheduler)
        restore_rngs(state.rngs(self.world.rank), self.generator)
        self.iteration, self.elapsed = state.iteration, state.elapsed
        self.best = None if state.best is None else EvalResult.from_dict(state.best)
        self.checkpointed = state.iteration

    def save_checkpoint(self) -> None:
        """Write the resumable checkpoint (rank 0; every process takes part)."""
        state = self.state()
        if self.world.is_main:
            save_state(self.run_dir / STATE_FILE, state)
        self.checkpointed = self.iteration

    def step(self) -> dict[str, float]:
        # this process's share of meta_batch tasks (or examples, for methods trained on them)
        train = self.sources.train
        assert train is not None  # a run builds every part
        tasks = train.sample(self.share, self.generator).to(self.device)
        try:
            # A `Batch` of examples goes to the methods whose `training_step` takes one.
            return meta_step(self.algorithm, self.optimizer, tasks, self.scheduler, self.world)  # type: ignore[arg-type]
        except NonFiniteError as error:
            config = self.config
            rates = {**config.settings.learning_rates(), "outer_lr": config.outer_lr}
            lower = " or ".join(
                f"--{name.replace('_', '-')} (now {value})" for name, value in rates.items()
            )
            kept = f"the checkpoint of iteration {self.checkpointed} is kept"
            raise DivergenceError(
                f"training diverged at iteration {self.iteration + 1}: {error}; {kept}. "
                f"The likely cause is a learning rate too high: lower {lower}."
            ) from None

    def validate(self) -> EvalResult:
        result = evaluate(
            self.algorithm,
            self.sources.val,
            self.config.val_episodes,
            VALIDATION_SEED,
            device=self.device,
            progress=self.progress,
            stream="val",
        )
        record = {"iteration": self.iteration, "split": "val", **result.to_dict()}
        if is_better(result, self.best):
            self.best = result
            checkpoint.save_weights(self.algorithm, self.run_dir / checkpoint.BEST_WEIGHTS)
            record["best"] = True
        self.record(record)
        return result

    def record(self, record: dict) -> None:
        """Append a line to metrics.jsonl and pass it to the listeners."""
        checkpoint.append_metrics(self.run_dir, record)
        for listener in self.listeners:
            listener(record)

    def run(self, progress: bool) -> None:
        config, main = self.config, self.world.is_main
        assert config.iterations is not None and config.val_every is not None  # resolved
        progress = progress and main
        self.progress = progress
        started = time.perf_counter() - self.elapsed
        invocation_started = time.perf_counter()  # --time-limit counts per invocation
        bar = progress_bar(
            desc="meta-training",
            initial=self.iteration,
            total=config.iterations,
            disable=not progress,
        )
        if main:
            if self.iteration > 0:  # the run's first line, in a log file as on a terminal
                bar.write(
                    f"resuming {self.run_dir} at iteration {self.iteration} of {config.iterations}"
                )
            bar.write(f"device: {self.describe_processes()}")
            if self.features_note:
                bar.write(self.features_note)
        with stop_requests() as stop, bar:
            for iteration in range(self.iteration + 1, config.iterations + 1):
                metrics = self.step()
                self.iteration = iteration
                bar.update()  # before any line about this iteration: one numbering
                self.elapsed = time.perf_counter() - started
                if main and iteration % LOG_EVERY == 0:
                    seconds = round(self.elapsed, 3)
                    self.record({"iteration": iteration, **metrics, "seconds": seconds})
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                agreed = agree(  # what one process decides, all do
                    self.world,
                    stop=stop["signal"] is not None,
                    out_of_time=self.time_limit is not None
                    and time.perf_counter() - invocation_started >= 60 * self.time_limit,
                )
                if (
                    iteration % config.val_every == 0
                    or iteration == config.iterations
                    or agreed["out_of_time"]
                ):
                    if main:
                        bar.write(f"iteration {iteration}: validation {self.validate()}")
                    # the best weights just written and the checkpoint stay of one trajectory
                    self.save_checkpoint()
                elif iteration % config.checkpoint_every == 0 or agreed["stop"]:
                    self.save_checkpoint()
                if agreed["out_of_time"]:
                    if main and iteration < config.iterations:
                        bar.write(
                            f"time limit of {self.time_limit:g} minutes reached after iteration "
                            f"{iteration}; resume with: {self.resume_command()}"
                        )
                    break
                if agreed["stop"]:
                    by = "another process"
                    if stop["signal"] is not None:
                        by = signal.Signals(stop["signal"]).name
                    raise RunStopped(
                        f"by {by} after iteration {iteration}, checkpoint written; "
                        f"resume with: {self.resume_command()}"
                    )
        if self.checkpointed != self.iteration:  # the last iteration may have just written one
            self.save_checkpoint()

    # Set where training draws from cached features (`features_cached`): a line saying so.
    features_note: str | None = None

    def resume_command(self) -> str:
        resume = f"fewshot train --resume {self.run_dir}"
        return f"torchrun (as launched) -m {resume}" if self.world.is_distributed else resume

    def describe_processes(self) -> str:
        """The device line: "cpu (1 thread)", or "cpu (1 thread) x 2 processes (gloo)"."""
        device = describe_device(self.device)
        if not self.world.is_distributed:
            return device
        return f"{device} x {self.world.size} processes ({dist.get_backend()})"


def train(
    config: TrainConfig,
    run_dir: Path,
    data_root=None,
    download: bool = False,
    device: str = "cpu",
    progress: bool = True,
    resume: bool = False,
    listeners: Sequence[Listener] = (),
    iterations: int | None = None,
    time_limit: float | None = None,
    trust_backbone: bool = False,
) -> tuple[Algorithm, TaskSources, EvalResult | None]:
    """Meta-train as `config` says (or continue the run in `run_dir` with `resume=True`,
    to `iterations` in all if given: a finished run is extended).

    A run whose backbone is a constructor (`backbones.is_constructor`) resumes only with
    `trust_backbone=True`: building it imports the module its config.json names.

    A time limit belongs to one call: `time_limit` minutes (default: `config.time_limit` for a
    new run, none for a resumed one), after which the run validates, writes its checkpoint and
    returns, to be resumed later (`trained_iterations` tells how far it went).

    Writes config.json, metrics.jsonl (a line every LOG_EVERY iterations and per validation),
    model.safetensors (best weights by validation) and state.safetensors (resumable
    checkpoint, every `checkpoint_every` iterations); each metrics line also goes to every
    listener (an exception raised by one ends the run, which stays resumable). A new run
    records its data folder (`config.data_root`) and, with `config.init`, starts from the best
    weights of that run. Returns the algorithm with its best weights loaded, the task samplers,
    and the best validation result.

    Under torchrun (WORLD_SIZE > 1) every process calls this alike: it joins the process group
    (gloo on CPU, nccl on GPU; each process takes the GPU of its local rank), trains on its
    share of each meta-batch, and leaves the group at the end. Rank 0 reads and writes the run
    folder and returns as above; the other ranks return the last weights and no result.
    """
    with process_group(device) as world:
        return train_in_world(
            world, config, Path(run_dir), data_root, download, progress, resume, listeners,
            iterations, time_limit, trust_backbone,
        )  # fmt: skip


def train_in_world(
    world: World,
    config: TrainConfig,
    run_dir: Path,
    data_root,
    download: bool,
    progress: bool,
    resume: bool,
    listeners: Sequence[Listener],
    iterations: int | None,
    time_limit: float | None = None,
    trust_backbone: bool = False,
) -> tuple[Algorithm, TaskSources, EvalResult | None]:
    """`train` in this process of `world`."""
    if resume:
        config, state = broadcast(world, read_resumable(run_dir) if world.is_main else None)
        require_trusted(config.backbone, trust_backbone, run_dir)
        check_same_processes(run_dir, state, world)
        extended = extend(config, run_dir, state.iteration, iterations)
    else:
        config = config.resolved(world.device)
        check_meta_dataset_training(config, world)
        assert config.meta_batch is not None  # resolved
        world.share(config.meta_batch)  # a meta-batch the processes cannot share is refused
        if world.is_main:
            check_new_run_folder(run_dir)
    with main_first(world):  # a download or a decoding cache is written once
        sources = build_sources(config, data_root, download)  # fails before anything is written
    if not resume:
        config.settings = config.settings.fit_data(sources.train)
        for name in get_dataset(config.dataset).from_data:  # a table's features, and so on
            # data read from files, whose samplers `build_sources` makes
            loaded = cast(TaskSampler | ExampleSampler | MetaDatasetSampler, sources.train)
            setattr(config, name, loaded.inputs.shape[1])
        config.data_root = recorded_data_root(config, data_root)
    main = world.is_main
    run = Run(config, run_dir, sources, world.device, listeners if main else (), world)
    if time_limit is not None:
        require_positive(time_limit=time_limit)
    if resume or time_limit is not None:
        run.time_limit = time_limit
    if resume:
        run.restore(state)
        if main:
            truncate_metrics(run_dir, state.iteration)
            for stale in run_dir.glob("*.tmp"):  # left by a kill during a checkpoint write
                stale.unlink()
            if extended:
                checkpoint.write_config(run_dir, config)
    else:
        if config.init is not None:
            config.init = str(Path(config.init).resolve())
            if main:
                start_from(run.algorithm, Path(config.init))
        if not any(p.requires_grad for p in run.algorithm.parameters()):
            raise ConfigError(
                f"`freeze={config.freeze}` leaves {config.algorithm} nothing to learn (its "
                "backbone is all it learns); freeze less of it."
            )
        if config.backbone_weights is not None and main:
            start_from_weights(run.algorithm, Path(config.backbone_weights), config.weights_prefix)
        broadcast_module(world, run.algorithm)  # rank 0's weights, in every process
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.write_config(run_dir, config)
            preprocessing = training_preprocessing(config, sources.train)
            if preprocessing is not None:
                write_preprocessing(run_dir, preprocessing)
        run.save_checkpoint()  # so that a run killed before its first checkpoint can resume
    with features_cached(run, config.cache_features is not False):
        run.run(progress)
    if main:
        checkpoint.load_weights(run.algorithm, run_dir / checkpoint.BEST_WEIGHTS)
    return run.algorithm, sources, run.best


@contextlib.contextmanager
def features_cached(run: Run, allowed: bool) -> Iterator[None]:
    """Within: where the run's backbone is frozen whole (`feature_cache`), training and
    validation draw from each image's features, computed once, and the backbone is skipped;
    elsewhere nothing changes."""
    parts = (run.sources.train, run.sources.val)
    backbone = cached_backbone(run.algorithm, *parts) if allowed else None
    if backbone is None:
        yield
        return
    sources = run.sources
    train, val = (on_features(part, backbone, run.device) for part in parts)
    run.sources = TaskSources(train, val, None)
    images = len(train.inputs) + len(val.inputs)
    run.features_note = f"features: the frozen backbone's, computed once for {images} images"
    try:
        with skipped(run.algorithm):
            yield
    finally:
        run.sources, run.features_note = sources, None


def check_meta_dataset_training(config: TrainConfig, world: World) -> None:
    """Meta-Dataset's episodes differ in size, so each process trains on one at a time, and
    only a method without a per-class head can answer their 5 to 50 ways."""
    if config.sampler != "meta-dataset":
        return
    if has_per_way_head(config):
        raise ConfigError(
            f"Meta-Dataset's episodes have 5 to 50 ways, but {config.algorithm}'s model has one "
            "output per way; use a method without a per-class head (protonet, matchingnet, "
            "relationnet)."
        )
    assert config.meta_batch is not None  # resolved
    if config.meta_batch != world.size:
        raise ConfigError(
            "`sampler=meta-dataset` trains on one episode at a time in each process: use "
            f"`meta_batch={world.size}`."
        )


def trained_iterations(run_dir: Path) -> int:
    """The iterations a run folder's checkpoint has trained: its config's `iterations` when
    it finished, fewer when a time limit or a stop ended it first."""
    return saved_iteration(run_dir / STATE_FILE)


def read_resumable(run_dir: Path) -> tuple[TrainConfig, TrainingState]:
    """A run folder's configuration and its last checkpoint."""
    return checkpoint.read_config(run_dir), load_state(run_dir / STATE_FILE)


def check_same_processes(run_dir: Path, state: TrainingState, world: World) -> None:
    """A run resumes with as many processes as it had: each draws its own tasks, and the
    checkpoint holds that many task streams."""
    if state.processes != world.size:
        had = f"{state.processes} process{'es' if state.processes > 1 else ''}"
        launch = (
            f"torchrun starting {state.processes} processes in all: torchrun ... -m fewshot "
            f"train --resume {run_dir}"
            if state.processes > 1
            else f"fewshot train --resume {run_dir} (without torchrun)"
        )
        raise ConfigError(
            f"{run_dir} was trained by {had} and this is {world.size}; resume it with {launch}, "
            f"or start a new run from its weights with `init={run_dir}`."
        )


def check_new_run_folder(run_dir: Path) -> None:
    """A new run goes into a folder that does not exist or is empty: never beside a run, or
    beside files that are not a run's."""
    if (run_dir / checkpoint.CONFIG_FILE).exists():
        raise ConfigError(
            f"{run_dir} already holds a run; choose another `out`, or continue it with "
            f"`resume={run_dir}`."
        )
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(
            f"{run_dir} is not an empty folder and holds no run; choose a new or empty `out`."
        )


def extend(config: TrainConfig, run_dir: Path, done: int, iterations: int | None) -> bool:
    """Set a resumed run's total iterations to `iterations` (None: keep them) and say whether
    they changed. A run with nothing left to do is refused, and so is an extension that would
    change its learning-rate schedule (then it would not match a run given `iterations` from
    the start)."""
    assert config.iterations is not None  # a run's recorded configuration is resolved
    if iterations is None or iterations == config.iterations:
        if done >= config.iterations:
            raise NothingToDo(
                f"{run_dir} has finished its {config.iterations} iterations; to train it "
                f"further, resume it with `iterations` N (more than {config.iterations})."
            )
        return False
    if iterations < config.iterations:
        raise ConfigError(
            f"`iterations={iterations}` is fewer than the {config.iterations} {run_dir} was "
            f"given; resuming can only extend a run."
        )
    if schedule_depends_on_iterations(config, iterations):
        raise ConfigError(
            f"{config.algorithm}'s learning-rate schedule spans the run's iterations, so "
            f"extending {run_dir} would change it; start a new run from its weights instead: "
            f"fewshot train --init {run_dir} --iterations {iterations} ..."
        )
    config.iterations = iterations
    return True


def schedule_depends_on_iterations(config: TrainConfig, iterations: int) -> bool:
    """Whether the method's outer learning rate over the run's first `config.iterations` steps
    would differ if the run had `iterations` in all (an annealed schedule does)."""
    algorithm = build_algorithm(config)
    assert config.iterations is not None  # resolved

    def rates(total: int) -> list[float]:
        assert config.outer_lr is not None and config.iterations is not None  # resolved
        optimizer, schedule = algorithm.configure_optimizers(config.outer_lr, total)
        if schedule is None:
            return []
        values = []
        with warnings.catch_warnings():  # stepping a schedule without training steps
            warnings.simplefilter("ignore")
            for _ in range(config.iterations):
                values.append(optimizer.param_groups[0]["lr"])
                schedule.step()
        return values

    return rates(config.iterations) != rates(iterations)


def recorded_data_root(config: TrainConfig, data_root) -> str | None:
    """The absolute data folder (or CSV file) a new run was trained on, for its config.json."""
    root = data_root_for(config, data_root)
    return None if root is None else str(Path(root).resolve())


def start_from(algorithm: Algorithm, init_run: Path) -> None:
    """Load another run's best weights into a new run's algorithm (`--init RUN`)."""
    try:
        checkpoint.load_weights(algorithm, init_run / checkpoint.BEST_WEIGHTS)
    except CheckpointError as error:
        raise ConfigError(f"`init={init_run}`: {error}") from None
