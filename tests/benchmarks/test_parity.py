"""The parity harness (benchmarks/parity): its references compute what their definitions say
on tiny cases, and report.py renders the table from a result file. The learn2learn tests skip
where learn2learn is not installed (it is in benchmarks/.peers-venv, not in the project's
venv)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.parity import report
from benchmarks.parity.references import REFERENCES, algorithm_of
from benchmarks.parity.references.reptile import ReptileReference
from fewshot.tasks import Task


def quadratic_task() -> Task:
    """One task whose loss for a 1-parameter linear model w is (w - 3)^2 (x = 1, y = 3)."""
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    return Task(one, 3 * one, one, 3 * one)


def test_reptile_update_on_a_quadratic_is_the_hand_worked_value():
    network = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        network.weight.fill_(1.0)
    reptile = ReptileReference(
        network, inner_lr=0.1, inner_steps=2, inner_batch=None, eval_inner_steps=2,
        epsilon=0.5, final_epsilon=0.0, iterations=2, loss=F.mse_loss,
    )  # fmt: skip
    reptile.train_step(quadratic_task())
    # Adam (beta1 = 0, beta2 = 0.999, eps = 1e-8), lr 0.1, from w = 1 on L(w) = (w - 3)^2:
    # step 1: g = -4, v = 0.001 * 16, v_hat = 16: w = 1 + 0.1 * 4 / (4 + 1e-8)
    w1 = 1 + 0.1 * 4 / (4 + 1e-8)
    # step 2: g = 2 (w1 - 3), v = 0.999 * 0.016 + 0.001 g^2, v_hat = v / (1 - 0.999^2)
    g2 = 2 * (w1 - 3)
    v_hat = (0.999 * 0.016 + 0.001 * g2**2) / (1 - 0.999**2)
    w2 = w1 - 0.1 * g2 / (math.sqrt(v_hat) + 1e-8)
    # outer update with epsilon 0.5 (the first of 2 iterations): theta + 0.5 (W - theta)
    assert network.weight.item() == pytest.approx(1 + 0.5 * (w2 - 1), rel=1e-12)
    assert reptile.current_epsilon() == pytest.approx(0.25)  # annealed linearly to 0


def test_reptile_averages_the_tasks_moves():
    network = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        network.weight.fill_(1.0)
    reptile = ReptileReference(network, 0.1, 1, None, 1, 1.0, 1.0, 10, loss=F.mse_loss)
    one = torch.ones(2, 1, 1, dtype=torch.float64)
    targets = torch.tensor([3.0, -1.0], dtype=torch.float64).view(2, 1, 1)
    reptile.train_step(Task(one, targets, one, targets))
    # one Adam step moves w by lr * sign(g): +0.1 towards 3, -0.1 towards -1; mean 0
    assert network.weight.item() == pytest.approx(1.0, abs=1e-9)


def small_task(seed: int = 0, tasks: int = 2) -> Task:
    g = torch.Generator().manual_seed(seed)
    ways, shots, queries = 3, 2, 2
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return Task(
        torch.randn(tasks, ways * shots, 4, generator=g, dtype=torch.float64),
        support_y,
        torch.randn(tasks, ways * queries, 4, generator=g, dtype=torch.float64),
        query_y,
    )


def small_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("first_order", [False, True])
def test_learn2learn_maml_meta_gradient_equals_fewshots(first_order):
    pytest.importorskip("learn2learn", reason="learn2learn is in benchmarks/.peers-venv only")
    from benchmarks.parity.references.learn2learn import Learn2LearnReference
    from fewshot import MAML

    tasks = small_task()
    network = small_network()
    fewshot_maml = MAML(network, inner_lr=0.4, inner_steps=2, first_order=first_order)
    fewshot_maml.training_step(tasks)
    expected = [p.grad.clone() for p in fewshot_maml.parameters()]
    reference = Learn2LearnReference(
        "maml", network, inner_lr=0.4, inner_steps=2, eval_inner_steps=2,
        first_order=first_order, outer_lr=0.0,
    )  # fmt: skip
    reference.train_step(tasks)  # lr 0: the Adam step leaves the weights, .grad is kept
    got = [p.grad for p in reference.parameters()]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_learn2learn_predict_adapts_on_the_support_set():
    pytest.importorskip("learn2learn", reason="learn2learn is in benchmarks/.peers-venv only")
    from benchmarks.parity.references.learn2learn import Learn2LearnReference

    tasks = small_task(tasks=3)
    reference = Learn2LearnReference("maml", small_network(), 0.4, 1, 5, False, 1e-3)
    with torch.no_grad():  # as fewshot's evaluator calls it
        logits = reference.predict(tasks)
    assert logits.shape == (3, 6, 3)
    unadapted = reference.learner(tasks.query_x)
    assert not torch.allclose(logits, unadapted)


def test_registry_names_a_reference_for_each_method():
    for spec in REFERENCES.values():
        assert spec.module and spec.builder and spec.repository and spec.version
    assert algorithm_of("fomaml") == "maml"
    assert "--first-order" in REFERENCES["fomaml"].fewshot_flags


def result(mean=-0.01, ci95=0.02, fewshot_seconds=1.0, reference_seconds=2.0) -> dict:
    return {
        "method": "maml",
        "reference": {"repository": "https://github.com/learnables/learn2learn",
                      "version": "0.2.0", "source": "learn2learn 0.2.0, maml.py"},
        "iterations": 100,
        "val_episodes": 50,
        "seconds_per_iteration": {"fewshot": fewshot_seconds, "reference": reference_seconds},
        "test": {
            "episodes": 600,
            "fewshot": {"metric": "accuracy", "accuracy": 0.9, "ci95": 0.01},
            "reference": {"metric": "accuracy", "accuracy": 0.91, "ci95": 0.01},
        },
        "paired_difference": {"mean": mean, "ci95": ci95, "t": -1.0, "p": 0.3, "episodes": 600},
        "validation": {"fewshot": [], "reference": []},
        "commands": {"pair": "python benchmarks/parity/run.py maml --iterations 100"},
    }  # fmt: skip


def test_verdict_names_the_failed_conditions():
    assert report.verdict(result()) == "parity"
    assert report.verdict(result(mean=-0.05)) == "no parity: fewshot less accurate"
    assert report.verdict(result(fewshot_seconds=3.0)) == "no parity: fewshot slower"
    assert report.verdict(result(mean=0.05, ci95=0.01)) == "parity"  # fewshot better


def test_report_renders_the_table_between_the_markers(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "maml.json").write_text(json.dumps(result()))
    doc = tmp_path / "parity.md"
    doc.write_text(f"# Parity\n\nintro\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n")
    report.main(["--results", str(results), "--doc", str(doc), "--no-figures"])
    text = doc.read_text()
    assert "old table" not in text and text.endswith(f"{report.END}\n\nafter\n")
    row = next(line for line in text.splitlines() if line.startswith("| maml"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:7] == [
        "maml", "learnables/learn2learn 0.2.0", "100", "1", "2", "90.00% ± 1.00",
        "91.00% ± 1.00",
    ]  # fmt: skip
    assert cells[7] == "-1.00 ± 2.00 points" and cells[9] == "parity"
    assert "[curves](plots/parity-maml.png)" in row


def test_a_pair_whose_settings_differ_is_no_parity():
    differing = {**result(), "checks": {"config_differences": ["train_queries"]}}
    assert report.verdict(differing) == "no parity: settings differ: train_queries"


def test_both_sides_are_timed_over_the_same_ten_iteration_intervals():
    from benchmarks.parity import run

    # the reference logs every iteration at 1 s each, with a 30 s validation after iteration
    # 20; fewshot logs every 10th at 2 s each, with its validation in the same interval
    reference, fewshot, clock = [], [], 0.0
    for i in range(1, 41):
        clock += 1.0 + (30.0 if i == 21 else 0.0)
        reference.append({"iteration": i, "loss": 0.0, "seconds": clock})
    reference.append({"iteration": 20, "split": "val", "accuracy": 0.5})
    for i in range(10, 41, 10):
        fewshot.append({"iteration": i, "loss": 0.0, "seconds": 2.0 * i + (30.0 if i > 20 else 0)})
    assert run.seconds_per_iteration(reference) == pytest.approx(1.0)
    assert run.seconds_per_iteration(fewshot) == pytest.approx(2.0)
    assert run.seconds_per_iteration([{"iteration": 5, "seconds": 1.0}]) is None


def test_same_initial_weights_matches_tensors_one_to_one_and_leaves_the_generator():
    from benchmarks.parity import run
    from fewshot.training.config import TrainConfig
    from fewshot.training.factory import build_algorithm
    from fewshot.training.loop import seed_everything

    config = TrainConfig(algorithm="maml", dataset="omniglot").resolved()
    seed_everything(config.seed)
    initial = build_algorithm(config).state_dict()
    theirs = {f"learner.module.{i}": t.clone() for i, t in enumerate(reversed(initial.values()))}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert run.same_initial_weights(config, theirs)
    assert torch.equal(torch.get_rng_state(), before)
    first = next(k for k, t in theirs.items() if t.dim() > 1)
    assert not run.same_initial_weights(config, {**theirs, first: theirs[first] + 1e-3})
    assert not run.same_initial_weights(config, dict(list(theirs.items())[1:]))


def test_fewshot_is_slower_only_beyond_the_noise_of_both_sides_intervals():
    noisy = [1.0, 1.3, 0.9, 1.2, 1.1, 1.4, 1.0, 1.2]
    same = {**result(fewshot_seconds=1.15, reference_seconds=1.1)}
    same["interval_seconds"] = {"fewshot": [x + 0.02 for x in noisy], "reference": noisy}
    assert report.verdict(same) == "parity"
    slower = {**same, "interval_seconds": {"fewshot": [x + 1 for x in noisy], "reference": noisy}}
    assert report.verdict(slower) == "no parity: fewshot slower"


def test_chen_initialisation_draws_convolutions_by_fan_out_and_resets_batch_norm():
    from benchmarks.parity.init_control import chen_init_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 64, 3))
    with torch.no_grad():
        net[1].weight.fill_(3.0)
        net[1].bias.fill_(2.0)
    chen_init_(net)
    for conv in (net[0], net[2]):
        expected = math.sqrt(2.0 / (3 * 3 * 64))
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
        assert abs(conv.weight.mean().item()) < 0.2 * expected
    assert torch.equal(net[1].weight, torch.ones(64)) and torch.equal(net[1].bias, torch.zeros(64))


def test_the_rounding_control_moves_every_parameter_by_one_unit_in_the_last_place():
    from benchmarks.parity.init_control import one_ulp_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 5))
    before = [p.detach().clone() for p in net.parameters()]
    one_ulp_(net, seed=3)
    ups = 0
    for old, new in zip(before, net.parameters()):
        up = new > old
        ups += int(up.sum())
        # one step each way: back from where it moved lands on the old value exactly
        back = torch.nextafter(new.detach(), torch.where(up, -math.inf, math.inf))
        assert torch.equal(back, old) and not torch.equal(new, old)
        assert ((new > old) | (new < old)).all()
    total = sum(p.numel() for p in before)
    assert 0.4 * total < ups < 0.6 * total


def test_a_setting_control_is_the_same_run_with_one_prediction_setting_changed(tmp_path):
    from benchmarks.parity.setting_control import main as setting_control
    from fewshot.training import checkpoint
    from fewshot.training.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(algorithm="meta-lstm", dataset="omniglot").resolved()
    checkpoint.write_config(run, config)
    (run / checkpoint.BEST_WEIGHTS).write_bytes(b"weights")
    (run / "test_scores.json").write_text("{}")
    setting_control([str(run), str(tmp_path / "control"), "statistics_momentum=0.95"])
    control = checkpoint.read_config(tmp_path / "control")
    assert control.settings.statistics_momentum == 0.95
    assert dataclasses.replace(control.settings, statistics_momentum=None) == dataclasses.replace(
        config.settings, statistics_momentum=None
    )
    assert (tmp_path / "control" / checkpoint.BEST_WEIGHTS).read_bytes() == b"weights"
    assert not (tmp_path / "control" / "test_scores.json").exists()  # the pair's, not its own
    with pytest.raises(SystemExit):
        setting_control([str(run), str(tmp_path / "other"), "no_such_setting=1"])
    assert not (tmp_path / "other").exists()


def test_the_evaluator_reads_a_reference_s_steps_as_a_method_s():
    """fewshot's evaluator asks `adapts_by_steps` of what it evaluates: the harness's wrapper
    answers for a reference with steps (Reptile's) and for one without."""
    from benchmarks.parity.run import ReferenceModel
    from fewshot.training.evaluation import reported_steps

    reptile = ReptileReference(
        small_network(), inner_lr=0.1, inner_steps=2, inner_batch=None, eval_inner_steps=7,
        epsilon=0.5, final_epsilon=0.0, iterations=2, loss=F.cross_entropy,
    )  # fmt: skip
    stepped = ReferenceModel(reptile)
    assert stepped.adapts_by_steps and reported_steps(stepped, None) == 7
    assert reported_steps(stepped, 3) == 3
    metric = nn.Module()
    metric.is_transductive = False
    assert reported_steps(ReferenceModel(metric), 3) is None
