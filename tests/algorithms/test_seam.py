"""What every method shares: the user's model left alone, both execution paths and chunking
equal, evaluation step counts, batch-norm policies, the step index seen by the forward pass."""

import pytest
import torch
from torch import nn

from fewshot import ANIL, MAML, MAMLpp, MetaLSTM, MetaSGD, ProtoNet, Reptile, Task
from fewshot.algorithms import current_inner_step
from fewshot.models import Conv4, body_and_head
from tests.algorithms.test_maml import conv_tasks

GRADIENT_METHODS = {
    "maml": lambda model, **kw: MAML(model, inner_lr=0.4, **kw),
    "meta-sgd": lambda model, **kw: MetaSGD(model, inner_lr=0.4, **kw),
    "anil": lambda model, **kw: ANIL(*body_and_head(model), inner_lr=0.4, **kw),
    "reptile": lambda model, **kw: Reptile(model, inner_lr=0.01, inner_batch=None, **kw),
    "maml++": lambda model, **kw: MAMLpp(model, inner_lr=0.4, da=False, **kw),
    "meta-lstm": lambda model, **kw: MetaLSTM(model, **kw),
}


def tiny_conv4(seed=0, **kw):
    torch.manual_seed(seed)
    return Conv4(out_features=3, hidden=8, image_size=16, **kw)


def gradients_after_one_training_step(method, **kw):
    learner = GRADIENT_METHODS[method](tiny_conv4(), inner_steps=2, **kw)
    metrics = learner.training_step(conv_tasks(num_tasks=3))
    return learner, metrics, [p.grad.clone() for p in learner.parameters() if p.grad is not None]


@pytest.mark.parametrize("method", list(GRADIENT_METHODS) + ["protonet"])
def test_wrapping_and_training_leave_the_users_model_unchanged(method):
    model = tiny_conv4(track_running_stats=True)
    model(torch.randn(4, 1, 16, 16))  # running statistics that differ from their initial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = ProtoNet(model) if method == "protonet" else GRADIENT_METHODS[method](model)
    learner.training_step(conv_tasks())
    learner.predict(conv_tasks())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_vectorised_and_one_task_at_a_time_paths_agree(method):
    results = [gradients_after_one_training_step(method, vectorize=v) for v in (True, False)]
    (vec, vec_metrics, vec_grads), (loop, loop_metrics, loop_grads) = results
    assert vec_metrics == pytest.approx(loop_metrics, rel=1e-6)
    assert len(vec_grads) == len(loop_grads) > 0
    for a, b in zip(vec_grads, loop_grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)
    tasks = conv_tasks(num_tasks=3, seed=1)
    torch.testing.assert_close(vec.predict(tasks), loop.predict(tasks), rtol=1e-7, atol=1e-8)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_chunked_training_step_accumulates_the_whole_meta_batch_gradient(method):
    _, whole_metrics, whole = gradients_after_one_training_step(method, chunk_size=None)
    _, chunk_metrics, chunked = gradients_after_one_training_step(method, chunk_size=2)
    assert whole_metrics == pytest.approx(chunk_metrics, rel=1e-6)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_predictions_use_the_evaluation_step_count_by_default(method):
    learner = GRADIENT_METHODS[method](tiny_conv4(), inner_steps=1, eval_inner_steps=3)
    tasks = conv_tasks()
    default = learner.predict(tasks)
    torch.testing.assert_close(default, learner.predict(tasks, inner_steps=3))
    assert not torch.allclose(default, learner.predict(tasks, inner_steps=1))


def queries_with_others_changed(tasks: Task) -> Task:
    """The same episodes with every query but the first replaced by other images."""
    g = torch.Generator().manual_seed(7)
    query_x = tasks.query_x.clone()
    query_x[:, 1:] = torch.randn(query_x[:, 1:].shape, generator=g) * 3 + 1
    return Task(tasks.support_x, tasks.support_y, query_x, tasks.query_y)


def first_query_prediction(learner, tasks):
    return learner.predict(tasks)[:, 0]


def trained_protonet(batch_norm):
    learner = ProtoNet(
        Conv4(out_features=None, hidden=8, image_size=16, track_running_stats=True),
        batch_norm=batch_norm,
    )
    learner.training_step(conv_tasks())  # running statistics away from their initial values
    return learner.eval()


LEARNERS_BY_POLICY = {
    "maml": lambda policy: MAML(tiny_conv4(), batch_norm=policy),
    "reptile": lambda policy: Reptile(tiny_conv4(), inner_batch=None, batch_norm=policy),
    "anil": lambda policy: ANIL(*body_and_head(tiny_conv4()), batch_norm=policy),
    "maml++": lambda policy: MAMLpp(tiny_conv4(), batch_norm=policy),
    "meta-lstm": lambda policy: MetaLSTM(tiny_conv4(), batch_norm=policy),
    "protonet": trained_protonet,
}


@pytest.mark.parametrize("method", LEARNERS_BY_POLICY)
def test_inductive_batch_norm_keeps_each_query_independent_of_the_others(method):
    tasks = conv_tasks()
    learner = LEARNERS_BY_POLICY[method]("inductive")
    alone = first_query_prediction(learner, tasks)
    torch.testing.assert_close(
        alone, first_query_prediction(learner, queries_with_others_changed(tasks))
    )
    transductive = LEARNERS_BY_POLICY[method]("transductive")
    assert not torch.allclose(
        first_query_prediction(transductive, tasks),
        first_query_prediction(transductive, queries_with_others_changed(tasks)),
    )


def test_inductive_prediction_normalises_with_the_support_set_plus_the_query():
    """Nichol et al.'s non-transductive protocol, computed by hand for one query: one inner
    step on the support set (its own batch statistics), then the support set plus the query
    through the adapted network, of which the query's output is kept."""
    maml = MAML(tiny_conv4(), inner_lr=0.4, inner_steps=1, batch_norm="inductive")
    tasks = conv_tasks(num_tasks=1)
    names = [n for n, _ in maml.model.named_parameters()]
    theta = list(maml.model.parameters())
    support_loss = torch.nn.functional.cross_entropy(
        maml.model(tasks.support_x[0]), tasks.support_y[0]
    )
    phi = [t - 0.4 * g for t, g in zip(theta, torch.autograd.grad(support_loss, theta))]
    batch = torch.cat([tasks.support_x[0], tasks.query_x[0, 2:3]])
    by_hand = torch.func.functional_call(maml.model, dict(zip(names, phi)), (batch,))[-1]
    torch.testing.assert_close(maml.predict(tasks)[0, 2], by_hand.detach())


def test_a_parameter_can_adapt_without_being_meta_learned():
    """A task-specific context vector: zero at the start of every task, adapted in the inner
    loop, never learned by the outer loop; the rest is meta-learned through it."""

    class WithContext(nn.Module):
        def __init__(self):
            super().__init__()
            self.context = nn.Parameter(torch.zeros(4))
            self.linear = nn.Linear(4, 1)

        def forward(self, x):
            return self.linear(x + self.context)

    torch.manual_seed(0)
    maml = MAML(
        WithContext(),
        inner_lr=0.1,
        adapted=["context"],
        meta_learned=["linear.weight", "linear.bias"],
        loss=torch.nn.functional.mse_loss,
    )
    tasks = Task(
        torch.randn(2, 5, 4), torch.randn(2, 5, 1), torch.randn(2, 3, 4), torch.randn(2, 3, 1)
    )
    adapted = maml.trajectory(tasks.support_x, tasks.support_y, steps=1).params[-1]
    assert not torch.equal(adapted["context"], torch.zeros(2, 4))
    assert torch.equal(adapted["linear.weight"], maml.model.linear.weight.expand(2, 1, 4))
    maml.meta_loss(tasks).backward()
    assert maml.model.context.grad is None
    assert maml.model.linear.weight.grad.abs().sum() > 0


def test_a_predictor_is_a_snapshot_of_its_adaptation():
    anil = ANIL(*body_and_head(tiny_conv4()), inner_steps=1)
    tasks = conv_tasks()
    predictor = anil.adapt(tasks.support_x, tasks.support_y)
    before = predictor(tasks.query_x)
    with torch.no_grad():
        for p in anil.parameters():
            p.add_(0.5)
    torch.testing.assert_close(predictor(tasks.query_x), before)


def test_inference_mode_gets_one_clear_error():
    from fewshot.errors import ConfigError

    with torch.inference_mode(), pytest.raises(ConfigError, match="use torch.no_grad"):
        MAML(tiny_conv4()).predict(conv_tasks())


class StepRecorder(nn.Module):
    """A linear model that records the inner step index at each call."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(current_inner_step())
        return self.linear(x)


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_forward_pass_sees_the_inner_step_index(vectorize):
    maml = MAML(StepRecorder(), inner_lr=0.1, inner_steps=3, vectorize=vectorize)
    tasks = Task(
        torch.randn(1, 4, 2),
        torch.tensor([[0, 1, 0, 1]]),
        torch.randn(1, 2, 2),
        torch.tensor([[0, 1]]),
    )
    maml.meta_loss(tasks)
    assert maml.model.seen == [0, 1, 2, 2]  # three support passes, then the query pass


@pytest.mark.parametrize("adapted", ["head", ["head.weight", "head.bias"], lambda n: "head" in n])
def test_a_named_set_adapts_while_every_parameter_is_meta_learned(adapted):
    maml = MAML(tiny_conv4(), inner_lr=0.4, adapted=adapted)
    tasks = conv_tasks()
    adapted = maml.trajectory(tasks.support_x, tasks.support_y, steps=2).params[-1]
    for name, theta in maml.model.named_parameters():
        moved = not torch.equal(adapted[name], theta.expand_as(adapted[name]))
        assert moved == name.startswith("head."), name
    maml.meta_loss(tasks).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in maml.model.parameters()
        if p.dim() > 1
    )  # conv and linear weights (conv biases cancel in batch norm)


def test_an_unknown_parameter_name_is_refused():
    from fewshot.errors import ConfigError

    with pytest.raises(ConfigError, match="has no parameters named classifier.weight"):
        MAML(tiny_conv4(), adapted=["classifier.weight"])


def test_learning_rates_are_the_settings_declared_so():
    """The divergence message and the tuner's search ask `learning_rates()`: the declared step
    sizes, not the final or minimum values of a schedule (min_outer_lr, final_outer_lr)."""
    from fewshot.algorithms.registry import METHODS

    rates = {name: set(method.settings().learning_rates()) for name, method in METHODS.items()}
    assert rates["maml"] == rates["reptile"] == rates["maml++"] == {"inner_lr"}
    assert rates["baseline++"] == rates["finetune"] == {"finetune_lr"}
    assert rates["protonet"] == rates["relationnet"] == set()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: MAML(m, bogus=1), "MAML takes no option `bogus`; it takes inner_lr, "),
        (lambda m: ProtoNet(m, inner_lr=0.1), "ProtoNet takes no option `inner_lr`; it takes "),
        (lambda m: Reptile(m, inner_rate=0.1), "Reptile takes no option `inner_rate`"),
        (
            lambda m: MetaLSTM(m, first_order=False),
            "MetaLSTM sets the option `first_order` itself; leave it out.",
        ),
    ],
)
def test_an_option_a_method_does_not_take_is_refused_in_one_line(make, message):
    """The library's own error, not Python's TypeError from the constructors' chain."""
    from fewshot.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        make(nn.Linear(2, 2))
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_a_type_error_of_another_constructor_is_not_taken_for_a_refused_option():
    from fewshot.algorithms.base import option_refusal

    linear = "Linear.__init__() got an unexpected keyword argument 'bogus'"
    assert option_refusal(MAML, linear) is None  # nn.Linear is not in MAML's chain
    learner = "GradientLearner.__init__() got an unexpected keyword argument 'bogus'"
    assert option_refusal(MAML, learner).startswith("MAML takes no option `bogus`")
