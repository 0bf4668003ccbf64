"""benchmarks/evaluation.py: the table of seconds per 600 episodes, with before and after
columns, and the work each model's episodes do."""

import pytest

from benchmarks import evaluation


def row(label, median, before=None, options=(), gflop=1000.0):
    values = {"model": label.lower(), "options": list(options), "label": label}
    values.update(median=median, rounds=[median, median + 1, median - 1], gflop=gflop)
    if before is not None:
        values.update(before=before, **{"rounds before": [before] * 3})
    return values


def test_the_table_shows_each_version_against_protonet_and_inductive_against_transductive():
    rows = [
        row("ProtoNet", 10.0, before=20.0),
        row("MAML (transductive)", 20.0, before=30.0),
        row("MAML inductive", 50.0, before=120.0, options=("--batch-norm", "inductive")),
    ]
    lines = evaluation.table(rows, matmul=100.0).splitlines()
    assert "before" in lines[0] and "after" in lines[0]
    assert lines[1].count("|") == lines[0].count("|")
    inductive = lines[-1]
    assert "| 120 | 6.0 (4.0x its transductive) | 120, 120, 120 |" in inductive
    assert "| 50 | 5.0 (2.5x its transductive) | 50, 51, 49 |" in inductive


def test_without_an_earlier_checkout_the_table_has_one_version():
    rows = [row("ProtoNet", 10.0), row("Reptile", 95.0, gflop=7600.0)]
    lines = evaluation.table(rows, matmul=100.0).splitlines()
    assert "before" not in lines[0] and "after" not in lines[0]
    assert lines[1].count("|") == lines[0].count("|")
    assert lines[-1] == "| Reptile | 95 | 9.5 | 95, 96, 94 | 7,600 | 80 (80%) |"


def test_counting_flops_runs_the_tasks_one_at_a_time_and_restores_the_setting():
    class Learner:
        vectorize = True

    learner = Learner()
    with pytest.raises(RuntimeError), evaluation.counted_flops(learner):
        assert learner.vectorize is False
        raise RuntimeError("an evaluation that fails")
    assert learner.vectorize is True
    with evaluation.counted_flops(object()) as counter:  # a method with nothing to vectorise
        pass
    assert counter.get_total_flops() == 0


# Conv4 (64 channels, 3x3, padding 1, each block halving the side) on one 28x28 image:
# 2 x side^2 x out x in x 9 per convolution, at sides 28, 14, 7 and 3.
CONV4_FORWARD_FLOP = sum(
    2 * side**2 * 64 * c_in * 9 for side, c_in in ((28, 1), (14, 64), (7, 64), (3, 64))
)


@pytest.mark.slow
def test_the_work_of_protonets_episodes_is_its_encoders_forward_passes(omniglot_root, monkeypatch):
    """600 ProtoNet episodes (5-way 1-shot, 15 queries: 80 images each) are 48,000 Conv4
    forward passes; the distances to 5 prototypes add almost nothing."""
    monkeypatch.setenv("FEWSHOT_DATA_ROOT", str(omniglot_root))
    gflop = evaluation.gflop_per_600_episodes("protonet-omniglot-5w1s", ())
    assert gflop == pytest.approx(600 * 80 * CONV4_FORWARD_FLOP / 1e9, rel=1e-3)


@pytest.mark.slow
def test_an_adaptation_steps_work_is_counted_as_plain_convolutions_would_count_it(
    omniglot_root, monkeypatch
):
    """A MAML step on 25 support sets of 5 images: each image's Conv4 forward pass, its weight
    gradients (as much again) and its input gradients but the first layer's, plus the 64 to 5
    linear head's three products. Run as groups, torch's counter alone would take each weight
    gradient 25 times."""
    monkeypatch.setenv("FEWSHOT_DATA_ROOT", str(omniglot_root))
    algorithm, batch, steps = evaluation.first_draw("maml-omniglot-5w1s-cpu")
    first_layer = 2 * 28**2 * 64 * 9
    head = 3 * 2 * 64 * 5
    per_image = 3 * CONV4_FORWARD_FLOP - first_layer + head
    gflop = evaluation.adaptation_gflop_per_step(algorithm, batch, steps)
    assert gflop == pytest.approx(25 * 5 * per_image / 1e9, rel=1e-3)
    assert algorithm.vectorize  # as it was
