"""Smoke check for the benchmark peers venv built by benchmarks/setup_peers.sh.

Run with that venv's python. ``--imports-only`` is the cheap probe setup_peers.sh uses
to decide whether a rebuild is needed; the full check also proves that the pieces the
benchmarks compare against compute what they should: learn2learn's second-order MAML
and higher's differentiable inner loop must both reproduce a hand-written second-order
meta-gradient, learn2learn's MetaSGD (step sizes initialised to MAML's) must give the same
meta-gradient and the exact one of its step sizes, and learn2learn's Cython task sampler must
yield valid N-way K-shot tasks.
"""

import argparse
import importlib.metadata
import sys

import torch


def check_imports():
    import higher
    import learn2learn
    import torchvision
    from learn2learn.algorithms import MAML, MetaSGD
    from learn2learn.data import MetaDataset, TaskDataset
    from learn2learn.data.transforms import (
        ConsecutiveLabels,
        KShots,
        LoadData,
        NWays,
        RemapLabels,
    )

    assert learn2learn.__version__ == "0.2.0", learn2learn.__version__
    assert importlib.metadata.version("higher") == "0.2.1"  # higher has no __version__
    assert callable(higher.innerloop_ctx)
    assert getattr(torchvision, "IS_FEWSHOT_STUB", False), "expected the torchvision stub"
    del MAML, MetaSGD, MetaDataset, TaskDataset
    del ConsecutiveLabels, KShots, LoadData, NWays, RemapLabels
    return learn2learn, higher


def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(1, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 1),
    )


def reference_meta_grads(model, xs, ys, xq, yq, lr):
    # One inner SGD step, differentiated through (create_graph=True): the second-order
    # meta-gradient both libraries must reproduce.
    params = list(model.parameters())
    mse = torch.nn.functional.mse_loss
    support = mse(torch.func.functional_call(model, dict(model.named_parameters()), (xs,)), ys)
    grads = torch.autograd.grad(support, params, create_graph=True)
    adapted = {
        name: p - lr * g for (name, p), g in zip(model.named_parameters(), grads, strict=True)
    }
    query = mse(torch.func.functional_call(model, adapted, (xq,)), yq)
    return query, torch.autograd.grad(query, params)


def check_learn2learn_maml(l2l, model, batch, lr, reference):
    xs, ys, xq, yq = batch
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=False)
    learner = maml.clone()
    learner.adapt(torch.nn.functional.mse_loss(learner(xs), ys))
    query = torch.nn.functional.mse_loss(learner(xq), yq)
    maml.zero_grad()
    query.backward()
    assert_grads_match("learn2learn MAML", [p.grad for p in maml.parameters()], reference)
    return query.item()


def check_learn2learn_metasgd(l2l, model, batch, lr, reference):
    # With every step size at lr, Meta-SGD's first step is MAML's: the same meta-gradient for
    # the weights. A step size's gradient is exact: phi = theta - alpha * g with g independent
    # of alpha, so dL_query/dalpha = -g * dL_query/dphi.
    xs, ys, xq, yq = batch
    mse = torch.nn.functional.mse_loss
    params = list(model.parameters())
    support_grads = torch.autograd.grad(mse(model(xs), ys), params)
    adapted = {
        name: (p - lr * g).detach().requires_grad_()
        for (name, p), g in zip(model.named_parameters(), support_grads, strict=True)
    }
    query = mse(torch.func.functional_call(model, adapted, (xq,)), yq)
    query_grads = torch.autograd.grad(query, list(adapted.values()))
    rate_reference = [-g * q for g, q in zip(support_grads, query_grads, strict=True)]

    meta_sgd = l2l.algorithms.MetaSGD(model, lr=lr, first_order=False)
    learner = meta_sgd.clone()
    learner.adapt(mse(learner(xs), ys))
    loss = mse(learner(xq), yq)
    meta_sgd.zero_grad()
    loss.backward()
    assert_grads_match(
        "learn2learn MetaSGD weights", [p.grad for p in meta_sgd.module.parameters()], reference
    )
    assert_grads_match(
        "learn2learn MetaSGD step sizes", [r.grad for r in meta_sgd.lrs], rate_reference
    )
    return loss.item()


def check_higher(higher, model, batch, lr, reference):
    xs, ys, xq, yq = batch
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.zero_grad()
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(torch.nn.functional.mse_loss(fmodel(xs), ys))
        query = torch.nn.functional.mse_loss(fmodel(xq), yq)
        query.backward()
    assert_grads_match("higher innerloop_ctx", [p.grad for p in model.parameters()], reference)
    return query.item()


def assert_grads_match(name, grads, reference):
    assert all(g is not None for g in grads), f"{name}: missing meta-gradients"
    for got, want in zip(grads, reference, strict=True):
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
            raise AssertionError(
                f"{name}: meta-gradient differs from the second-order reference "
                f"(max abs diff {(got - want).abs().max().item():.3g})"
            )


def check_task_sampling(l2l):
    from learn2learn.data.transforms import (
        ConsecutiveLabels,
        KShots,
        LoadData,
        NWays,
        RemapLabels,
    )

    n_classes, per_class, ways, shots = 6, 5, 3, 2
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    data = torch.utils.data.TensorDataset(torch.randn(len(labels), 4), labels)
    meta = l2l.data.MetaDataset(data)
    tasks = l2l.data.TaskDataset(
        meta,
        task_transforms=[
            NWays(meta, n=ways),
            KShots(meta, k=shots),
            LoadData(meta),
            RemapLabels(meta),
            ConsecutiveLabels(meta),
        ],
        num_tasks=4,
    )
    for _ in range(3):
        x, y = tasks.sample()
        assert x.shape == (ways * shots, 4), x.shape
        assert sorted(y.tolist()) == sorted(list(range(ways)) * shots), y.tolist()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--imports-only", action="store_true")
    args = parser.parse_args()

    l2l, higher = check_imports()
    if args.imports_only:
        return 0

    torch.manual_seed(0)
    torch.set_num_threads(1)
    lr = 0.01
    model = mlp().double()
    x = torch.linspace(-5, 5, 20, dtype=torch.float64).unsqueeze(1)
    y = torch.sin(x)
    batch = (x[::2], y[::2], x[1::2], y[1::2])
    reference_loss, reference = reference_meta_grads(model, *batch, lr)

    l2l_loss = check_learn2learn_maml(l2l, model, batch, lr, reference)
    metasgd_loss = check_learn2learn_metasgd(l2l, model, batch, lr, reference)
    higher_loss = check_higher(higher, model, batch, lr, reference)
    check_task_sampling(l2l)

    import torchvision

    print(f"torch        {torch.__version__} (CUDA: {torch.version.cuda})")
    print(f"learn2learn  {l2l.__version__}")
    print(f"higher       {importlib.metadata.version('higher')}")
    print(f"torchvision  {torchvision.__version__} (import-only stub)")
    print(
        "smoke check passed: second-order MAML step on a 1-40-40-1 MLP "
        f"(query loss {reference_loss.item():.6f}; learn2learn {l2l_loss:.6f}, "
        f"learn2learn MetaSGD {metasgd_loss:.6f}, higher {higher_loss:.6f}; meta-gradients "
        "match the reference), "
        "learn2learn 3-way 2-shot task sampling OK"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
