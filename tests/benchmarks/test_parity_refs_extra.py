"""The MAML++ (HowToTrainYourMAMLPytorch) and Meta-LSTM (markdtw/meta-learning-lstm-pytorch)
parity references (benchmarks/parity/references/howtotrain.py, metalstm_markdtw.py): the
glue's layouts, and their code's first inner step and meta-learner update against the
definitions computed here. Their code is a checkout outside the repository; the tests that run
it skip where benchmarks/parity/fetch_references.sh has not made it."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks.parity.references import howtotrain, metalstm_markdtw
from benchmarks.parity.references.howtotrain import fewshot_order, their_batch
from benchmarks.parity.references.metalstm_markdtw import their_episode, three_channels
from fewshot.algorithms.mamlpp import msl_weights
from fewshot.tasks import Task
from fewshot.training.config import TrainConfig

WAYS, SHOTS, QUERIES = 3, 2, 2


def needs(module, name: str, file: str) -> None:
    root = module.checkout(name)
    if not (root / file).is_file():
        pytest.skip(f"{name} is not checked out in {root}; run {module.FETCH_SCRIPT}")


def needs_howtotrain() -> None:
    needs(howtotrain, howtotrain.NAME, "few_shot_learning_system.py")


def needs_markdtw() -> None:
    needs(metalstm_markdtw, metalstm_markdtw.NAME, "metalearner.py")


def episodes(tasks=2, ways=WAYS, shots=SHOTS, queries=QUERIES, size=28, seed=0) -> Task:
    """Tasks whose support and query sets are shuffled (not class-major)."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots)
    query_y = torch.arange(ways).repeat_interleave(queries)
    parts = []
    for _ in range(tasks):
        s = torch.randperm(len(support_y), generator=g)
        q = torch.randperm(len(query_y), generator=g)
        parts.append(
            (
                torch.rand(len(support_y), 1, size, size, generator=g),
                support_y[s],
                torch.rand(len(query_y), 1, size, size, generator=g),
                query_y[q],
            )
        )
    return Task(*(torch.stack(t) for t in zip(*parts)))


def positions_task(support_y: torch.Tensor, query_y: torch.Tensor) -> Task:
    """One task whose examples' pixels hold their positions (queries from 100)."""
    support_x = torch.arange(float(len(support_y))).view(-1, 1, 1, 1)
    query_x = torch.arange(100.0, 100 + len(query_y)).view(-1, 1, 1, 1)
    return Task(*(t.unsqueeze(0) for t in (support_x, support_y, query_x, query_y)))


def mamlpp_config(**settings) -> TrainConfig:
    settings = {"inner_steps": 1, "eval_inner_steps": 1, "iterations_per_epoch": 2, **settings}
    return TrainConfig(
        algorithm="maml++", dataset="omniglot", test_episodes=0, ways=WAYS, train_ways=WAYS,
        shots=SHOTS, queries=QUERIES, train_queries=QUERIES, meta_batch=2, iterations=10,
        backbone="conv4-32", settings=settings,
    ).resolved()  # fmt: skip


# -- the layouts (no checkout needed) -----------------------------------------------------------


def test_maml_plus_plus_batch_round_trips_labels():
    support_y = torch.tensor([2, 0, 1, 0, 2, 1])
    query_y = torch.tensor([1, 2, 0, 0, 1, 2])
    task = positions_task(support_y, query_y)
    (x_support, x_target, y_support, y_target), orders = their_batch(task)
    assert x_support.shape == (1, 3, 2, 1, 1, 1) and x_target.shape == (1, 3, 2, 1, 1, 1)
    assert y_support.dtype == torch.float32  # their loader's labels
    for c in range(3):  # row c: class c's examples in the order given, labelled c
        assert x_support[0, c].flatten().tolist() == (support_y == c).nonzero().flatten().tolist()
        assert (x_target[0, c].flatten() - 100).tolist() == (
            (query_y == c).nonzero().flatten().tolist()
        )
        assert (y_support[0, c] == c).all() and (y_target[0, c] == c).all()
    # their targets, flattened as their forward does (view(-1)), mapped back: fewshot's, exactly
    theirs = y_target[0].reshape(-1).long()
    assert torch.equal(fewshot_order(theirs, orders[0]), query_y)
    scores = F.one_hot(theirs, 3).float()  # a perfect classifier in their order
    assert torch.equal(fewshot_order(scores, orders[0]).argmax(1), query_y)


def test_meta_lstm_episode_round_trips_labels():
    support_y = torch.tensor([1, 0, 2])
    query_y = torch.tensor([2, 2, 0, 1, 0, 1])
    task = positions_task(support_y, query_y)[0]
    train_input, train_target, test_input, test_target, order = their_episode(task)
    assert train_input.shape == (3, 3, 1, 1) and test_input.shape == (6, 3, 1, 1)
    # main.py's labels: np.repeat(range(n_class), n); the inputs are those classes' examples
    assert train_target.tolist() == [0, 1, 2] and test_target.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(support_y[train_input[:, 0].flatten().long()], train_target)
    assert torch.equal(query_y[(test_input[:, 0].flatten() - 100).long()], test_target)
    assert torch.equal(fewshot_order(test_target, order), query_y)
    # the grayscale channel, three times
    assert torch.equal(train_input[:, 1], train_input[:, 0])
    assert torch.equal(train_input[:, 2], train_input[:, 0])


def test_three_channels_refuses_other_counts():
    assert three_channels(torch.zeros(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="3 channels"):
        three_channels(torch.zeros(2, 2, 4, 4))


def test_layout_refuses_unequal_classes():
    with pytest.raises(ValueError, match="as many"):
        their_batch(positions_task(torch.tensor([0, 0, 1]), torch.tensor([0, 1])))


# -- MAML++: their classifier -------------------------------------------------------------------


def test_maml_plus_plus_first_inner_step_is_sgd_at_their_initial_rate():
    needs_howtotrain()
    reference = howtotrain.build("maml++", mamlpp_config(inner_lr=0.25))
    system, args = reference.system, reference.args
    (x_support, _, y_support, _), _ = their_batch(episodes(tasks=1))
    x, y = x_support[0].flatten(0, 1), y_support[0].flatten().long()
    names = system.get_inner_loop_parameter_dict(system.classifier.named_parameters())
    assert not any("norm_layer" in name for name in names)  # batch-norm weights not adapted
    with howtotrain.cpu_only():
        # their forward's first step: the weights with a device dimension, their loss, their update
        weights = {n: v.unsqueeze(0).repeat([1] + [1] * v.dim()) for n, v in names.items()}
        loss, _ = system.net_forward(
            x, y, weights, backup_running_statistics=True, training=True, num_step=0
        )
        stepped = system.apply_inner_loop_update(loss, weights, False, current_step_idx=0)
        # independently: the network's own loss, autograd's gradient, SGD at the initial rate
        own = F.cross_entropy(system.classifier(x, num_step=0, training=True), y)
    grads = torch.autograd.grad(own, list(names.values()))
    for (name, p), g in zip(names.items(), grads, strict=True):
        rates = system.inner_loop_optimizer.names_learning_rates_dict[name.replace(".", "-")]
        assert torch.equal(rates, torch.full_like(rates, 0.25))  # LSLR starts at alpha
        torch.testing.assert_close(stepped[name][0], p - 0.25 * g, rtol=0, atol=1e-6)
    assert args.task_learning_rate == 0.25


def test_maml_plus_plus_schedules_are_fewshots():
    needs_howtotrain()
    reference = howtotrain.build(
        "maml++", mamlpp_config(inner_steps=5, eval_inner_steps=5, msl_epochs=3, da_epochs=4)
    )
    system, args = reference.system, reference.args
    assert args.total_iter_per_epoch == 2 and args.total_epochs == 5  # 10 iterations
    for epoch in range(8):
        system.current_epoch = epoch
        uses_msl = args.use_multi_step_loss_optimization and epoch < args.multi_step_loss_num_epochs
        assert uses_msl == (epoch < 3)  # after: the last step's loss alone, on both sides
        if uses_msl:
            theirs = system.get_per_step_loss_importance_vector()
            torch.testing.assert_close(theirs, torch.tensor(msl_weights(5, epoch, 3)))
        else:
            assert msl_weights(5, epoch, 3) == [0.0] * 4 + [1.0]
        second_order = args.second_order and epoch > args.first_order_to_second_order_epoch
        assert second_order == (epoch >= 4)  # fewshot: first order while epoch < da_epochs
    # their epoch at each iteration: iterations done // iterations per epoch, as fewshot's
    reference.iterations_done.fill_(5)
    assert int(reference.epoch()) == 2


def test_maml_plus_plus_trains_and_predicts_in_fewshots_query_order():
    needs_howtotrain()
    reference = howtotrain.build("maml++", mamlpp_config())
    tasks = episodes()
    loss = reference.train_step(tasks)
    assert torch.isfinite(torch.tensor(loss))
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.eval()
    with torch.no_grad():
        logits = reference.predict(tasks)
    assert logits.shape == (2, WAYS * QUERIES, WAYS)
    # Their evaluation means to put the per-step running statistics back after each task, but
    # its backup (copy.copy of the tensor) shares their storage, so they keep what evaluation
    # added; their network never reads them (it always normalises with batch statistics).
    # Everything else is unchanged.
    for k, v in reference.state_dict().items():
        if not k.endswith(("running_mean", "running_var")):
            assert torch.equal(v, state[k]), k
    # the same queries permuted give the same logits permuted
    perm = torch.randperm(WAYS * QUERIES, generator=torch.Generator().manual_seed(1))
    permuted = Task(
        tasks.support_x, tasks.support_y, tasks.query_x[:, perm], tasks.query_y[:, perm]
    )
    with torch.no_grad():
        torch.testing.assert_close(reference.predict(permuted), logits[:, perm])
    with pytest.raises(ValueError, match="steps only"):
        reference.predict(tasks, inner_steps=2)


# -- Meta-LSTM: their meta-learner cell -------------------------------------------------------


def test_meta_lstm_cell_step_is_the_papers_update():
    needs_markdtw()
    their = metalstm_markdtw.load()
    g = torch.Generator().manual_seed(0)
    cell = their.MetaLSTMCell(input_size=3, hidden_size=1, n_learner_params=4)
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x_all = torch.randn(4, 3, generator=g)  # the first LSTM's hidden state, per coordinate
    grad = torch.randn(4, 1, generator=g)
    c_next, (f_next, i_next, _) = cell([x_all, grad])
    # the paper: f_t = sigmoid(W_F [h_t, c_{t-1}, f_{t-1}] + b_F), the same for i_t, with
    # f_0 = i_0 = 0 and c_0 = cI; c_t = f_t * c_{t-1} - i_t * grad
    theta, zero = cell.cI.detach(), torch.zeros(4, 1)
    f = torch.sigmoid(torch.cat([x_all, theta, zero], 1) @ cell.WF.detach() + cell.bF.detach())
    i = torch.sigmoid(torch.cat([x_all, theta, zero], 1) @ cell.WI.detach() + cell.bI.detach())
    torch.testing.assert_close(c_next.detach(), f * theta - i * grad)
    # what they carry to the next step as f_{t-1}, i_{t-1}: the gates before the sigmoid
    torch.testing.assert_close(torch.sigmoid(f_next.detach()), f)
    torch.testing.assert_close(torch.sigmoid(i_next.detach()), i)


def test_meta_lstm_imports_do_not_shadow_other_modules():
    needs_markdtw()
    before = sys.modules.get("utils")
    metalstm_markdtw._loaded.clear()
    metalstm_markdtw.load()
    assert sys.modules.get("utils") is before and "dataloader" not in sys.modules
    assert str(metalstm_markdtw.checkout(metalstm_markdtw.NAME)) not in sys.path


def test_meta_lstm_trains_and_predicts_without_changing_its_state():
    needs_markdtw()
    config = TrainConfig(
        algorithm="meta-lstm", dataset="omniglot", test_episodes=0, ways=WAYS, train_ways=WAYS,
        shots=1, queries=QUERIES, train_queries=QUERIES, meta_batch=1, iterations=2,
        backbone="conv4-32", settings={"inner_steps": 2, "eval_inner_steps": 2},
    ).resolved()  # fmt: skip
    reference = metalstm_markdtw.build("meta-lstm", config)
    assert set(reference.state_dict()) == {
        f"metalearner.{k}" for k in reference.metalearner.state_dict()
    }
    tasks = episodes(tasks=1, shots=1)
    cI = reference.metalearner.metalstm.cI.detach().clone()
    assert torch.isfinite(torch.tensor(reference.train_step(tasks)))
    assert not torch.equal(reference.metalearner.metalstm.cI, cI)  # the outer step moved cI
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    with torch.no_grad():
        logits = reference.predict(episodes(tasks=2, shots=1))
    assert logits.shape == (2, WAYS * QUERIES, WAYS)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="one episode"):
        reference.train_step(episodes(tasks=2, shots=1))
