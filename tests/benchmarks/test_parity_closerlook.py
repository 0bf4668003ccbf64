"""The CloserLookFewShot parity references (benchmarks/parity/references/closerlook.py): the
glue's episode layout, and their ProtoNet's and MatchingNet's scores on a fewshot Task against
the definitions computed here. Their code is a checkout outside the repository; the tests that
run it skip where benchmarks/parity/fetch_references.sh has not made it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.parity.references import closerlook
from benchmarks.parity.references.closerlook import episode_layout, fewshot_order
from fewshot.tasks import Batch, Task

WAYS, SHOTS, QUERIES = 3, 2, 2


def needs_checkout() -> None:
    if not (closerlook.checkout() / "methods" / "protonet.py").is_file():
        pytest.skip(
            f"CloserLookFewShot is not checked out in {closerlook.checkout()}; run "
            f"{closerlook.FETCH_SCRIPT}"
        )


def episode(ways=WAYS, shots=SHOTS, queries=QUERIES, tasks=1, seed=0) -> Task:
    """Tasks whose support and query sets are shuffled (not class-major)."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots)
    query_y = torch.arange(ways).repeat_interleave(queries)
    parts = []
    for _ in range(tasks):
        s, q = (
            torch.randperm(len(support_y), generator=g),
            torch.randperm(len(query_y), generator=g),
        )
        parts.append(
            (
                torch.rand(len(support_y), 1, 28, 28, generator=g),
                support_y[s],
                torch.rand(len(query_y), 1, 28, 28, generator=g),
                query_y[q],
            )
        )
    return Task(*(torch.stack(t) for t in zip(*parts)))


def test_layout_round_trips_labels():
    support_y = torch.tensor([2, 0, 1, 0, 2, 1])
    query_y = torch.tensor([1, 2, 0, 0, 1, 2])
    # each example's pixels hold its position, so where it lands says which it is
    support_x = torch.arange(6.0).view(6, 1, 1, 1)
    query_x = torch.arange(100.0, 106.0).view(6, 1, 1, 1)
    x, n_support, order = episode_layout(support_x, support_y, query_x, query_y)
    assert x.shape == (3, 4, 1, 1, 1) and n_support == 2
    for c in range(3):  # row c: class c's support examples, then its queries, in given order
        assert x[c, :2].flatten().tolist() == (support_y == c).nonzero().flatten().tolist()
        assert (x[c, 2:].flatten() - 100).tolist() == (query_y == c).nonzero().flatten().tolist()
    # their query labels are class-major; mapped back they are fewshot's, exactly
    theirs = torch.arange(3).repeat_interleave(2)
    assert torch.equal(fewshot_order(theirs, order), query_y)
    scores = F.one_hot(theirs, 3).float()  # a perfect classifier in their order
    assert torch.equal(fewshot_order(scores, order).argmax(1), query_y)


def test_layout_refuses_unequal_classes():
    x = torch.zeros(5, 1, 1, 1)
    with pytest.raises(ValueError, match="as many"):
        episode_layout(x[:4], torch.tensor([0, 0, 1, 1]), x[:3], torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="support labels"):
        episode_layout(x[:2], torch.tensor([0, 2]), x[:2], torch.tensor([0, 2]))


def test_cuda_is_put_back():
    cuda, module_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    with closerlook.their_device(torch.device("cpu")):
        t = torch.ones(2)
        assert t.cuda() is t
    assert torch.Tensor.cuda is cuda and torch.nn.Module.cuda is module_cuda


def features(reference, x: torch.Tensor) -> torch.Tensor:
    """Their backbone's features in eval mode (running statistics), as their test does."""
    reference.model.feature.eval()
    with torch.no_grad():
        return reference.model.feature(x)


def test_protonet_logits_are_minus_squared_distances_to_class_means():
    needs_checkout()
    torch.manual_seed(0)
    reference = closerlook.CloserLookReference("protonet", shots=SHOTS, ways=WAYS)
    tasks = episode(tasks=2)
    reference.train_step(episode(seed=1))  # running statistics that are not the initial ones
    reference.eval()
    with torch.no_grad():
        logits = reference.predict(tasks)
    assert logits.shape == (2, WAYS * QUERIES, WAYS)
    for i in range(2):
        support = features(reference, tasks.support_x[i])
        query = features(reference, tasks.query_x[i])
        means = torch.stack([support[tasks.support_y[i] == c].mean(0) for c in range(WAYS)])
        expected = -((query[:, None, :] - means[None, :, :]) ** 2).sum(-1)
        torch.testing.assert_close(logits[i], expected, rtol=1e-5, atol=1e-4)


def test_matchingnet_scores_follow_their_definition():
    """Their MatchingNet: g(S) = S + both directions of a bidirectional LSTM over the support
    set (class-major order), f(x) by K = |S| attention-LSTM reads with h += f'(x), then
    log(softmax(100 * relu(cos(f(x), g(x_i)))) @ one_hot(y_S) + 1e-6)."""
    needs_checkout()
    torch.manual_seed(0)
    reference = closerlook.CloserLookReference("matchingnet", shots=SHOTS, ways=WAYS)
    tasks = episode()
    reference.eval()
    with torch.no_grad():
        logits = reference.predict(tasks)[0]
    model = reference.model
    order = torch.argsort(tasks.support_y[0], stable=True)  # their support set is class-major
    support = features(reference, tasks.support_x[0][order])
    query = features(reference, tasks.query_x[0])
    d = support.shape[1]
    with torch.no_grad():
        out = model.G_encoder(support[None])[0][0]
        g = support + out[:, :d] + out[:, d:]
        h, c = query, torch.zeros_like(query)
        for _ in range(len(support)):
            read = torch.softmax(h @ g.T, dim=1) @ g
            h, c = model.FCE.lstmcell(torch.cat((query, read), 1), (h, c))
            h = h + query
    cosine = (h / (h.norm(dim=1, keepdim=True) + 1e-5)) @ (
        g / (g.norm(dim=1, keepdim=True) + 1e-5)
    ).T
    attention = torch.softmax(torch.relu(cosine) * 100, dim=1)
    y_support = tasks.support_y[0][order]
    expected = (attention @ F.one_hot(y_support, WAYS).float() + 1e-6).log()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["protonet", "matchingnet", "relationnet"])
def test_episodic_methods_train_and_predict(method):
    needs_checkout()
    torch.manual_seed(0)
    reference = closerlook.CloserLookReference(method, shots=1, ways=WAYS)
    losses = [reference.train_step(episode(shots=1, seed=s)) for s in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.eval()
    with torch.no_grad():
        logits = reference.predict(episode(shots=1, tasks=2, seed=5))
    assert logits.shape == (2, WAYS * QUERIES, WAYS) and logits.isfinite().all()
    assert all(torch.equal(v, state[k]) for k, v in reference.state_dict().items())
    assert reference.is_transductive == (method == "relationnet")


@pytest.mark.parametrize("method", ["baseline", "baseline++"])
def test_baselines_train_on_batches_and_finetune(method):
    needs_checkout()
    torch.manual_seed(0)
    reference = closerlook.CloserLookReference(method, shots=1, ways=WAYS, num_classes=7)
    loss = reference.train_step(Batch(torch.rand(8, 1, 28, 28), torch.randint(7, (8,))))
    assert torch.isfinite(torch.tensor(loss))
    tasks = episode(shots=1, tasks=2)
    reference.eval()
    with torch.no_grad():
        torch.manual_seed(3)
        first = reference.predict(tasks)
        torch.manual_seed(3)
        again = reference.predict(tasks)
    assert first.shape == (2, WAYS * QUERIES, WAYS)
    assert torch.equal(first, again)  # the head's mini-batches follow torch's seed


def test_missing_checkout_names_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_REFERENCES", str(tmp_path))
    with pytest.raises(ImportError, match="fetch_references.sh"):
        closerlook.load()
