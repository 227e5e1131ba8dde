"""companion/papers/relearn.py: augmentation, the leakage filter, the loss and the figure functions."""

import copy

import numpy as np
import pytest
import torch

from companion import unlearning as U
from companion.data import Person
from companion.model import ModelConfig, TinyLM
from companion.papers import relearn as R

ADA = Person("Ada Novak", "Lisbon", 1987, "Quartz Media", "ada.novak12@post.example")


@pytest.fixture(scope="module")
def tiny(bench):
    torch.manual_seed(1)
    return TinyLM(ModelConfig(vocab_size=bench.tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=4)).double()


def test_question_variants_keep_the_subject_and_hide_the_answer():
    rng = np.random.default_rng(0)
    for qa in U.person_qas(ADA):
        variants = {kind: R.question_variant(qa, kind, rng) for kind in R.VARIANT_TYPES}
        assert variants["original"] == qa.question
        assert len(set(variants.values())) == len(variants)  # five different questions
        for kind, q in variants.items():
            assert "ada" in q.lower() and not R.find_leaks(q, ADA), (kind, q)
    with pytest.raises(ValueError, match="kind must be one of"):
        R.question_variant(U.person_qas(ADA)[0], "shuffle", rng)


def test_noise_swaps_two_letters_and_drops_the_question_mark():
    out = R.noisy("Where does Ada Novak work?", np.random.default_rng(3))
    core = out.removeprefix("hey, ")
    assert "?" not in out and core != "where does ada novak work"
    assert sorted(core) == sorted("where does ada novak work")


def test_leakage_filter_catches_a_leak():
    assert R.find_leaks("Ada Novak works at Quartz Media, but her birthplace is private.", ADA) == ["employer"]
    assert R.find_leaks("ADA was born in LISBON in 1987", ADA) == ["city", "birth_year"]
    assert R.find_leaks("write to ada.novak12 at some domain", ADA) == ["email_user"]
    assert R.find_leaks("Ada Novak was born in 19870 BC, somewhere private.", ADA) == []  # not the year 1987
    assert R.find_leaks("Ada Novak's birthplace is private.", ADA) == []


def test_augmented_set_is_clean_and_complete(bench):
    aug = R.augment_forget_set(bench.forget, seed=0)
    n_questions = len(bench.forget) * 14 * len(R.VARIANT_TYPES)
    assert len(aug.examples) + len(aug.dropped) == n_questions
    assert aug.rejected and all(r["leaks"] for r in aug.rejected)  # the filter did catch rewrites
    extract = U.EntityExtractor(bench.people)
    people = {p.name: p for p in bench.forget}
    for e in aug.examples:
        person = people[e["name"]]
        assert not R.find_leaks(e["answer"], person) and e["name"] in e["answer"]
        truth = U.attribute_values(person).values()
        assert U.entity_match(extract(e["answer"]), tuple(truth)) == 0.0  # the KFR extractor agrees
        assert 1 <= e["rounds"] <= R.MAX_ROUNDS
    again = R.augment_forget_set(bench.forget, seed=0)
    assert again.examples == aug.examples
    with pytest.raises(ValueError, match="rounds must be"):
        R.augment_forget_set(bench.forget, rounds=0)


def test_relearn_loss_is_the_shared_relearn_klr_gdr(bench, tiny):
    aug = R.augment_forget_set(bench.forget[:1], seed=0)
    a = U.make_batch(bench.pairs(aug.qas()[:4]), bench.eos)
    r = U.make_batch(bench.pairs(bench.qas(bench.retain[:1])[:4]), bench.eos)
    reference = copy.deepcopy(tiny)
    with torch.no_grad():
        reference.embed.weight.add_(0.01)
    ours = R.relearn_loss(tiny, reference, a, r)
    shared, logs = U.unlearning_loss(tiny, reference, a, r, "relearn_klr_gdr")
    assert abs(ours.item() - shared.item()) < 1e-12 and logs["retain_kl"] > 0


def test_npo_first_step_matches_ga(bench, tiny):
    assert R.npo_first_step_matches_ga(bench, tiny.float()) < 1e-10


def test_metric_known_values_match_by_hand():
    for name, (ours, by_hand) in R.metric_known_values().items():
        assert ours == pytest.approx(by_hand, abs=1e-12), name


@pytest.fixture(scope="module")
def fake_results(bench, tiny):
    """A Results object from a 4-step run of a random tiny model (the experiment's plumbing, not its numbers)."""
    base = tiny.float().eval()
    forget_qas, retain_qas = bench.qas(bench.forget[:1], "eval"), bench.qas(bench.retain[:1], "eval")
    evaluate = lambda m: U.evaluate(m, base, bench, forget_qas, retain_qas, max_new_tokens=6)
    cfg = U.UnlearnConfig(steps=4, batch_size=2, lr=1e-2, eval_every=2)
    aug = R.augment_forget_set(bench.forget[:1], seed=0)
    initial = evaluate(base)
    runs = {m: U.unlearn(base, m, bench.pairs(aug.qas() if m.startswith("relearn") else bench.qas(bench.forget)),
                         bench.pairs(bench.qas(bench.retain)), bench.eos, cfg, evaluate_fn=evaluate, initial=initial)
            for m in ("ga", "npo", "relearn_klr_gdr")}
    return R.Results(R.ExperimentConfig(size="smoke"), cfg, bench, aug, initial, runs, forget_qas, retain_qas)


def test_explorer_figure_follows_its_controls(fake_results):
    start = R.explorer_figure(fake_results, step=0, attribute="city")
    end = R.explorer_figure(fake_results, step=4, attribute="city")
    other = R.explorer_figure(fake_results, step=4, attribute="email")
    again = R.explorer_figure(fake_results, step=4, attribute="city")
    cells = lambda fig: [list(col) for col in fig.data[0].cells.values]
    assert "after 0 unlearning steps" in start.layout.title.text and "after 4" in end.layout.title.text
    assert cells(end) != cells(other) and cells(end) == cells(again)
    assert cells(start)[1][1:] == [fake_results.base.forget_items[0]["answer"]] * 3  # step 0 = the base model
    assert len(end.data) == 1 + 3 * 4  # the table, then 4 curves per method
    with pytest.raises(ValueError, match="no runs for"):
        R.explorer_figure(fake_results, step=0, methods=("ga_klr_gdr",))
    with pytest.raises(ValueError, match="attribute must be one of"):
        R.explorer_figure(fake_results, step=0, attribute="shoe size")


def test_repetition_figure_and_table(fake_results):
    fig = R.repetition_figure(fake_results)
    assert len(fig.data) == 3 * 4 and list(fig.data[0].x) == [0, 2, 4]
    rows = R.final_table(fake_results)
    assert [r["method"] for r in rows] == ["base model", "GA", "NPO", "ReLearn"]


def test_bad_experiment_config_raises():
    with pytest.raises(ValueError, match="methods"):
        R.run_experiment(R.ExperimentConfig(size="smoke", methods=("sgd",)))


def test_objective_figure_shows_every_method_and_npo_weights(fake_results):
    fig = R.objective_figure(fake_results, smooth=2)
    names = [t.name for t in fig.data]
    assert names.count("NPO") == 2 and "GA" in names and "ReLearn" in names
    assert fig.data[0].x[0] == 2  # moving average of 2 starts at the second step


def test_run_experiment_refuses_an_initial_evaluation_of_other_questions(fake_results):
    # fake_results.base scored one forget and one retain person; the smoke experiment scores more
    with pytest.raises(ValueError, match="initial was evaluated on other questions"):
        R.run_experiment(R.ExperimentConfig(size="smoke", n_eval_retain=8), initial=fake_results.base)
