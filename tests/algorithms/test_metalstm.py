"""The Meta-LSTM meta-learner: its preprocessing against the formula, one update against a hand
computation, and its meta-gradient against float64 finite differences."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import MetaLSTM
from fewshot.algorithms.batchnorm import batch_statistics
from fewshot.algorithms.metalstm import MetaLSTMRule, preprocess
from fewshot.algorithms.rules import InnerRule
from fewshot.errors import ConfigError
from fewshot.training.loop import meta_step
from tests.algorithms.test_maml import finite_difference_gradient, sinusoid_like_tasks, small_mlp
from tests.algorithms.test_mamlpp import classification_tasks, small_batch_norm_net


def test_preprocessing_equals_its_formula_on_both_branches():
    p = 10.0
    values = [3.5, -2e-3, 1.0, -70.0, math.exp(-p) * 1.01, 1e-6, -3e-7, 0.0]
    out = preprocess(torch.tensor(values))
    for x, (magnitude, sign) in zip(values, out.tolist()):
        if abs(x) >= math.exp(-p):
            assert magnitude == pytest.approx(math.log(abs(x)) / p)
            assert sign == math.copysign(1.0, x)
        else:  # the small-gradient branch
            assert magnitude == -1.0
            assert sign == pytest.approx(math.exp(p) * x)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.usefixtures("float64")
def test_one_update_equals_a_hand_computation_on_a_three_coordinate_learner():
    torch.manual_seed(0)
    learner = MetaLSTM(nn.Linear(2, 1), inner_steps=1, hidden_size=3, loss=F.mse_loss)
    rule = learner.rule
    with torch.no_grad():  # weights large enough that every term matters
        for p in rule.parameters():
            p.copy_(torch.randn(p.shape))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 4, 2, generator=g), torch.randn(1, 4, 1, generator=g)
    adapted = learner.trajectory(x, y, 1, differentiable=False).params[-1]

    w, b = learner.model.weight.detach(), learner.model.bias.detach()
    residual = (x[0] @ w.T + b - y[0]).squeeze(1)  # mean squared error and its gradient
    loss = residual.pow(2).mean().item()
    grads = [
        (2 * residual * x[0, :, 0]).mean(),
        (2 * residual * x[0, :, 1]).mean(),
        2 * residual.mean(),
    ]
    thetas = [w[0, 0].item(), w[0, 1].item(), b[0].item()]

    def prep(v: float) -> list[float]:
        if abs(v) >= math.exp(-10):
            return [math.log(abs(v)) / 10, math.copysign(1.0, v)]
        return [-1.0, math.exp(10) * v]

    lstm = rule.lstm
    expected = []
    for theta, grad in zip(thetas, [v.item() for v in grads]):
        inputs = torch.tensor(prep(grad) + prep(loss))
        # Zero initial (h, c): the gates are W_ih x + b_ih + b_hh, in the order i, f, g, o.
        gates = (lstm.weight_ih @ inputs + lstm.bias_ih + lstm.bias_hh).tolist()
        i1, _, g1, o1 = (gates[k * 3 : (k + 1) * 3] for k in range(4))
        c = [sigmoid(a) * math.tanh(bb) for a, bb in zip(i1, g1)]
        h = [sigmoid(a) * math.tanh(cc) for a, cc in zip(o1, c)]
        features = h + [theta, 0.0]  # h_t, theta_{t-1}, and the previous gate (zero at first)
        wi, bi = rule.input_gate.weight[0].tolist(), rule.input_gate.bias.item()
        wf, bf = rule.forget_gate.weight[0].tolist(), rule.forget_gate.bias.item()
        i_gate = sigmoid(sum(a * bb for a, bb in zip(wi, features)) + bi)
        f_gate = sigmoid(sum(a * bb for a, bb in zip(wf, features)) + bf)
        expected.append(f_gate * theta - i_gate * grad)
    got = adapted["weight"][0, 0].tolist() + adapted["bias"][0].tolist()
    assert got == pytest.approx(expected, rel=1e-12)


class FrozenInputs(InnerRule):
    """The rule with each step's gradients and losses replaced by recorded ones: the meta-loss
    as a function in which they are constants, which finite differences can then check."""

    def __init__(self, rule: MetaLSTMRule, grads: list, losses: list) -> None:
        super().__init__()
        self.rule, self.grads, self.losses = rule, grads, losses

    def init_state(self, params):
        return self.rule.init_state(params)

    def forward(self, params, grads, losses, state, step):
        return self.rule(params, self.grads[step], self.losses[step], state, step)


class Recording(InnerRule):
    def __init__(self, rule: MetaLSTMRule) -> None:
        super().__init__()
        self.rule, self.grads, self.losses = rule, [], []

    def init_state(self, params):
        return self.rule.init_state(params)

    def forward(self, params, grads, losses, state, step):
        self.grads.append({n: g.detach().clone() for n, g in grads.items()})
        self.losses.append(losses.detach().clone())
        return self.rule(params, grads, losses, state, step)


@pytest.mark.usefixtures("float64")
def test_meta_gradient_reaches_gates_and_initial_cell_state_and_matches_finite_differences():
    """Gradients and losses enter the meta-learner as constants (the paper's assumption); with
    them held at their values, the meta-loss is a function of the LSTMs' weights and c_0 whose
    finite differences must equal the meta-gradient."""
    torch.manual_seed(0)
    learner = MetaLSTM(small_mlp(), inner_steps=2, hidden_size=3, loss=F.mse_loss)
    tasks = sinusoid_like_tasks()
    real_rule = learner.rule
    learner.rule = Recording(real_rule)
    learner.meta_loss(tasks).backward()
    params = [p for p in learner.parameters()]
    names = [n for n, _ in learner.named_parameters()]
    assert any(n.startswith("model.") for n in names) and any("gate" in n for n in names)
    for name, p in zip(names, params):  # c_0, the first LSTM and both gates all learn
        assert p.grad is not None and bool((p.grad != 0).any()), name
    learner.rule = FrozenInputs(real_rule, learner.rule.grads, learner.rule.losses)
    with torch.no_grad():
        expected = finite_difference_gradient(lambda: learner.meta_loss(tasks), params)
    for name, p, e in zip(names, params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9, msg=name)


def test_updates_run_for_every_task_at_once_with_each_tasks_own_state():
    torch.manual_seed(0)
    learner = MetaLSTM(small_mlp(), inner_steps=3, hidden_size=4, loss=F.mse_loss)
    tasks = sinusoid_like_tasks()
    together = learner.trajectory(tasks.support_x, tasks.support_y, 3, False).params[-1]
    for i in range(len(tasks)):
        alone = learner.trajectory(
            tasks.support_x[i : i + 1], tasks.support_y[i : i + 1], 3, False
        ).params[-1]
        for name, value in alone.items():
            torch.testing.assert_close(together[name][i], value[0])


@pytest.mark.usefixtures("float64")
def test_updating_the_coordinates_a_block_at_a_time_is_updating_them_all_at_once(monkeypatch):
    """The rule's blocks of rows (`BLOCK_ROWS`, a cache-sized block) change no value: the
    adapted parameters and the meta-gradient are those of one block of every coordinate."""
    import fewshot.algorithms.metalstm as metalstm

    torch.manual_seed(0)
    learner = MetaLSTM(small_mlp(), inner_steps=3, hidden_size=4, loss=F.mse_loss).double()
    tasks = sinusoid_like_tasks()

    def adapted_and_gradient(block_rows):
        monkeypatch.setattr(metalstm, "BLOCK_ROWS", block_rows)
        learner.zero_grad()
        learner.training_step(tasks)
        gradient = [p.grad.clone() for p in learner.parameters() if p.grad is not None]
        path = learner.trajectory(tasks.support_x, tasks.support_y, 3, False)
        return path.params[-1], gradient

    whole, whole_gradient = adapted_and_gradient(1 << 40)
    blocks, blocks_gradient = adapted_and_gradient(7)  # blocks that cut tasks and layers
    for name in whole:
        torch.testing.assert_close(blocks[name], whole[name], rtol=1e-12, atol=1e-12)
    for a, b in zip(blocks_gradient, whole_gradient, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class PlainRule(InnerRule):
    """The paper's update written plainly, one row per coordinate of every task: `nn.LSTMCell`
    on (preprocessed gradient, preprocessed loss), then each gate a `nn.Linear` on
    [h_t, theta_{t-1}, gate_{t-1}]; the weights are those of `rule`."""

    def __init__(self, rule: MetaLSTMRule) -> None:
        super().__init__()
        self.rule = rule

    def init_state(self, params):
        rows = sum(p.numel() for p in params.values())
        like = next(iter(params.values()))
        hidden = like.new_zeros(rows, self.rule.hidden_size)
        return hidden, hidden, like.new_zeros(rows, 1), like.new_zeros(rows, 1)

    def forward(self, params, grads, losses, state, step):
        names, tasks = list(params), len(losses)
        theta = torch.cat([params[n].reshape(tasks, -1) for n in names], 1)
        gradient = torch.cat([grads[n].detach().reshape(tasks, -1) for n in names], 1)
        loss = preprocess(losses.detach())[:, None].expand(tasks, theta.shape[1], 2)
        inputs = torch.cat([preprocess(gradient), loss], -1).reshape(-1, 4)
        h, c, i, f = state
        h, c = self.rule.lstm(inputs, (h, c))
        theta, gradient = theta.reshape(-1, 1), gradient.reshape(-1, 1)
        i = torch.sigmoid(self.rule.input_gate(torch.cat([h, theta, i], 1)))
        f = torch.sigmoid(self.rule.forget_gate(torch.cat([h, theta, f], 1)))
        new, start = (f * theta - i * gradient).reshape(tasks, -1), 0
        updated = {}
        for n in names:
            size = params[n][0].numel()
            updated[n] = new[:, start : start + size].reshape(params[n].shape)
            start += size
        return updated, (h, c, i, f)


@pytest.mark.usefixtures("float64")
def test_the_rule_equals_the_update_written_plainly_in_adaptation_and_meta_gradient(monkeypatch):
    """The rule's fast path (gates laid out by rows, the loss's part a per-task column, blocks
    of coordinates) against `PlainRule` on the same weights: the adapted parameters of several
    tasks after several steps, and the meta-gradient."""
    import fewshot.algorithms.metalstm as metalstm

    monkeypatch.setattr(metalstm, "BLOCK_ROWS", 5)  # blocks that cut tasks and layers
    torch.manual_seed(0)
    learner = MetaLSTM(small_mlp(), inner_steps=3, hidden_size=4, loss=F.mse_loss)
    with torch.no_grad():  # weights large enough that every term matters
        for p in learner.rule.parameters():
            p.copy_(torch.randn(p.shape))
    tasks = sinusoid_like_tasks()

    def adapted_and_gradient():
        learner.zero_grad()
        learner.training_step(tasks)
        gradient = [p.grad.clone() for p in learner.parameters() if p.grad is not None]
        return learner.trajectory(tasks.support_x, tasks.support_y, 3, False).params[-1], gradient

    fast, fast_gradient = adapted_and_gradient()
    rule = learner.rule
    learner.rule = PlainRule(rule)
    plain, plain_gradient = adapted_and_gradient()
    learner.rule = rule
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-12, atol=1e-12)
    assert len(fast_gradient) == len(plain_gradient)
    for a, b in zip(fast_gradient, plain_gradient, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_training_clips_the_meta_gradient_norm():
    """The loop's meta-step clips the whole meta-gradient: the clipped gradient is the
    unclipped one scaled to norm 1e-3 (an SGD step of rate 1 subtracts exactly it)."""
    torch.manual_seed(0)
    learner = MetaLSTM(small_mlp(), inner_steps=2, loss=F.mse_loss, gradient_clip=1e-3)
    tasks = sinusoid_like_tasks()
    learner.training_step(tasks)
    unclipped = [p.grad.clone() for p in learner.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in unclipped]))
    before = [p.detach().clone() for p in learner.parameters()]
    meta_step(learner, torch.optim.SGD(learner.parameters(), lr=1.0), tasks)
    for start, end, grad in zip(before, learner.parameters(), unclipped):
        torch.testing.assert_close(start - end.detach(), grad * (1e-3 / norm))


def test_initial_step_size_outside_zero_one_is_refused():
    with pytest.raises(Exception, match="must lie in"):
        MetaLSTM(small_mlp(), initial_step_size=1.5)


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_a_statistics_momentum_outside_zero_one_is_refused(momentum):
    with pytest.raises(ConfigError, match="statistics_momentum must lie in"):
        MetaLSTM(small_mlp(), statistics_momentum=momentum)


def test_a_model_saved_under_one_statistics_momentum_loads_under_another():
    """The momentum changes prediction only: the state dict is the same for every value."""
    keys = {m: set(batch_norm_learner("inductive", m).state_dict()) for m in (0.0, 0.95)}
    assert keys[0.0] == keys[0.95]


def batch_norm_learner(policy: str, statistics_momentum: float = 0.0) -> MetaLSTM:
    return MetaLSTM(
        small_batch_norm_net(),
        inner_steps=3,
        hidden_size=4,
        batch_norm=policy,
        statistics_momentum=statistics_momentum,
    )


def classification_episodes() -> tuple[torch.Tensor, ...]:
    tasks = classification_tasks(num_tasks=2)
    return tasks.support_x, tasks.support_y, tasks.query_x


def averaged(statistics: list[torch.Tensor], reset: float, momentum: float) -> torch.Tensor:
    """The equal average of the passes' statistics (momentum 0), or r <- (1 - m) r + m b from
    the reset value, pass by pass."""
    if momentum == 0:
        return torch.stack(statistics).mean(0)
    running = torch.full_like(statistics[0], reset)
    for b in statistics:
        running = (1 - momentum) * running + momentum * b
    return running


@pytest.mark.parametrize("momentum", [0.0, 0.5, 1.0])
def test_inductive_queries_are_normalised_with_the_support_sets_averages_over_the_steps(momentum):
    """The paper's test-time batch norm: running averages of the support set's statistics over
    the T adaptation steps, reset for every task, normalise the queries; every pass weighted
    equally, or by `statistics_momentum` (1: the last pass's statistics alone)."""
    learner = batch_norm_learner("inductive", statistics_momentum=momentum)
    support_x, support_y, query_x = classification_episodes()
    predictor = learner.adapt(support_x, support_y)
    with batch_statistics():  # adaptation normalises the support set with its own statistics
        path = learner.trajectory(support_x, support_y, 3, False, keep_all_steps=True)
    path.params = [{n: p.detach() for n, p in phi.items()} for phi in path.params]
    for task in range(2):
        hidden = [
            F.linear(support_x[task], phi["0.weight"][task], phi["0.bias"][task])
            for phi in path.params[:3]  # the support passes of steps 0, 1, 2
        ]
        mean = averaged([h.mean(0) for h in hidden], 0.0, momentum)
        var = averaged([h.var(0, correction=1) for h in hidden], 1.0, momentum)
        torch.testing.assert_close(predictor.buffers["1.running_mean"][task, 0], mean)
        torch.testing.assert_close(predictor.buffers["1.running_var"][task, 0], var)
        phi = {n: p[task] for n, p in path.params[-1].items()}
        h = F.linear(query_x[task], phi["0.weight"], phi["0.bias"])
        h = F.batch_norm(h, mean, var, phi["1.weight"], phi["1.bias"], False, 0.0, 1e-5)
        expected = F.linear(torch.tanh(h), phi["3.weight"], phi["3.bias"])
        torch.testing.assert_close(predictor(query_x)[task], expected)


@pytest.mark.parametrize("policy", ["inductive", "transductive"])
def test_only_the_transductive_policy_lets_queries_see_each_other(policy):
    learner = batch_norm_learner(policy)
    support_x, support_y, query_x = classification_episodes()
    with torch.no_grad():
        predictor = learner.adapt(support_x, support_y)
        before = predictor(query_x)
        changed = query_x.clone()
        changed[:, 0] += 5.0
        after = predictor(changed)
    others_unchanged = torch.allclose(before[:, 1:], after[:, 1:], rtol=0, atol=1e-12)
    assert others_unchanged == (policy == "inductive")
