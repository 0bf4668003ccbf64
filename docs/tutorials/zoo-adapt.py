# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Few-shot classification of your own images with a zoo model
#
# A trained run folder classifies images of classes it has never seen, from one or a few
# labelled examples of each: `fewshot.load` reads the run, `adapt` takes a support folder
# (one subfolder of images per class) and returns a predictor. Nothing is trained. Here the
# run is the zoo's Prototypical Network, trained on Omniglot 5-way 1-shot
# (`zoo/protonet-omniglot-5w1s`; its accuracy under the evaluation protocol is in
# [Results](../results.md)), and "your own images" are handwritten characters it never saw
# in training, saved as ordinary PNG files the way you would bring your own. The command-line
# form of the same steps is `fewshot adapt` ([Your own classes](../adapt.md)).
#
# The drawings come from Omniglot's official `images_background.zip` and
# `images_evaluation.zip`, looked for in `$FEWSHOT_DATA_ROOT`, else in
# `~/.local/share/fewshot` (`fewshot train --dataset omniglot --download ...` puts them there;
# see [Datasets](../datasets.md)).

# %%
import io
import random
import tempfile
import zipfile
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

import fewshot
from fewshot.datasets import load_omniglot, omniglot_split, resolve_data_root

DATA = resolve_data_root()  # $FEWSHOT_DATA_ROOT, else ~/.local/share/fewshot
# The zoo lies at the repository's root; found from wherever this notebook runs.
REPO = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "zoo").is_dir())
RUN = REPO / "zoo" / "protonet-omniglot-5w1s"
WAYS, SHOTS, QUERIES = 5, 1, 3

# %% [markdown]
# ## A support folder of characters never seen in training
#
# `omniglot_split` gives the classes of the vinyals split's meta-test part: characters the
# zoo model was not trained on. We pick five at random, and write the first drawing of each
# into `support/<class>/` and the next three into `queries/`, as black-on-white PNGs, the
# original files from the zip.

# %%
characters = load_omniglot(DATA)  # every character, decoded once and cached
_, test_labels = omniglot_split(characters, split="vinyals", part="test", rotations=False)
chosen = random.Random(0).sample(sorted(set(test_labels.tolist())), WAYS)

folder = Path(tempfile.mkdtemp(prefix="fewshot-tutorial-"))
archives = {}
truth = {}  # query file -> its class
for character in chosen:
    archive, alphabet, name = characters.names[character].split("/")
    if archive not in archives:
        archives[archive] = zipfile.ZipFile(DATA / f"{archive}.zip")
    drawings = sorted(
        entry
        for entry in archives[archive].namelist()
        if entry.startswith(f"{archive}/{alphabet}/{name}/") and entry.endswith(".png")
    )
    label = f"{alphabet.split('_(')[0]}-{name.removeprefix('character')}"  # e.g. Ojibwe-13
    for i, entry in enumerate(drawings[: SHOTS + QUERIES]):
        image = Image.open(io.BytesIO(archives[archive].read(entry))).convert("L")
        if i < SHOTS:
            path = folder / "support" / label / f"{i}.png"
        else:
            path = folder / "queries" / f"{label}-{i}.png"
            truth[path] = label
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)

print("written to a temporary folder:")
for path in sorted(folder.rglob("*.png")):
    print("  ", path.relative_to(folder))

# %% [markdown]
# ## Load, adapt, predict
#
# `method.preprocessing` reads images as the run's training images were read (size,
# channels, and inversion: Omniglot was trained with bright strokes on dark, so these
# black-on-white drawings are inverted; `inverted` says which were). `adapt` computes the
# five class prototypes from the support images; `predict` names the nearest class of each
# query and `probabilities` gives the softmax over classes, columns in `support.classes`
# order.

# %%
method = fewshot.load(RUN)  # the trained method, best weights, inductive batch norm
support, _ = method.preprocessing.read_support(folder / "support")
query_files = sorted(truth)
images, inverted = method.preprocessing.read_images(query_files)
predictor = method.adapt(support)
predicted = predictor.predict(images)
probabilities = predictor.probabilities(images)

right = sum(p == truth[f] for p, f in zip(predicted, query_files))
print(f"classes: {support.classes}")
print(f"inverted {sum(inverted)} of {len(inverted)} query images")
print(f"{right} of {len(query_files)} queries right")
for file, p, row in zip(query_files, predicted, probabilities):
    print(f"{file.name:18} -> {p:14} p = {row.max().item():.3f}")

# %% [markdown]
# ## The episode
#
# Top row: the one support drawing of each class. Below: the queries, each titled with
# its predicted class, framed green where that is its class and red where it is not.

# %%
fig, axes = plt.subplots(1 + QUERIES, WAYS, figsize=(2.2 * WAYS, 2.3 * (1 + QUERIES)))
for column, label in enumerate(support.classes):
    (support_file,) = (folder / "support" / label).glob("*.png")
    axes[0, column].imshow(Image.open(support_file), cmap="gray")
    axes[0, column].set_title(f"support:\n{label}", fontsize=8)
    queries = [f for f in query_files if truth[f] == label]
    for row, file in enumerate(queries, start=1):
        guess = predicted[query_files.index(file)]
        ax = axes[row, column]
        ax.imshow(Image.open(file), cmap="gray")
        ax.set_title(f"→ {guess}", fontsize=7, color="green" if guess == label else "red")
        for spine in ax.spines.values():
            spine.set_edgecolor("green" if guess == label else "red")
            spine.set_linewidth(3)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle(f"{RUN.name}: {right} of {len(query_files)} queries right", fontsize=11)
fig.tight_layout()
plt.show()

# %% [markdown]
# One episode of 15 queries says little about accuracy; the protocol's 600 episodes do
# ([Results](../results.md)). `tests/test_adapt.py` checks on 40 such episodes that
# adapting from PNG folders scores as `fewshot eval` does on the same characters
# ([Your own classes](../adapt.md#how-close-to-fewshot-eval)). With your own images,
# replace `folder / "support"` and `query_files` by your folders and files; the same lines
# work for any run folder of `fewshot train` (ProtoNet, MAML, ...).
