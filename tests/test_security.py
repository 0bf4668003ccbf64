"""Nothing the library loads can run code: no pickle, no torch.load without weights_only."""

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fewshot"


def test_source_never_unpickles():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bimport pickle\b|\bpickle\.load|cloudpickle|dill\b", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "allow_pickle=True" not in text, path
