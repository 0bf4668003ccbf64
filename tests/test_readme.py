"""The README's Python snippets run as written, once their placeholders are filled: the
Omniglot folder, a support folder of the user's images, and (to keep the suite quick) fewer
iterations and evaluation episodes."""

import re

import pytest

from tests.conftest import REPO, write_random_image_folder


def python_snippets() -> list[str]:
    readme = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)


def filled(snippet: str, **values: str) -> str:
    for placeholder, value in values.items():
        assert placeholder in snippet, placeholder  # the README still has it
        snippet = snippet.replace(placeholder, value)
    return snippet


def test_the_readme_has_its_two_snippets():
    assert len(python_snippets()) == 2


@pytest.mark.omniglot
def test_the_training_snippet_trains_evaluates_and_adapts(omniglot_root, capsys):
    snippet = filled(
        python_snippets()[0],
        **{
            '"DIR"': repr(str(omniglot_root)),
            "ITERATIONS = 200": "ITERATIONS = 20",
            "train_tasks.sample(32, generator)": "train_tasks.sample(2, generator)",
            "episodes=100": "episodes=5",
        },
    )
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "iteration 20: query accuracy" in printed
    assert "accuracy" in printed.splitlines()[-1] and "(95% CI, 5 episodes)" in printed
    assert namespace["probabilities"].shape == (1, 75, 5)


def test_the_zoo_snippet_adapts_to_a_support_folder(tmp_path, monkeypatch, capsys):
    write_random_image_folder(tmp_path / "images", size=28)
    support = tmp_path / "images" / "train"  # 4 classes c0..c3 of 4 images
    new = sorted((tmp_path / "images" / "test" / "c0").glob("*.png"))[:2]
    snippet = filled(
        python_snippets()[1],
        **{
            '"SUPPORT"': repr(str(support)),
            '"new1.png", "new2.png"': ", ".join(map(repr, map(str, new))),
        },
    )
    monkeypatch.chdir(REPO)  # the zoo's run folder is named relative to the repository
    exec(compile(snippet, "README.md", "exec"), {})
    predicted = eval(capsys.readouterr().out.strip())
    assert len(predicted) == 2 and set(predicted) <= {"c0", "c1", "c2", "c3"}
