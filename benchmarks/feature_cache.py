"""What computing a frozen backbone's features once saves (docs/pretrained.md): seconds per
training iteration and per evaluation, with the features cached and recomputed, in
one process, for two workloads:

- omniglot: MAML learning a 5-way head over Conv4 frozen whole, started from Baseline's
  pretrained body (zoo/baseline-omniglot-5w1s), Omniglot 5-way 1-shot;
- resnet12-84: the same (1 inner step, 5 queries, 1 task per batch) over a ResNet-12
  (64-160-320-640) at 84x84 RGB, from its random initialisation, on a folder of random images
  written for the purpose: the time, not the accuracy, is the point.

A training iteration's time is the mean over `STEPS` meta-updates (`meta_step`) of the built
method on the same meta-batches, drawn from the images or from the features computed
beforehand; the features' computation (every image of the three parts, once) is timed apart.
An evaluation's time includes the computation of its part's features (600 episodes on
Omniglot; 30 for ResNet-12, whose recomputed episodes take seconds each). Each figure is the
median over `--rounds`.

    FEWSHOT_DATA_ROOT=../shared/data/omniglot python benchmarks/feature_cache.py [--rounds 3]
        [--workloads omniglot,resnet12-84] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewshot.backbones import start_from_weights
from fewshot.training.config import TrainConfig
from fewshot.training.evaluation import evaluate_episodes
from fewshot.training.factory import build_algorithm, build_sources
from fewshot.training.feature_cache import cached_backbone, on_features, skipped
from fewshot.training.loop import meta_step

REPO = Path(__file__).resolve().parents[1]
# meta-updates timed per setting: recomputed ones take a second or more each
STEPS = {"recomputed": 10, "cached": 100}
# ResNet-12's recomputed episodes take seconds each on a CPU: fewer of them
EPISODES = {"omniglot": 600, "resnet12-84": 30}


def random_folder(root: Path, side: int = 84) -> Path:
    """train/ val/ test/ of 20, 8 and 8 classes of 20 random RGB images each."""
    rng = np.random.default_rng(0)
    for part, classes in (("train", 20), ("val", 8), ("test", 8)):
        for c in range(classes):
            folder = root / part / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(20):
                pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def workload(name: str, scratch: Path) -> tuple[dict, Path | None]:
    """The training settings of a workload, and its data folder (None: the default's)."""
    common = dict(algorithm="maml", freeze="backbone", val_every=10**6, val_episodes=2)
    common |= dict(test_episodes=0, checkpoint_every=10**6)
    if name == "omniglot":
        weights = REPO / "zoo" / "baseline-omniglot-5w1s" / "model.safetensors"
        return dict(
            common, dataset="omniglot", backbone_weights=str(weights),
            weights_prefix="encoder.features.",
        ), None  # fmt: skip
    folder = random_folder(scratch / "images")
    return dict(
        common, dataset="folder", backbone="resnet12", image_size=84, channels=3, shots=1,
        queries=5, train_queries=5, meta_batch=1, inner_steps=1,
    ), folder  # fmt: skip


def step_seconds(algorithm, sampler, meta_batch: int, steps: int) -> float:
    """Mean seconds of `steps` meta-updates of `algorithm` on meta-batches from `sampler`."""
    learned = [p for p in algorithm.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(learned, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    batches = [sampler.sample(meta_batch, generator) for _ in range(steps + 1)]
    meta_step(algorithm, optimizer, batches[0])  # warm-up
    started = time.perf_counter()
    for tasks in batches[1:]:
        meta_step(algorithm, optimizer, tasks)
    return (time.perf_counter() - started) / steps


def measure(name: str, rounds: int) -> dict:
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp())
    settings, data_root = workload(name, scratch)
    config = TrainConfig.from_dict({**settings, "iterations": 1}).resolved()
    sources = build_sources(config, data_root)
    assert config.meta_batch is not None  # resolved
    figures: dict[str, list[float]] = {}
    for _ in range(rounds):
        torch.manual_seed(0)
        algorithm = build_algorithm(config)
        if config.backbone_weights:
            start_from_weights(algorithm, Path(config.backbone_weights), config.weights_prefix)
        backbone = cached_backbone(algorithm, sources.train, sources.val, sources.test)
        assert backbone is not None  # frozen whole: cacheable
        started = time.perf_counter()
        cached = [
            on_features(part, backbone) for part in (sources.train, sources.val, sources.test)
        ]
        figures.setdefault("features of every image, once (s)", []).append(
            time.perf_counter() - started
        )
        recomputed = step_seconds(algorithm, sources.train, config.meta_batch, STEPS["recomputed"])
        with skipped(algorithm):
            on_cached = step_seconds(algorithm, cached[0], config.meta_batch, STEPS["cached"])
        figures.setdefault("recomputed s/iteration", []).append(recomputed)
        figures.setdefault("cached s/iteration", []).append(on_cached)
        for cache in (True, False):
            key = "cached" if cache else "recomputed"
            started = time.perf_counter()
            evaluate_episodes(algorithm, sources.test, EPISODES[name], cache_features=cache)
            figures.setdefault(f"{key} s/evaluation", []).append(time.perf_counter() - started)
    medians = {k: statistics.median(v) for k, v in figures.items()}
    return {"workload": name, "episodes": EPISODES[name], "rounds": rounds, **medians}


def table(rows: list[dict]) -> str:
    lines = [
        "| workload | s/iteration cached | recomputed | x | episodes | s cached | "
        "recomputed | x | features once (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train = r["recomputed s/iteration"] / r["cached s/iteration"]
        evaluation = r["recomputed s/evaluation"] / r["cached s/evaluation"]
        lines.append(
            f"| {r['workload']} | {r['cached s/iteration']:.4f} | "
            f"{r['recomputed s/iteration']:.4f} | {train:.1f} | {r['episodes']} | "
            f"{r['cached s/evaluation']:.1f} | {r['recomputed s/evaluation']:.1f} | "
            f"{evaluation:.1f} | {r['features of every image, once (s)']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="omniglot,resnet12-84")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    rows = [measure(name, args.rounds) for name in args.workloads.split(",")]
    print(table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
