"""benchmarks/pretrained.py: F's learning rate is chosen on the validation classes, and the
runs are scored plain and with F on the same test episodes."""

from pathlib import Path

import pytest

from benchmarks import pretrained

ZOO = Path(__file__).resolve().parents[2] / "zoo" / "protonet-omniglot-5w1s"


@pytest.mark.slow
@pytest.mark.omniglot
def test_a_run_is_scored_plain_and_fine_tuned_on_the_same_episodes(omniglot_root, monkeypatch):
    monkeypatch.setenv("FEWSHOT_DATA_ROOT", str(omniglot_root))
    row = pretrained.measure(ZOO, episodes=4, steps=2, lrs=[0.001, 0.01], val_episodes=3)
    assert row["lr"] in (0.001, 0.01) and set(row["val"]) == {0.001, 0.01}
    assert row["val"][row["lr"]] == max(row["val"].values())
    assert len(row["scores"]["plain"]) == len(row["scores"]["finetuned"]) == 4
    assert row["plain"]["episodes"] == 4 and row["split"] == "vinyals"
    rendered = pretrained.table([row, row])
    assert "| vinyals |" in rendered and "+0.00 ± 0.00" in rendered  # a run minus itself
