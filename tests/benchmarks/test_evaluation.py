"""benchmarks/evaluation.py: the table of seconds per 600 episodes, with before and after
columns."""

from benchmarks import evaluation


def row(label, median, before=None, options=()):
    values = {"model": label.lower(), "options": list(options), "label": label}
    values.update(median=median, rounds=[median, median + 1, median - 1])
    if before is not None:
        values.update(before=before, **{"rounds before": [before] * 3})
    return values


def test_the_table_shows_each_version_against_protonet_and_inductive_against_transductive():
    rows = [
        row("ProtoNet", 10.0, before=20.0),
        row("MAML (transductive)", 20.0, before=30.0),
        row("MAML inductive", 50.0, before=120.0, options=("--batch-norm", "inductive")),
    ]
    lines = evaluation.table(rows).splitlines()
    assert "before" in lines[0] and "after" in lines[0]
    assert lines[1].count("|") == lines[0].count("|")
    inductive = lines[-1]
    assert "| 120 | 6.0 (4.0x its transductive) | 120, 120, 120 |" in inductive
    assert "| 50 | 5.0 (2.5x its transductive) | 50, 51, 49 |" in inductive


def test_without_an_earlier_checkout_the_table_has_one_version():
    lines = evaluation.table([row("ProtoNet", 10.0), row("Reptile", 95.0)]).splitlines()
    assert "before" not in lines[0] and "after" not in lines[0]
    assert lines[-1] == "| Reptile | 95 | 9.5 | 95, 96, 94 |"
