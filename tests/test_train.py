"""companion/train.py: learning, determinism, the schedule, callbacks, checkpoint/resume, errors."""

import math

import pytest
import torch

from companion.data import lm_batches, zipf_markov
from companion.model import ModelConfig, TinyLM
from companion.train import History, default_adamw, evaluate_loss, lr_factor, train

VOCAB = 32


def _model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32))


@pytest.fixture(scope="module")
def batches():
    return lm_batches(zipf_markov(6000, vocab_size=VOCAB, branching=4, noise=0.05, doc_len=200, seed=0), 8, 16)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# the schedule
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "step, want",
    [
        (0, 0.1), (4, 0.5), (9, 1.0),  # warmup: (step + 1) / warmup
        (10, 1.0),  # cosine starts at 1
        (55, 0.1 + 0.9 * 0.5),  # half-way through the decay: cos(pi/2) = 0
        (32.5, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter of the way
        (100, 0.1), (150, 0.1),  # at and past the end: min_lr_ratio
    ],
)
def test_lr_factor_exact_values(step, want):
    assert lr_factor(step, steps=100, warmup=10, min_lr_ratio=0.1) == pytest.approx(want, rel=1e-15, abs=1e-15)


def test_lr_factor_shape():
    f = [lr_factor(s, steps=50, warmup=5, min_lr_ratio=0.2) for s in range(50)]
    assert all(a < b for a, b in zip(f[:5], f[1:5]))  # strictly rising during warmup
    assert all(a >= b for a, b in zip(f[5:], f[6:]))  # non-increasing afterwards
    assert max(f) == 1.0 and min(f[5:]) > 0.2 and f[0] == pytest.approx(0.2)
    assert lr_factor(0, steps=10, warmup=0, min_lr_ratio=0.0) == 1.0  # no warmup
    assert lr_factor(10, steps=10, warmup=0, min_lr_ratio=0.0) == pytest.approx(0.0, abs=1e-16)


# ----------------------------------------------------------------------------------------------
# learning and determinism
# ----------------------------------------------------------------------------------------------
def test_loss_goes_down(batches):
    model = _model()
    before = evaluate_loss(model, batches, 4, offset=1000)
    hist = train(model, batches, steps=60, lr=1e-2)
    after = evaluate_loss(model, batches, 4, offset=1000)
    assert before == pytest.approx(math.log(VOCAB), rel=0.05)  # untrained: near uniform
    assert after < before - 0.5
    assert sum(hist.loss[-10:]) / 10 < sum(hist.loss[:5]) / 5 - 0.5
    assert hist.step == list(range(60)) and len(hist.loss) == len(hist.lr) == 60


def test_identical_runs_identical_histories(batches):
    runs = []
    for _ in range(2):
        model = _model(seed=3)
        hist = train(model, batches, steps=15, lr=5e-3, eval_every=5, eval_fn=lambda m: {"w": m.embed.weight.sum()})
        runs.append((hist.to_dict(), _params(model)))
    assert runs[0][0] == runs[1][0]
    _assert_same_params(runs[0][1], runs[1][1])


def test_history_lr_follows_schedule(batches):
    seen = []
    hist = train(_model(), batches, steps=20, lr=2e-3, warmup=4, min_lr_ratio=0.25,
                 on_step=lambda step, m, loss: seen.append(None))
    want = [2e-3 * lr_factor(s, steps=20, warmup=4, min_lr_ratio=0.25) for s in range(20)]
    assert hist.lr == pytest.approx(want, rel=1e-15)
    assert len(seen) == 20


def test_default_warmup_is_five_percent(batches):
    hist = train(_model(), batches, steps=40, lr=1e-3)
    assert hist.lr[0] == pytest.approx(1e-3 * 1 / 2)  # warmup = max(1, 40 // 20) = 2
    assert hist.lr[1] == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------------
# callbacks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps, every, want", [(12, 5, [5, 10, 12]), (10, 5, [5, 10]), (7, 0, [7]), (3, 10, [3])])
def test_eval_fn_called_at_the_right_steps(batches, steps, every, want):
    calls = []

    def eval_fn(model):
        calls.append((model.training, torch.is_grad_enabled()))
        return {"a": torch.tensor(1.5), "b": len(calls)}

    hist = train(_model(), batches, steps=steps, eval_every=every, eval_fn=eval_fn)
    assert [s for s, _ in hist.eval["a"]] == want
    assert hist.eval["b"] == [(s, float(i + 1)) for i, s in enumerate(want)]
    assert all(isinstance(v, float) for _, v in hist.eval["a"])
    assert calls == [(False, False)] * len(want)  # eval mode, no grad
    assert hist.last_eval("b") == float(len(want))


def test_on_step_called_every_step_in_train_mode(batches):
    calls = []

    def on_step(step, model, loss):
        calls.append((step, model.training, loss))

    model = _model()
    hist = train(model, batches, steps=9, eval_every=3, eval_fn=lambda m: {"x": 0.0}, on_step=on_step)
    assert [s for s, _, _ in calls] == list(range(9))
    assert all(training for _, training, _ in calls)  # train mode is restored after each eval
    assert [loss for _, _, loss in calls] == hist.loss
    assert not model.training  # returned in eval mode


def test_gradients_are_clipped(batches):
    norms = {}

    def on_step(step, model, loss):
        norms.setdefault(step, torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item())

    clip = 1e-3
    train(_model(), batches, steps=3, clip=clip, on_step=on_step)
    assert max(norms.values()) <= clip * (1 + 1e-5)
    norms.clear()
    train(_model(), batches, steps=3, clip=None, on_step=on_step)
    assert min(norms.values()) > 10 * clip  # the bound above was not vacuous


# ----------------------------------------------------------------------------------------------
# checkpoint and resume
# ----------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _stop_at(batches, stop_step):
    def wrapped(step):
        if step == stop_step:
            raise _Stop
        return batches(step)

    return wrapped


def test_resume_equals_straight_run(batches, tmp_path):
    kw = dict(steps=20, lr=5e-3, warmup=3, eval_every=4, eval_fn=lambda m: {"w": m.embed.weight.norm()})
    straight = _model(seed=1)
    hist_straight = train(straight, batches, **kw)

    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Stop):
        train(_model(seed=1), _stop_at(batches, 10), checkpoint=ckpt, checkpoint_every=5, **kw)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 10
    assert saved["history"]["step"] == list(range(10))

    resumed = _model(seed=99)  # a different init: everything must come from the checkpoint
    hist_resumed = train(resumed, batches, checkpoint=ckpt, checkpoint_every=5, **kw)
    _assert_same_params(_params(resumed), _params(straight))
    assert hist_resumed.to_dict() == hist_straight.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # atomic writes leave no temp files


def test_rerunning_a_finished_checkpoint_changes_nothing(batches, tmp_path):
    ckpt = tmp_path / "done.pt"
    kw = dict(steps=10, checkpoint=ckpt, checkpoint_every=5, eval_every=5, eval_fn=lambda m: {"s": 1.0})
    first = _model(seed=2)
    hist1 = train(first, batches, **kw)
    again = _model(seed=7)
    hist2 = train(again, batches, **kw)
    assert hist2.to_dict() == hist1.to_dict()
    _assert_same_params(_params(again), _params(first))


def test_checkpoint_every_step_counts(batches, tmp_path):
    ckpt = tmp_path / "c.pt"
    with pytest.raises(_Stop):
        train(_model(), _stop_at(batches, 7), steps=20, checkpoint=ckpt, checkpoint_every=3)
    assert torch.load(ckpt, weights_only=True)["step"] == 6


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_nan_loss_raises_floating_point_error(batches):
    model = _model()
    with torch.no_grad():
        model.blocks[0].mlp.up.weight[0, 0] = float("nan")
    before = _params(model)
    with pytest.raises(FloatingPointError, match="step 0"):
        train(model, batches, steps=5)
    after = _params(model)
    for k in before:  # nothing was updated with a NaN
        assert torch.equal(before[k].nan_to_num(7.0), after[k].nan_to_num(7.0)), k


def test_nan_loss_mid_run_reports_the_step(batches):
    def poison(step, model, loss):
        if step == 3:
            with torch.no_grad():
                model.embed.weight.fill_(float("inf"))

    with pytest.raises(FloatingPointError, match="step 4"):
        train(_model(), batches, steps=10, on_step=poison)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "steps"),
        (dict(steps=-3), "steps"),
        (dict(steps=2.0), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(clip=0.0), "clip"),
        (dict(clip=-1.0), "clip"),
        (dict(warmup=-1), "warmup"),
        (dict(warmup=11), "warmup"),
        (dict(optimizer="adamw"), "optimizer"),
        (dict(optimizer=3), "optimizer"),
    ],
)
def test_bad_arguments_raise_value_error(batches, kw, match):
    args = dict(steps=10)
    args.update(kw)
    model = _model()
    before = _params(model)
    with pytest.raises(ValueError, match=match):
        train(model, batches, **args)
    _assert_same_params(before, _params(model))


def test_checkpoint_every_zero_is_rejected(batches, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every"):
        train(_model(), batches, steps=3, checkpoint=tmp_path / "c.pt", checkpoint_every=0)


# ----------------------------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------------------------
def test_optimizer_factory_is_called_once_with_the_model(batches):
    model, seen = _model(), []

    def factory(m):
        seen.append(m)
        return torch.optim.SGD(m.parameters(), lr=0.05)

    hist = train(model, batches, steps=4, warmup=0, optimizer=factory)
    assert seen == [model]
    assert hist.lr[0] == pytest.approx(0.05)  # the factory's lr is the base of the schedule


def test_optimizer_instance_sgd_step_is_exact(batches, fp64):
    model = _model()
    x, y = batches(0)
    reference = _model()
    reference.load_state_dict(model.state_dict())
    reference(x, y).loss.backward()
    want = {n: p.detach() - 0.1 * p.grad for n, p in reference.named_parameters()}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hist = train(model, batches, steps=1, warmup=0, clip=None, optimizer=opt, lr=123.0)  # lr ignored
    assert hist.lr == [0.1]  # lr_factor(0, steps=1, warmup=0) == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=1e-15)


def test_default_adamw_groups():
    model = _model()
    opt = default_adamw(model, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # tied weights once
    assert any(p is model.embed.weight for p in decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)


# ----------------------------------------------------------------------------------------------
# evaluate_loss / History
# ----------------------------------------------------------------------------------------------
def test_evaluate_loss_is_the_mean_and_restores_mode(batches):
    model = _model()
    model.train()
    got = evaluate_loss(model, batches, 3, offset=5)
    want = sum(model(*batches(5 + i)).loss.item() for i in range(3)) / 3
    assert got == pytest.approx(want, rel=1e-12)
    assert model.training
    model.eval()
    evaluate_loss(model, batches, 1)
    assert not model.training


def test_evaluate_loss_rejects_zero_batches(batches):
    with pytest.raises(ValueError, match="n_batches"):
        evaluate_loss(_model(), batches, 0)


def test_history_round_trip():
    h = History([0, 1], [2.5, 2.0], [1e-3, 2e-3], {"val": [(1, 0.5), (2, 0.25)]})
    back = History.from_dict(h.to_dict())
    assert back == h
    assert back.last_eval("val") == 0.25
