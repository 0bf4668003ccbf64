import math

import torch

from fewshot.datasets.sinusoid import SinusoidTasks


def test_tasks_follow_the_papers_distribution():
    tasks = SinusoidTasks(shots=10, queries=7).sample(2000, torch.Generator().manual_seed(0))
    assert tasks.support_x.shape == (2000, 10, 1) and tasks.query_x.shape == (2000, 7, 1)
    x = torch.cat([tasks.support_x, tasks.query_x], 1)
    y = torch.cat([tasks.support_y, tasks.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5
    # Recover amplitude and phase of each task by least squares on y = a sin x + b cos x,
    # which is A sin(x - phi) with a = A cos phi, b = -A sin phi.
    design = torch.cat([torch.sin(x), torch.cos(x)], -1).double()
    coef = torch.linalg.lstsq(design, y.double()).solution.squeeze(-1)
    amplitude = coef.norm(dim=-1)
    phase = torch.atan2(-coef[:, 1], coef[:, 0])
    assert amplitude.min() >= 0.1 - 1e-6 and amplitude.max() <= 5.0 + 1e-6
    assert phase.min() >= -1e-6 and phase.max() <= math.pi + 1e-6
    # Uniform: mean amplitude 2.55, mean phase pi/2.
    assert abs(amplitude.mean() - 2.55) < 0.1 and abs(phase.mean() - math.pi / 2) < 0.1
    # The same function generates support and query: the fit is exact.
    torch.testing.assert_close(design @ coef.unsqueeze(-1), y.double(), atol=1e-4, rtol=0)


def test_sampled_functions_are_those_of_the_tasks():
    sampler = SinusoidTasks(shots=5, queries=3)
    task, amplitude, phase = sampler.sample_with_functions(50, torch.Generator().manual_seed(1))
    same = sampler.sample(50, torch.Generator().manual_seed(1))
    for drawn, plain in zip(task.tensors(), same.tensors()):
        assert torch.equal(drawn, plain)
    assert amplitude.shape == phase.shape == (50,)
    x = torch.cat([task.support_x, task.query_x], 1)
    y = torch.cat([task.support_y, task.query_y], 1)
    # Independently of the sampler's formula: y = a sin x + b cos x with a = A cos phi,
    # b = -A sin phi.
    a, b = amplitude * torch.cos(phase), -amplitude * torch.sin(phase)
    expected = a.view(-1, 1, 1) * torch.sin(x) + b.view(-1, 1, 1) * torch.cos(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
