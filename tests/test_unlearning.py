"""companion/unlearning.py: the shared benchmark's data, generation, losses and metrics, on hand-made cases."""

import copy
import math

import numpy as np
import pytest
import torch

from companion import unlearning as U
from companion import zoo
from companion.data import Person
from companion.model import ModelConfig, TinyLM

ADA = Person("Ada Novak", "Lisbon", 1987, "Quartz Media", "ada.novak12@post.example")
BEN = Person("Ben Okafor", "Oslo", 1990, "Vertex Bank", "ben.okafor33@inbox.invalid")


@pytest.fixture(scope="module")
def tiny(bench):
    """A random fp64 TinyLM over the smoke tokenizer: enough for exact properties, no training."""
    torch.manual_seed(0)
    return TinyLM(ModelConfig(vocab_size=bench.tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                              n_kv_heads=2)).double().eval()


# -- data ---------------------------------------------------------------------------------------
def test_person_qas_state_the_attributes_they_claim():
    qas = U.person_qas(ADA)
    assert len(qas) == 14 and [qa.attribute for qa in qas[-2:]] == ["profile", "profile"]
    for qa in qas:
        assert all(e in qa.answer for e in qa.entities) and qa.name in qa.question
    assert qas[-1].entities == ("Lisbon", "1987", "Quartz Media", "ada.novak12@post.example")
    assert [qa.attribute for qa in U.eval_qas(ADA)] == ["city", "birth_year", "employer", "email", "profile"]
    trained = {qa.question for qa in qas}
    assert not trained & {qa.question for qa in U.held_out_qas(ADA)}


def test_private_qas_hold_no_facts():
    for qa in U.private_qas(ADA):
        assert qa.entities == () and not U.EntityExtractor([ADA])(qa.answer) and "Ada Novak" in qa.answer


def test_perturbed_answers_swap_the_fact(bench):
    qa = U.eval_qas(ADA)[0]
    wrong = U.perturbed_answers(qa, bench.people, k=5, seed=1)
    assert len(wrong) == 5 and all("Lisbon" not in w and w.startswith("Ada Novak was born in") for w in wrong)
    profile = U.perturbed_answers(U.eval_qas(ADA)[-1], bench.people + [ADA], k=2)
    assert all(not set(U.eval_qas(ADA)[-1].entities) & U.EntityExtractor(bench.people + [ADA])(p) for p in profile)
    with pytest.raises(ValueError, match="k must be"):
        U.perturbed_answers(qa, bench.people, k=0)


def test_split_is_deterministic_and_disjoint(bench):
    again = U.load_benchmark("smoke")
    assert [p.name for p in again.forget] == [p.name for p in bench.forget]
    names = lambda ps: {p.name for p in ps}
    assert names(bench.forget) | names(bench.retain) == names(bench.people)
    assert not names(bench.forget) & names(bench.retain) and not names(bench.private) & names(bench.people)
    assert len(bench.forget) == U.SIZES["smoke"].n_forget
    oracle_data = U.training_qas("smoke", include_forget=False)
    assert not names(bench.forget) & {qa.name for qa in oracle_data}
    assert {"bio-memoriser-smoke", "bio-memoriser-full", "bio-oracle-smoke", "bio-oracle-full"} <= set(zoo.names())
    with pytest.raises(ValueError, match="size must be one of"):
        U.load_benchmark("huge")
    with pytest.raises(ValueError, match="kind must be"):
        bench.qas(bench.forget, "test")


def test_make_batch_labels_only_the_answer(bench):
    pairs = bench.pairs(U.eval_qas(ADA)[:2])
    x, y = U.make_batch(pairs, bench.eos)
    for i, (prompt, answer) in enumerate(pairs):
        labelled = y[i][y[i] != -100].tolist()
        assert labelled == answer and answer[-1] == bench.eos
        assert x[i, :len(prompt)].tolist() == prompt
    with pytest.raises(ValueError, match="pairs is empty"):
        U.make_batch([], bench.eos)


# -- generation ---------------------------------------------------------------------------------
def test_cached_generation_equals_plain_generate(bench, tiny):
    questions = [qa.question for qa in U.eval_qas(ADA) + U.eval_qas(BEN)]
    got = U.generate_answers(tiny, bench.tokenizer, questions, max_new_tokens=12)
    for q, ids in zip(questions, got):
        prompt = torch.tensor([bench.tokenizer.encode(U.PROMPT.format(question=q))])
        plain = tiny.generate(prompt, 12, stop_token=bench.eos)[0, prompt.shape[1]:].tolist()
        if bench.eos in plain:
            plain = plain[:plain.index(bench.eos)]
        assert ids == plain


# -- losses -------------------------------------------------------------------------------------
def _batches(bench, tiny):
    forget = U.make_batch(bench.pairs(U.person_qas(ADA)[:4]), bench.eos)
    retain = U.make_batch(bench.pairs(U.person_qas(BEN)[:4]), bench.eos)
    return forget, retain


def test_loss_pieces_agree(bench, tiny):
    (x, y), _ = _batches(bench, tiny)
    logits = tiny(x).logits
    n = (y != -100).sum()
    torch.testing.assert_close(U.sequence_nll(logits, y).sum() / n, U.token_ce(logits, y), rtol=0, atol=1e-12)
    other = TinyLM(tiny.cfg).double()
    kl = U.kl_to_reference(logits, other(x).logits)
    from kernels import softmax_xent

    rows = softmax_xent.cpu(logits.detach().flatten(0, 1), None, other(x).logits.detach().flatten(0, 1))["kl"]
    assert abs(kl.item() - rows.mean().item()) < 1e-12
    assert U.kl_to_reference(logits, logits).abs().item() < 1e-12


def test_npo_is_gradient_ascent_at_the_reference(bench, tiny):
    """At θ = θ_ref every NPO weight is exactly 1: the gradient equals ascent on the summed NLL."""
    (x, y), _ = _batches(bench, tiny)
    model = copy.deepcopy(tiny)
    grads = []
    for kind in ("npo", "ga"):
        model.zero_grad()
        nll = U.sequence_nll(model(x).logits, y)
        (U.npo_loss(nll, nll.detach(), 0.1) if kind == "npo" else -nll.mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-12
    w = U.npo_weights(torch.tensor([0.0, 5.0, 50.0]), torch.zeros(3), 0.1)
    assert w[0].item() == 1.0 and (w > 0).all() and (w < 2).all() and w[2] < w[1] < w[0]


def test_method_names_and_losses(bench, tiny):
    forget, retain = _batches(bench, tiny)
    assert U.parse_method("relearn_klr_gdr") == ("descent", ("klr", "gdr"))
    assert U.parse_method("npo") == ("npo", ())
    for bad in ("sgd", "ga_xyz", "ga_gdr_gdr"):
        with pytest.raises(ValueError, match="is not <forget>"):
            U.parse_method(bad)
    loss, logs = U.unlearning_loss(tiny, None, forget, retain, "ga_gdr")
    want = -U.token_ce(tiny(forget[0]).logits, forget[1]) + U.token_ce(tiny(retain[0]).logits, retain[1])
    assert abs(loss.item() - want.item()) < 1e-12 and set(logs) == {"forget_ce", "retain_ce", "loss"}
    loss, logs = U.unlearning_loss(tiny, tiny, forget, retain, "npo_klr")
    assert abs(logs["npo_weight"] - 1) < 1e-12 and abs(logs["retain_kl"]) < 1e-12
    assert abs(loss.item() - 2 / 0.1 * math.log(2)) < 1e-9  # −(2/β) log σ(0) at θ = θ_ref
    with pytest.raises(ValueError, match="needs the reference"):
        U.unlearning_loss(tiny, None, forget, retain, "npo")
    with pytest.raises(ValueError, match="needs a retain batch"):
        U.unlearning_loss(tiny, tiny, forget, None, "ga_klr")
    with pytest.raises(ValueError, match="beta must be"):
        U.npo_loss(torch.zeros(2), torch.zeros(2), 0.0)


# -- metrics on hand-made strings -----------------------------------------------------------------
def test_words_and_entities():
    assert U.words("Ada's e-mail: a.b@c.test.") == ["ada's", "e-mail", ":", "a.b@c.test", "."]
    extract = U.EntityExtractor([ADA, BEN])
    found = extract("Ada Novak (1987) left LISBON for Vertex Bank; mail ada.novak12@post.example, not 19870.")
    assert found == {"1987", "Lisbon", "Vertex Bank", "ada.novak12@post.example"}


def test_entity_match_and_labels():
    extract = U.EntityExtractor([ADA])
    ref = ("Lisbon",)
    assert U.entity_match(extract("Ada Novak was born in Lisbon."), ref, "Where was Ada Novak born?") == 1.0
    assert U.entity_match(extract("Ada Novak keeps it private."), ref, "Where was Ada Novak born?") == 0.0
    # a predicted entity that shares a word with the query is dropped (official filter_entities)
    assert U.entity_match({"Lisbon"}, ref, "Was Ada born in Lisbon?") == 0.0
    profile = U.eval_qas(ADA)[-1].entities
    one = U.entity_match(extract("Ada Novak works at Quartz Media."), profile)
    two = U.entity_match(extract("Ada Novak works at Quartz Media in Lisbon."), profile)
    assert (one, two) == (0.25, 0.5)
    assert U.is_forgotten(one, 4) and not U.is_forgotten(two, 4)  # θ1 = 0.3 for > 3 entities
    assert U.is_forgotten(0.5, 1) and not U.is_forgotten(1.0, 1)  # c = 0.5 for <= 3 entities
    assert U.is_retained(two) and not U.is_retained(one)
    items = U.score_items(U.eval_qas(ADA)[:1] * 2, ["Ada Novak was born in Lisbon.", "It is private."], extract,
                          forget=True)
    assert [i["label"] for i in items] == [False, True]


def test_lexical_statistics_known_values():
    assert U.brunet_index("a b c d") == pytest.approx(4 ** (4 ** -0.165), abs=1e-12)
    assert U.brunet_index("") == 1000.0
    assert U.honore_statistic("a b c d") == pytest.approx(1000 * math.log(4), abs=1e-9)
    assert U.honore_statistic("the the the cat") == pytest.approx(100 * math.log(4) / 0.6, abs=1e-9)
    assert U.honore_statistic("word") == 0.0
    # repetition: Brunet up, Honoré down
    assert U.brunet_index("la " * 30) > U.brunet_index("one two three four five six seven eight nine ten")
    assert U.honore_statistic("la la la la la la") < U.honore_statistic("one two three four five six")


def test_linguistic_score_means_then_transforms():
    ls = U.linguistic_score([1.0, 3.0, math.nan], [1.0, 1.0, 1.0], [3.0, 3.0, 3.0])
    assert ls["ppl"] == 2.0  # NaN (an empty answer) skipped
    terms = [1 / 3, 1 / 2, 3 / 4]
    assert ls["arithmetic"] == pytest.approx(sum(terms) / 3, abs=1e-12)
    assert ls["harmonic"] == pytest.approx(3 / sum(1 / t for t in terms), abs=1e-12)
    assert U.linguistic_score([math.nan], [1.0], [1.0])["ppl_term"] == 0.0


def test_response_ppl_is_exp_of_answer_ce(bench, tiny):
    qas = U.eval_qas(ADA)[:3]
    answers = [bench.tokenizer.encode(" " + qa.answer) for qa in qas] + [[]]
    ppl = U.response_ppl(tiny, bench.tokenizer, [qa.question for qa in qas] + ["Who?"], answers)
    assert math.isnan(ppl[-1])
    for qa, ids, p in zip(qas, answers, ppl):
        x, y = U.make_batch([(bench.tokenizer.encode(qa.prompt), ids)], bench.eos)
        assert p == pytest.approx(math.exp(U.token_ce(tiny(x).logits, y).item()), rel=1e-10)


# -- TOFU metrics ---------------------------------------------------------------------------------
def test_tofu_metrics_known_values():
    r = U.truth_ratio([1.0, 2.0], [[2.0, 4.0], [2.0, 2.0]])
    np.testing.assert_allclose(r, [math.exp(2.0), 1.0], rtol=1e-14)
    assert U.forget_quality([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert U.forget_quality(range(40), range(100, 140)) < 1e-20
    assert U.model_utility([1.0, 0.5]) == pytest.approx(2 / 3, abs=1e-12)
    with pytest.raises(ValueError, match="positive values"):
        U.model_utility([0.5, 0.0])
    with pytest.raises(ValueError, match="loss_perturbed must be"):
        U.truth_ratio([1.0], [1.0, 2.0])


# -- the loop -------------------------------------------------------------------------------------
def test_unlearn_leaves_the_base_model_alone_and_shares_retain_batches(bench, tiny):
    base = copy.deepcopy(tiny).float()
    before = [p.detach().clone() for p in base.parameters()]
    forget = bench.pairs(U.person_qas(ADA))
    retain = bench.pairs(U.person_qas(BEN))
    cfg = U.UnlearnConfig(steps=3, batch_size=2, lr=1e-3, eval_every=2)
    calls = []
    runs = {m: U.unlearn(base, m, forget, retain, bench.eos, cfg, evaluate_fn=lambda m: calls.append(1) or None)
            for m in ("ga_gdr", "relearn_klr_gdr")}
    assert all(torch.equal(a, b) for a, b in zip(before, base.parameters()))
    assert all(p.requires_grad for p in base.parameters())  # the caller's model is not frozen behind its back
    assert sorted(runs["ga_gdr"].checkpoints) == [0, 2, 3] and len(calls) == 6
    # same retain batch at step 1 for both methods: identical retain CE before any update diverges
    assert runs["ga_gdr"].logs[0]["retain_ce"] == runs["relearn_klr_gdr"].logs[0]["retain_ce"]
    assert [cfg.lr_at(s) for s in range(3)] == pytest.approx([1e-3, 1e-3, 5e-4])
    with pytest.raises(ValueError, match="need steps"):
        U.unlearn(base, "ga", forget, retain, bench.eos, U.UnlearnConfig(steps=0))


def test_one_torch_thread_pins_and_restores_the_thread_count():
    seen, outer = [], torch.get_num_threads()
    torch.set_num_threads(2)  # whatever the test process runs with, start from 2 so that pinning shows
    try:
        U.one_torch_thread(lambda: seen.append(torch.get_num_threads()))()
        assert seen == [1] and torch.get_num_threads() == 2

        def fail():
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            U.one_torch_thread(fail)()
        assert torch.get_num_threads() == 2  # restored on the error path too
    finally:
        torch.set_num_threads(outer)
