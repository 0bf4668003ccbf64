"""The sampler keeps one copy of its data: it indexes the rows it is given, sorted by class or
not, in memory or memory-mapped, and draws the same episodes as from a class-sorted copy."""

import numpy as np
import torch

from fewshot import TaskSampler


def shuffled_images(num_classes=7, per_class=6, seed=0):
    """uint8 images whose first pixel names their class, rows in a random order."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(labels), 1, 4, 4), generator=generator, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    order = torch.randperm(len(labels), generator=generator)
    return images[order].contiguous(), labels[order]


def episodes(sampler, seed=3, tasks=4):
    return sampler.sample(tasks, torch.Generator().manual_seed(seed))


def test_sampler_keeps_the_rows_it_is_given_without_a_copy():
    images, labels = shuffled_images()
    sampler = TaskSampler(images, labels, ways=3, shots=2, queries=2)
    assert sampler.inputs.data_ptr() == images.data_ptr()


def test_unsorted_rows_give_the_episodes_of_their_class_sorted_copy():
    images, labels = shuffled_images()
    order = torch.argsort(labels, stable=True)  # what the sampler used to copy
    unsorted = episodes(TaskSampler(images, labels, ways=3, shots=2, queries=2))
    sorted_copy = episodes(TaskSampler(images[order], labels[order], ways=3, shots=2, queries=2))
    for a, b in zip(unsorted.tensors(), sorted_copy.tensors()):
        assert torch.equal(a, b)
    # and each image sits under its own class's label
    first = (unsorted.support_x[..., 0, 0, 0] * 255).round()
    for task in range(len(unsorted)):
        for way in range(3):
            assert len(set(first[task][unsorted.support_y[task] == way].tolist())) == 1


def test_memory_mapped_rows_are_read_in_place(tmp_path):
    images, labels = shuffled_images()
    path = tmp_path / "images.u8"
    images.numpy().tofile(path)
    mapped = torch.from_numpy(np.memmap(path, np.uint8, "c", shape=tuple(images.shape)))
    sampler = TaskSampler(mapped, labels, ways=3, shots=2, queries=2)
    assert sampler.inputs.data_ptr() == mapped.data_ptr()
    in_memory = episodes(TaskSampler(images, labels, ways=3, shots=2, queries=2))
    for a, b in zip(episodes(sampler).tensors(), in_memory.tensors()):
        assert torch.equal(a, b)
