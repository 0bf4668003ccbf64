"""A copy of a trained run folder whose configuration differs in prediction-time settings only
(Meta-LSTM's `statistics_momentum`, say): the same weights, scored under another setting with
`run.py --score-control` (docs/parity.md). Settings that shape training cannot be changed
after it, so this is only for those the method reads when it predicts.

    PYTHONPATH=src python benchmarks/parity/setting_control.py runs/parity-meta-lstm/fewshot \
        runs/control-meta-lstm-momentum statistics_momentum=0.95
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from fewshot.training import checkpoint


def parsed(text: str) -> tuple[str, object]:
    """`name=value`, the value read as JSON where it parses (numbers, true/false), else text."""
    name, _, value = text.partition("=")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path, help="the new run folder (must not exist)")
    parser.add_argument("settings", nargs="+", metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    config = checkpoint.read_config(args.run)
    changes = dict(map(parsed, args.settings))
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(config.settings)})
    if unknown:
        parser.error(f"{config.algorithm} has no setting {unknown[0]!r}")
    dataclasses.replace(config.settings, **changes).check(config)  # refuse a bad value here
    shutil.copytree(args.run, args.out, ignore=shutil.ignore_patterns("test_scores*.json"))
    # The recorded document with those keys changed and nothing else rewritten (an older run's
    # document read and written again would gain the fields it was recorded without).
    path = args.out / checkpoint.CONFIG_FILE
    document = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**document, **changes}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
