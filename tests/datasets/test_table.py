"""Few-shot classification of a CSV file's rows: the reader, the class split, the
standardisation, and training on it from the command line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from fewshot.cli import main
from fewshot.datasets.table import load_table, split_classes, table_parts
from fewshot.errors import ConfigError, DataError


def write_table(path, classes=20, rows=12, features=6, informative=None, seed=0):
    """Rows of Gaussian clusters, one per class: the class means differ in the first
    `informative` features (all by default); the others are noise, three times as wide."""
    rng = np.random.default_rng(seed)
    informative = features if informative is None else informative
    noise = np.where(np.arange(features) < informative, 1.0, 3.0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["f0", "label", *(f"f{i}" for i in range(1, features))])
        for c in range(classes):
            mean = np.where(np.arange(features) < informative, rng.normal(0, 2, features), 0) + 5
            for _ in range(rows):
                x = mean + rng.normal(0, 1, features) * noise
                writer.writerow([f"{x[0]:.4f}", f"kind {c:02d}", *(f"{v:.4f}" for v in x[1:])])
    return path


def test_the_reader_keeps_values_classes_and_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,kind,b\n1.5,cat,2\n-3,dog,4e1\n\n0,cat,0\n")
    table = load_table(path, "kind")
    assert table.columns == ["a", "b"]
    assert table.classes == ["cat", "dog"]
    assert table.labels.tolist() == [0, 1, 0]
    assert table.features.tolist() == [[1.5, 2.0], [-3.0, 40.0], [0.0, 0.0]]


def test_classes_are_split_disjointly_and_features_standardised_by_the_training_rows(tmp_path):
    table = load_table(write_table(tmp_path / "t.csv"), "label")
    chosen = split_classes(table.classes)
    assert [len(chosen[p]) for p in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(chosen["train"] + chosen["val"] + chosen["test"]) == list(range(20))
    parts = dict(zip(("train", "val", "test"), table_parts(table, ("train", "val", "test"))))
    train_rows = np.isin(table.labels.numpy(), chosen["train"])
    raw = table.features.numpy().astype(np.float64)
    mean, std = raw[train_rows].mean(0), raw[train_rows].std(0, ddof=1)
    test_rows = np.isin(table.labels.numpy(), chosen["test"])
    expected = (raw[test_rows] - mean) / std
    np.testing.assert_allclose(parts["test"][0].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert set(parts["test"][1].tolist()) == set(chosen["test"])
    np.testing.assert_allclose(parts["train"][0].mean(0).numpy(), 0, atol=1e-5)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a,label\n1,x\n", "has no column 'kind'; its columns are a, label"),
        ("a,kind\n1,x\nred,y\n", "line 3, column 'a': 'red' is not a number"),
        ("a,kind\n1,x\n,y\n", "line 3, column 'a': the value is missing"),
        ("a,kind\n1,x\n1,2,3\n", "line 3: 3 values, the header has 2"),
        ("a,kind\n", "has no data rows below its header"),
        ("kind\nx\n", "has no feature column besides 'kind'"),
        ("a,kind\n1,x\n2, \n", "line 3: the 'kind' value is missing"),
    ],
)
def test_bad_tables_are_refused_with_one_line(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_table(path, "kind")


def test_too_few_classes_to_split_are_refused(tmp_path):
    table = load_table(write_table(tmp_path / "t.csv", classes=6), "label")
    message = r"6 classes split by `class_split` \(0.6,0.2,0.2\) give train 3, val 1, test 2"
    with pytest.raises(DataError, match=message):
        table_parts(table, ("train",))


def test_the_class_split_sets_the_parts_shares():
    classes = [f"c{i}" for i in range(10)]
    chosen = split_classes(classes, "0.4,0.3,0.3")
    assert [len(chosen[p]) for p in ("train", "val", "test")] == [4, 3, 3]
    assert sorted(sum(chosen.values(), [])) == list(range(10))
    for bad in ("0.5,0.5", "a,b,c", "0.5,0.3,0.3", "1,0,0"):
        with pytest.raises(ConfigError, match=f"`class_split={bad}` is not three positive"):
            split_classes(classes, bad)


def test_a_part_with_fewer_classes_than_ways_names_the_option_that_gives_it_more(tmp_path):
    table = write_table(tmp_path / "t.csv", classes=10)
    args = ["train", "--dataset", "csv", "--data-root", str(table), "--label-column", "label",
            "--ways", "3", "--queries", "5", "--train-queries", "5", "--iterations", "20",
            "--val-every", "10", "--val-episodes", "5",
            "--test-episodes", "5"]  # fmt: skip
    refused = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1
    assert refused.output == (
        "error: the val part has 2 of the table's 10 classes (--class-split "
        "0.6,0.2,0.2), fewer than --ways 3; give it a larger share with --class-split, or "
        "lower --ways.\n"
    )
    trained = CliRunner().invoke(
        main, [*args, "--class-split", "0.4,0.3,0.3", "--out", str(tmp_path / "b")]
    )
    assert trained.exit_code == 0, trained.output
    assert "meta-test accuracy" in trained.output


def train(tmp_path, table, name, *extra):
    out = tmp_path / name
    result = CliRunner().invoke(
        main,
        ["train", "--dataset", "csv", "--data-root", str(table), "--label-column", "label",
         "--ways", "3", "--val-every", "50", "--val-episodes", "20", "--test-episodes", "0",
         "--out", str(out), *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def evaluate(run, table) -> float:
    result = CliRunner().invoke(
        main, ["eval", str(run), "--data-root", str(table), "--episodes", "100", "--json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["protonet", "maml"])
def test_training_on_a_table_learns_to_tell_held_out_classes_apart(tmp_path, algorithm):
    """Classes whose means differ in 4 of 16 features, the other 12 wide noise: a network
    trained on the training classes learns which features tell classes apart, and separates
    held-out classes better than the same network untrained."""
    table = write_table(tmp_path / "t.csv", classes=30, rows=15, features=16, informative=4)
    options = ["--algorithm", algorithm, "--shots", "1", "--queries", "5", "--train-ways", "3"]
    iterations = "300"
    if algorithm == "maml":  # 3-way training tasks (its head has --ways outputs), slower to learn
        options, iterations = options[:-2] + ["--meta-batch", "8"], "600"
    trained = train(tmp_path, table, "trained", *options, "--iterations", iterations)
    untrained = train(tmp_path, table, "untrained", *options, "--iterations", "1")
    config = json.loads((trained / "config.json").read_text())
    assert (config["features"], config["label_column"]) == (16, "label")
    assert evaluate(trained, table) > evaluate(untrained, table) + 0.05


def test_csv_options_are_checked(tmp_path):
    table = write_table(tmp_path / "t.csv")

    def error_of(*args):
        result = CliRunner().invoke(main, ["train", *map(str, args), "--out", tmp_path / "r"])
        assert result.exit_code == 2, result.output
        return result.output

    assert "needs --label-column NAME" in error_of("--dataset", "csv", "--data-root", table)
    assert "--label-column applies to --dataset csv only" in error_of("--label-column", "x")
    assert "does not handle --dataset csv" in error_of(
        "--dataset", "csv", "--data-root", table, "--label-column", "label",
        "--algorithm", "relationnet",
    )  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_a_file_that_is_not_csv_text_is_refused_with_one_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"a,kind\n\xff\xfe1,x\n")
    with pytest.raises(DataError, match="is not a readable CSV file .*save it as UTF-8"):
        load_table(path, "kind")


@pytest.mark.slow
def test_plot_and_adapt_on_a_table_run(tmp_path):
    table = write_table(tmp_path / "t.csv")
    run = train(tmp_path, table, "run", "--algorithm", "maml", "--shots", "1", "--queries", "2",
                "--iterations", "10")  # fmt: skip
    result = CliRunner().invoke(
        main, ["plot", str(run), "--data-root", str(table), "--episodes", "5", "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "episode.png: not drawn, a table's rows are not images" in result.output
    assert (run / "plots" / "adaptation.png").is_file()
    result = CliRunner().invoke(
        main, ["adapt", str(run), "--support", str(tmp_path), "--predict", str(table)]
    )
    assert result.exit_code == 2
    assert "was trained on --dataset csv; adapt reads images" in result.output
