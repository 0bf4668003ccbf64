"""`--device`: auto picks CUDA where torch has it, and a device this torch cannot use is one
line naming those it can, for every command that takes the option. No tensor is moved: the
machines that run these tests have no GPU, so CUDA is monkeypatched."""

import pytest
import torch
from click.testing import CliRunner

from fewshot.cli import in_flags, main
from fewshot.devices import describe_device, resolve_device
from fewshot.errors import ConfigError

QUICK = ["--iterations", "2", "--val-every", "2", "--val-episodes", "2", "--test-episodes", "0"]


@pytest.fixture
def no_gpu(monkeypatch):
    """A torch built without CUDA, on a machine without MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)


def refusal(text: str) -> str:
    """The refusal as the command line prints it (the library's names `device=TEXT`)."""
    with pytest.raises(ConfigError) as error:
        resolve_device(text)
    assert str(error.value).startswith(f"`device={text}`: ")
    return in_flags(str(error.value))


def test_auto_is_the_cpu_without_cuda(no_gpu):
    assert resolve_device("auto") == "cpu"


def test_auto_is_cuda_where_torch_has_it(two_gpus):
    assert resolve_device("auto") == "cuda"


@pytest.mark.parametrize("text", ["cpu", "CPU", " cpu ", "cpu:1"])
def test_the_cpu_is_always_available(no_gpu, text):
    assert resolve_device(text) == "cpu"  # the plain name, which chunk-size defaults test for


@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:1"])
def test_the_gpus_there_are_are_taken(two_gpus, text):
    assert resolve_device(text) == text


def test_cuda_without_cuda_says_so_and_names_the_cpu(no_gpu):
    assert refusal("cuda") == "--device cuda: this torch was built without CUDA; available: cpu."


def test_cuda_built_but_no_gpu_visible(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    assert "no CUDA GPU is visible" in refusal("cuda")


def test_a_gpu_number_beyond_the_machines_names_those_there_are(two_gpus):
    assert refusal("cuda:3") == (
        "--device cuda:3: this machine has 2 CUDA devices; available: cpu, cuda:0, cuda:1."
    )


def test_a_typo_is_not_a_torch_device(two_gpus):
    assert refusal("gpu") == "--device gpu: not a torch device; available: cpu, cuda:0, cuda:1."


def test_mps_where_it_is_unavailable(no_gpu):
    assert refusal("mps") == "--device mps: this torch cannot use it here; available: cpu."


def test_mps_where_it_is_available(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == "mps"
    assert refusal("cuda").endswith("available: cpu, mps.")


def test_the_device_line_names_the_cpu_threads_or_the_gpu(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert describe_device("cpu") == "cpu (4 threads)"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert describe_device("cpu") == "cpu (1 thread)"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU {index}")
    assert describe_device("cuda") == "cuda:0 (GPU 0)"
    assert describe_device("cuda:1") == "cuda:1 (GPU 1)"


# Each command with the options it needs to reach --device; the device is refused while the
# command line is read, before a run folder or data is looked at.
COMMANDS = {
    "train": ["train", "--out", "unused"],
    "tune": ["tune", "--study-dir", "unused"],
    "eval": ["eval", "unused"],
    "compare": ["compare", "unused-a", "unused-b"],
    "adapt": ["adapt", "unused", "--support", "unused", "--predict", "unused.png"],
}
REFUSED = {
    "cuda": "--device cuda: this torch was built without CUDA; available: cpu.",
    "gpu": "--device gpu: not a torch device; available: cpu.",
    "mps": "--device mps: this torch cannot use it here; available: cpu.",
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device", REFUSED)
def test_every_command_refuses_an_unusable_device_in_one_line(no_gpu, command, device):
    result = CliRunner().invoke(main, [*COMMANDS[command], "--device", device])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {REFUSED[device]}\n"


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_gpu_number_beyond_the_machines_is_one_line(two_gpus, command):
    result = CliRunner().invoke(main, [*COMMANDS[command], "--device", "cuda:3"])
    assert result.exit_code == 2, result.output
    assert result.output == (
        "error: --device cuda:3: this machine has 2 CUDA devices; available: cpu, cuda:0, cuda:1.\n"
    )


def test_debug_shows_the_device_traceback(no_gpu):
    result = CliRunner().invoke(main, ["--debug", "eval", "unused", "--device", "gpu"])
    assert isinstance(result.exception, ConfigError)


@pytest.mark.slow
def test_train_prints_the_device_first(no_gpu, tmp_path):
    result = CliRunner().invoke(main, ["train", *QUICK, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "device: cpu (1 thread)"  # sinusoid: one thread
