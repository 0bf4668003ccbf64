"""Resolution of a run's settings: the papers' defaults and the chunk size per setting."""

import pytest

from fewshot.errors import ConfigError
from fewshot.training.config import CPU_IMAGE_CHUNK_SIZE, TrainConfig, default_chunk_size


def test_sinusoid_runs_the_whole_meta_batch_in_one_pass():
    config = TrainConfig(algorithm="maml", dataset="sinusoid").resolved()
    assert config.vectorize and config.chunk_size == config.meta_batch == 25


def test_images_run_in_cpu_sized_chunks_unless_told():
    assert TrainConfig(dataset="omniglot").resolved().chunk_size == CPU_IMAGE_CHUNK_SIZE
    assert TrainConfig(dataset="omniglot", chunk_size=32).resolved().chunk_size == 32


def test_config_files_written_before_chunk_size_existed_still_load():
    old = {"algorithm": "maml", "dataset": "omniglot", "vectorize": False}
    config = TrainConfig.from_dict(old).resolved()
    assert config.vectorize is False and config.chunk_size == CPU_IMAGE_CHUNK_SIZE


def test_auto_vectorize_of_earlier_config_files_means_vectorize():
    config = TrainConfig.from_dict({"dataset": "sinusoid", "vectorize": None}).resolved()
    assert config.vectorize is True


def test_protonet_gets_no_chunk_size():
    assert TrainConfig(algorithm="protonet", dataset="omniglot").resolved().chunk_size is None


def test_a_gpu_takes_the_whole_meta_batch_in_one_pass():
    assert default_chunk_size("omniglot", 32, "cuda") == 32
    assert default_chunk_size("omniglot", 32, "cuda:1") == 32
    assert default_chunk_size("omniglot", 32, "cpu") == CPU_IMAGE_CHUNK_SIZE
    assert default_chunk_size("omniglot", 2, "cpu") == 2


def test_non_positive_chunk_size_is_refused():
    with pytest.raises(ConfigError, match="chunk_size must be positive"):
        TrainConfig(dataset="omniglot", chunk_size=0).resolved()
