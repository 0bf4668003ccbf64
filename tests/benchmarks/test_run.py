"""benchmarks/run.py's allocator settings: the children run under what `fewshot` itself
starts under."""

from benchmarks import run
from fewshot.cli import LEAN_MALLOC, TUNED_MALLOC


def test_the_benchmarks_allocator_settings_are_the_command_lines():
    assert run.MALLOC_SETTINGS == {"tuned": TUNED_MALLOC, "lean": LEAN_MALLOC, "default": {}}


def test_a_child_gets_the_chosen_settings_in_place_of_the_parents_and_keeps_the_rest(
    monkeypatch,
):
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    env = run.child_env("lean")
    assert {k: env.get(k) for k in TUNED_MALLOC} == {
        "MALLOC_MMAP_THRESHOLD_": "6291456",
        "MALLOC_TRIM_THRESHOLD_": "67108864",
        "MALLOC_TOP_PAD_": None,
    }
    assert env["THP_MEM_ALLOC_ENABLE"] == "1"
    assert env["MALLOC_ARENA_MAX"] == "2"  # not one of ours: the user's choice stands
    assert "MALLOC_TOP_PAD_" not in run.child_env("default")
    assert "THP_MEM_ALLOC_ENABLE" not in run.child_env("tuned")
    assert run.child_env("tuned")["MALLOC_TOP_PAD_"] == "1000000000"
