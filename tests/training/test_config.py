"""Resolution of a run's settings: the papers' defaults and the chunk size per setting."""

import contextlib
import dataclasses
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fewshot.algorithms import METHODS
from fewshot.algorithms.gradient import default_chunk_size
from fewshot.errors import ConfigError
from fewshot.training.config import TrainConfig, run_setting_names


def test_sinusoid_runs_the_whole_meta_batch_in_one_pass():
    config = TrainConfig(algorithm="maml", dataset="sinusoid").resolved()
    assert config.settings.vectorize and config.settings.chunk_size == config.meta_batch == 25


def test_images_on_a_cpu_are_vectorised_in_chunks_of_about_40_images_unless_told():
    one_query = TrainConfig(dataset="omniglot", train_queries=1).resolved()
    assert one_query.settings.chunk_size == 4  # 10 images a task
    assert (
        TrainConfig(dataset="omniglot").resolved().settings.chunk_size == 1
    )  # 15 queries: 80 images
    assert (
        TrainConfig(dataset="omniglot", settings={"chunk_size": 32}).resolved().settings.chunk_size
        == 32
    )


def test_the_benchmarks_images_are_chunked_like_omniglots_and_tables_are_not():
    """miniImageNet's 5-way 1-shot 1-query tasks hold 10 images, as Omniglot's do."""
    for dataset in ("mini-imagenet", "tiered-imagenet", "cifar-fs", "fc100", "cub"):
        config = TrainConfig(dataset=dataset, train_queries=1, meta_batch=4).resolved()
        assert config.settings.chunk_size == 4, dataset
        config = TrainConfig(dataset=dataset, meta_batch=4).resolved()  # 15 queries: 80 images
        assert config.settings.chunk_size == 1, dataset
    table = TrainConfig(dataset="csv", label_column="y", meta_batch=32).resolved()
    assert table.settings.chunk_size == 32


def test_config_files_written_before_chunk_size_existed_still_load():
    old = {"algorithm": "maml", "dataset": "omniglot", "vectorize": False}
    config = TrainConfig.from_dict(old).resolved()
    assert config.settings.vectorize is False and config.settings.chunk_size == 1


def test_auto_vectorize_of_earlier_config_files_means_vectorize():
    config = TrainConfig.from_dict({"dataset": "sinusoid", "vectorize": None}).resolved()
    assert config.settings.vectorize is True


def test_protonet_has_no_inner_loop_settings():
    config = TrainConfig(algorithm="protonet", dataset="omniglot").resolved()
    assert not hasattr(config.settings, "chunk_size")
    with pytest.raises(ConfigError, match="chunk_size is not a setting of protonet"):
        TrainConfig(algorithm="protonet", settings={"chunk_size": 2})


def test_a_misspelt_setting_is_refused_with_the_closest_names():
    with pytest.raises(ConfigError, match=r"iteratons is not a setting of maml \(did you mean "
                       r"iterations\?\); its settings are"):  # fmt: skip
        TrainConfig.from_dict({"iteratons": 3}).resolved()
    with pytest.raises(ConfigError, match=r"^zzz is not a setting of maml; its settings"):
        TrainConfig.from_dict({"zzz": 3}).resolved()


def test_every_value_of_the_wrong_type_is_named_not_only_the_first():
    message = "ways must be an integer, got 1.5. shots must be an integer or null, got 'one'."
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        TrainConfig.from_dict({"ways": 1.5, "shots": "one"})
    with pytest.raises(ConfigError, match="`inner_lr` must be positive, got -1.0. `inner_steps` "):
        TrainConfig.from_dict({"inner_lr": -1.0, "inner_steps": 0}).resolved()


def test_a_gpu_takes_the_whole_meta_batch_in_one_pass():
    assert default_chunk_size(True, 32, 80, "cuda") == 32
    assert default_chunk_size(True, 32, 80, "cuda:1") == 32
    assert default_chunk_size(True, 32, 10, "cpu") == 4
    assert default_chunk_size(True, 2, 10, "cpu") == 2
    assert default_chunk_size(True, 32, 400, "cpu") == 1
    assert default_chunk_size(False, 32, 400, "cpu") == 32  # sinusoid, tables
    assert TrainConfig(dataset="omniglot").resolved("cuda").settings.chunk_size == 32


def test_non_positive_chunk_size_is_refused():
    with pytest.raises(ConfigError, match="`chunk_size` must be positive"):
        TrainConfig(dataset="omniglot", settings={"chunk_size": 0}).resolved()


# The config.json of a MAML run written by format 1 (the zoo's CPU MAML until it was retrained).
FORMAT_1_MAML = {
    "format": 1, "fewshot": "0.1.0", "algorithm": "maml", "dataset": "omniglot",
    "split": "vinyals", "image_size": 28, "channels": 1, "ways": 5, "shots": 1, "queries": 15,
    "train_ways": 5, "train_queries": 15, "meta_batch": 32, "inner_steps": 1,
    "eval_inner_steps": 3, "inner_lr": 0.4, "outer_lr": 0.001, "first_order": False,
    "vectorize": False, "iterations": 60000, "val_every": 100, "val_episodes": 200,
    "checkpoint_every": 100, "time_limit": 58.0, "seed": 0,
}  # fmt: skip


def test_run_folders_of_format_1_still_load_with_their_original_batch_norm(tmp_path):
    """Format 1's config.json files list every method's settings in one flat list."""
    from fewshot.training.checkpoint import CONFIG_FILE, read_config
    from tests.conftest import REPO

    protonet = read_config(REPO / "zoo" / "protonet-omniglot-5w1s")
    assert protonet.algorithm == "protonet" and protonet.settings.batch_norm == "inductive"
    assert protonet.train_ways == 60
    (tmp_path / CONFIG_FILE).write_text(json.dumps(FORMAT_1_MAML))
    maml = read_config(tmp_path)
    assert maml.settings.batch_norm == "transductive" and maml.settings.vectorize is False
    assert (maml.settings.inner_lr, maml.settings.eval_inner_steps) == (0.4, 3)


def test_config_round_trips_through_its_flat_dict():
    config = TrainConfig(algorithm="reptile", dataset="omniglot").resolved()
    flat = config.to_dict()
    assert flat["inner_optimizer"] == "adam" and flat["outer_lr"] == 1.0
    assert TrainConfig.from_dict(flat).resolved() == config


def every_method_and_dataset():
    from fewshot.algorithms import METHODS

    return [(name, dataset) for name, m in METHODS.items() for dataset in m.defaults]


@pytest.mark.parametrize(("method", "dataset"), every_method_and_dataset())
def test_each_method_resolves_to_its_papers_defaults_on_each_dataset(method, dataset):
    from fewshot.algorithms import get_method

    config = TrainConfig(algorithm=method, dataset=dataset).resolved().to_dict()
    declared = get_method(method).defaults[dataset]
    assert {k: config[k] for k in declared} == declared
    assert config["batch_norm"] == get_method(method).batch_norm
    # None on purpose: the pretraining head's size comes from the training data when the run
    # starts; Matching Networks' processing steps follow each support set's size; a table's
    # label column and feature count exist only for --dataset csv; the data folder is recorded
    # when a run starts; init names a run to start from, when asked; an image dataset's
    # augmentation is none unless asked; the pixel statistics of --normalize are computed from
    # the training images when the run starts; a backbone is built, started and frozen as the
    # literature's, with nothing of a constructor's, a weights file's or a freeze, unless asked,
    # and its features are cached where it is frozen whole unless told not to
    unset = (
        "time_limit", "classes", "processing_steps", "label_column", "features", "data_root",
        "init", "augment", "pixel_mean", "pixel_std", "backbone_args", "backbone_weights",
        "weights_prefix", "freeze", "cache_features",
    )  # fmt: skip
    assert None not in (config[k] for k in config if k not in unset)


def test_a_null_in_a_config_file_means_the_default():
    config = TrainConfig.from_dict(
        {"algorithm": "reptile", "dataset": "omniglot", "final_outer_lr": None, "inner_batch": None}
    ).resolved()
    assert config.settings.final_outer_lr == 0.0 and config.settings.inner_batch == 10


@pytest.mark.parametrize("ways", ["ways", "train_ways"])
@pytest.mark.parametrize("dataset", ["omniglot", "folder"])
def test_one_way_classification_is_refused(dataset, ways):
    with pytest.raises(ConfigError, match=f"^{ways} must be at least 2 .* got 1"):
        TrainConfig(algorithm="protonet", dataset=dataset, **{ways: 1}).resolved()


def test_sinusoid_regression_has_no_ways_to_refuse():
    assert TrainConfig(dataset="sinusoid", ways=1).resolved().train_ways == 1


def test_config_values_of_the_wrong_type_are_one_line_errors():
    cases = {
        "inner_lr": ("fast", "inner_lr must be a number or null, got 'fast'"),
        "ways": (None, "ways must be an integer, got None"),
        "first_order": ("yes", "first_order must be true or false or null, got 'yes'"),
        "iterations": (2.5, "iterations must be an integer or null, got 2.5"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainConfig.from_dict({name: value}).resolved()
    assert TrainConfig.from_dict({"outer_lr": 1}).resolved().outer_lr == 1.0


SETTING_NAMES = sorted(
    set(run_setting_names())
    | {f.name for method in METHODS.values() for f in dataclasses.fields(method.settings)}
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(SETTING_NAMES) | st.text(max_size=6), JSON_VALUES, max_size=6)
)
def test_any_json_config_is_accepted_or_refused_in_one_line(document):
    """Whatever a config file holds, reading it either gives a configuration or a ConfigError
    (the command line's one-line error), never another exception."""
    with contextlib.suppress(ConfigError):
        TrainConfig.from_dict(document).resolved()


def test_the_natural_image_benchmarks_take_the_papers_mini_imagenet_settings():
    """MAML's (Finn et al. sec. 5.2), Meta-SGD's one step, ProtoNet's 30-way training
    episodes, Reptile's 8 steps on 15 examples a class, Relation Networks' 15 queries; a method
    without miniImageNet settings keeps its image ones."""
    for dataset in ("mini-imagenet", "tiered-imagenet", "cub"):
        maml = TrainConfig(algorithm="maml", dataset=dataset).resolved()
        assert (maml.meta_batch, maml.queries) == (4, 15), dataset
        assert (maml.settings.inner_steps, maml.settings.eval_inner_steps) == (5, 10)
        assert maml.settings.inner_lr == 0.01
    metasgd = TrainConfig(algorithm="meta-sgd", dataset="mini-imagenet").resolved()
    assert (metasgd.settings.inner_steps, metasgd.settings.eval_inner_steps) == (1, 1)
    protonet = TrainConfig(algorithm="protonet", dataset="mini-imagenet").resolved()
    assert (protonet.train_ways, protonet.ways, protonet.train_queries) == (30, 5, 15)
    reptile = TrainConfig(algorithm="reptile", dataset="mini-imagenet").resolved()
    assert (reptile.settings.inner_steps, reptile.settings.eval_inner_steps) == (8, 50)
    assert (reptile.shots, reptile.train_queries, reptile.meta_batch) == (1, 14, 5)
    relation = TrainConfig(algorithm="relationnet", dataset="mini-imagenet").resolved()
    assert (relation.train_queries, relation.iterations) == (15, 500000)
    metalstm = TrainConfig(algorithm="meta-lstm", dataset="mini-imagenet").resolved()
    omniglot = TrainConfig(algorithm="meta-lstm", dataset="omniglot").resolved()
    assert metalstm.settings == omniglot.settings and metalstm.meta_batch == omniglot.meta_batch
