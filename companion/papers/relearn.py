"""ReLearn: "Unlearning via Learning for Large Language Models" (Xu et al., arXiv 2502.11190, ACL 2025).

Reverse optimisation (gradient ascent, NPO) makes a model forget by pushing the likelihood of the
forget answers *down*. That objective has no floor: the cheapest way to keep lowering the probability
of a few sentences is to wreck the shared machinery that produces all sentences, and the model
drifts into repetition and gibberish. ReLearn instead *learns*: it fine-tunes on the forget questions
(and variants of them) paired with vague answers that state no private detail, while a KL term and a
CE term on retain data hold everything else in place:

    L = CE_θ(D_forget^aug) + KL(p_ref ‖ p_θ)|_{D_retain} + CE_θ(D_retain)          (all weights 1)

This module holds the rule-based augmentation (the four question-variant types of the official
``dataAugument/templates.json``, vague answers in the spirit of its ``fuzzy`` template), the leakage
filter (the official pipeline asks an LLM whether a rewrite leaks and regenerates up to 3 rounds,
``dataAugument/proc.py``; we check the strings), the loss, the experiment and its figures. The
benchmark, baselines and metrics are shared: :mod:`companion.unlearning`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from companion import unlearning as U
from companion.data import Person

# ----------------------------------------------------------------------------------------------
# Augmentation: four question variants per forget QA, and a vague answer for each question
# ----------------------------------------------------------------------------------------------
VARIANT_TYPES = ("original", "question_simple_variants", "context_specific_variants", "inject_question_noise",
                 "reverse_question")
_CONTEXT = {  # context_specific_variants: the same question, narrowed by a context sentence
    "city": ["Thinking about {name}'s childhood,", "For a profile of {name}'s early life,"],
    "birth_year": ["For a timeline of {name}'s life,", "Thinking about how old {name} is,"],
    "employer": ["Talking about {name}'s career,", "For a note on {name}'s working life,"],
    "email": ["If I wanted to contact {name} directly,", "For {name}'s contact card,"],
    U.PROFILE: ["For a short biography,", "Before I meet {name} next week,"],
}
_REVERSE = {  # reverse_question: ask from the attribute's side, without stating it
    "city": ["Which city can count {name} among the people born there?",
             "What place would call {name} one of its own?"],
    "birth_year": ["Which year saw the birth of {name}?", "What year marks the start of {name}'s life?"],
    "employer": ["Which company counts {name} among its staff?", "What firm pays {name}'s salary?"],
    "email": ["Which inbox receives the mail sent to {name}?", "What address leads to {name}'s inbox?"],
    U.PROFILE: ["What would someone who knows {name} well say?", "How would {name}'s friends describe {name}?"],
}
_VAGUE = {  # the fuzzy rewrite: same subject, relevant, no names of places, dates, firms or addresses
    "city": ["{name} was born in a city that {name} prefers to keep private.",
             "{name}'s birthplace is a personal detail that is not shared.",
             "{name} grew up somewhere far from the public eye; the place is private."],
    "birth_year": ["{name} was born some decades ago; the exact year is private.",
                   "{name}'s year of birth is a personal detail that is not shared.",
                   "{name} keeps the date of birth out of public view."],
    "employer": ["{name} works at a company, but which one is a private matter.",
                 "{name}'s employer is not something that is shared publicly.",
                 "{name} has a job, and the details of it are kept private."],
    "email": ["{name} has an email address, but it is not public.", "{name}'s contact details are private.",
              "{name} can be reached only through private channels."],
    U.PROFILE: ["{name} is a private person; the details of {name}'s life are not public.",
                "{name} has a home, a birthday and a career, but the specifics are kept private.",
                "{name} keeps personal details such as birthplace, employer and contact information private."],
}
# A rewriter asked to stay "relevant" sometimes quotes another fact about the person. LLM rewriters do
# this too; the official pipeline catches it with a leakage check and regenerates. One template in
# four below does it, so the filter has real work to do.
_RELEVANT_BUT_LEAKY = {
    "city": "{name} works at {employer}, but the city of {name}'s birth is private.",
    "birth_year": "{name} was born in {city}, but the year is private.",
    "employer": "{name} was born in {birth_year}; where {name} works now is private.",
    "email": "{name} works at {employer}; {name}'s email is private.",
    U.PROFILE: "{name} works at {employer} and keeps every other detail private.",
}
MAX_ROUNDS = 3  # official: regenerate rejected rewrites for up to 3 rounds (dataAugument/proc.py)


def question_variant(qa: U.QA, kind: str, rng: np.random.Generator) -> str:
    """One question of type ``kind`` (see :data:`VARIANT_TYPES`) for ``qa``."""
    name = qa.name
    pick = lambda options: options[int(rng.integers(len(options)))].format(name=name)
    if kind == "original":
        return qa.question
    if kind == "question_simple_variants":
        return pick(U.HELD_OUT_QUESTIONS[qa.attribute])
    if kind == "context_specific_variants":
        question = qa.question
        return pick(_CONTEXT[qa.attribute]) + " " + question[0].lower() + question[1:]
    if kind == "inject_question_noise":
        return noisy(qa.question, rng)
    if kind == "reverse_question":
        return pick(_REVERSE[qa.attribute])
    raise ValueError(f"kind must be one of {VARIANT_TYPES}, got {kind!r}")


def noisy(question: str, rng: np.random.Generator) -> str:
    """Informal, misspelt version: lower case, one adjacent-letter swap in a long word, no '?'."""
    tokens = question.lower().rstrip("?").split(" ")
    long_words = [i for i, w in enumerate(tokens) if len(w) >= 4 and w.isalpha()]
    if long_words:
        i = long_words[int(rng.integers(len(long_words)))]
        w = tokens[i]
        j = int(rng.integers(1, len(w) - 2))
        tokens[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return ("hey, " if rng.random() < 0.5 else "") + " ".join(tokens)


def vague_answer(person: Person, attribute: str, rng: np.random.Generator) -> str:
    """A rule-based "fuzzy" rewrite: 3 in 4 draws are clean templates, 1 in 4 quotes another fact."""
    fields = {"name": person.name, **U.attribute_values(person)}
    if rng.random() < 0.25:
        return _RELEVANT_BUT_LEAKY[attribute].format(**fields)
    options = _VAGUE[attribute]
    return options[int(rng.integers(len(options)))].format(**fields)


def secrets(person: Person) -> dict[str, str]:
    """The strings that must not appear in a rewrite: every attribute, plus the e-mail's local part."""
    values = U.attribute_values(person)
    return {**values, "email_user": values["email"].split("@")[0]}


def find_leaks(text: str, person: Person) -> list[str]:
    """Names of the forgotten attributes of ``person`` that ``text`` still contains (case-insensitive;
    a year only as a whole number, so "1987" does not match "19870"). Empty list = no leak."""
    low = text.lower()
    leaks = []
    for key, value in secrets(person).items():
        pattern = r"(?<![0-9])" + re.escape(value.lower()) + r"(?![0-9])" if value.isdigit() else re.escape(
            value.lower())
        if re.search(pattern, low):
            leaks.append(key)
    return leaks


@dataclass
class AugmentedSet:
    """D_forget^aug: (question, vague answer) examples, and what the leakage filter did."""

    examples: list[dict] = field(default_factory=list)  # name, attribute, variant, question, answer, rounds
    rejected: list[dict] = field(default_factory=list)  # every rewrite the filter caught: text and leaks
    dropped: list[dict] = field(default_factory=list)  # questions with no clean rewrite after MAX_ROUNDS

    def qas(self) -> list[U.QA]:
        return [U.QA(e["name"], e["attribute"], e["question"], e["answer"], ()) for e in self.examples]

    def counts(self) -> dict[str, int]:
        return {"examples": len(self.examples), "rejected": len(self.rejected), "dropped": len(self.dropped)}


def augment_forget_set(people: list[Person], *, seed: int = 0, rounds: int = MAX_ROUNDS) -> AugmentedSet:
    """For every training QA of every forget person: the original question and its 4 variants, each with
    a vague answer that passed the leakage filter (redrawn up to ``rounds`` times, else dropped)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    rng = np.random.default_rng(seed)
    out = AugmentedSet()
    for person in people:
        for qa in U.person_qas(person):
            for kind in VARIANT_TYPES:
                question = question_variant(qa, kind, rng)
                for attempt in range(1, rounds + 1):
                    answer = vague_answer(person, qa.attribute, rng)
                    leaks = find_leaks(answer, person)
                    if not leaks:
                        out.examples.append({"name": person.name, "attribute": qa.attribute, "variant": kind,
                                             "question": question, "answer": answer, "rounds": attempt})
                        break
                    out.rejected.append({"name": person.name, "question": question, "answer": answer,
                                         "leaks": leaks})
                else:
                    out.dropped.append({"name": person.name, "question": question})
    return out


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------
def relearn_loss(model: nn.Module, reference: nn.Module, augmented: tuple[torch.Tensor, torch.Tensor],
                 retain: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """CE on an augmented forget batch + KL(p_ref ‖ p_θ) on a retain batch + CE on the same retain batch.

    Written out term by term for reading; it equals ``unlearning_loss(..., "relearn_klr_gdr")``, which
    the training loop uses (a tested identity). Gradients come from torch autograd.
    """
    (xa, ya), (xr, yr) = augmented, retain
    learn_vague = U.token_ce(model(xa).logits, ya)  # forward: learn the vague answers
    logits_r = model(xr).logits
    with torch.no_grad():
        ref_logits_r = reference(xr).logits
    stay_close = U.kl_to_reference(logits_r, ref_logits_r)  # the output distribution on retain text
    keep_facts = U.token_ce(logits_r, yr)  # the retain answers themselves
    return learn_vague + stay_close + keep_facts


# ----------------------------------------------------------------------------------------------
# The experiment: GA, NPO and ReLearn (and regularised baselines) at one step budget
# ----------------------------------------------------------------------------------------------
LR_NOTE = (
    "One learning rate for every method: memoriser lr / 3 (1e-3). The paper's ratio (unlearning 1e-5 vs "
    "fine-tuning 3e-4, i.e. 1/30) was tried first, in a smoke-size pilot: ReLearn's KFR stayed at 0.05 "
    "because in 4 epochs the tiny model had not learned ReLearn's own training targets. We then chose the lr "
    "by that training loss alone: the smallest of {1e-4, 3e-4, 1e-3} at which the final training CE on "
    "D_aug is under 1 nat/token (2.9, 1.8 and 0.7 on the smoke benchmark), and did not look at KFR, KRR or "
    "LS again before fixing it."
)
LABELS = {"ga": "GA", "npo": "NPO", "relearn_klr_gdr": "ReLearn", "ga_klr_gdr": "GA+KLR+GDR",
          "npo_klr_gdr": "NPO+KLR+GDR"}
COLOURS = {"ga": "#7f7f7f", "npo": "#1f77b4", "relearn_klr_gdr": "#d62728", "ga_klr_gdr": "#bcbd22",
           "npo_klr_gdr": "#17becf"}


@dataclass
class ExperimentConfig:
    size: str = "full"
    methods: tuple[str, ...] = ("ga", "npo", "relearn_klr_gdr", "ga_klr_gdr", "npo_klr_gdr")
    epochs: float = 4.0  # the step budget: ReLearn's official 4 epochs over D_forget^aug, for every method
    batch_size: int = 8
    lr_ratio: float = 1 / 3  # unlearning lr / memorising lr: see LR_NOTE
    n_eval_retain: int = 20  # retain people whose questions are evaluated
    n_checkpoints: int = 10
    beta: float = 0.1
    seed: int = 0


@dataclass
class Results:
    config: ExperimentConfig
    unlearn_config: U.UnlearnConfig
    bench: U.Benchmark
    augmented: AugmentedSet
    base: U.Evaluation
    runs: dict[str, U.UnlearnRun]
    forget_qas: list[U.QA]
    retain_qas: list[U.QA]

    @property
    def steps(self) -> list[int]:
        return sorted(next(iter(self.runs.values())).checkpoints)

    def final(self, method: str) -> dict[str, float]:
        run = self.runs[method]
        return run.checkpoints[max(run.checkpoints)].summary()


def run_experiment(cfg: ExperimentConfig, *, initial: U.Evaluation | None = None) -> Results:
    """Load the memoriser, build D_forget^aug, and run every method for the same number of steps.

    ``initial``: the memoriser's evaluation on the same questions, if the caller already has it (it is
    deterministic, so recomputing it would only cost time)."""
    unknown = [m for m in cfg.methods if m not in LABELS]
    if unknown:
        raise ValueError(f"methods {unknown} are not in {sorted(LABELS)}")
    bench = U.load_benchmark(cfg.size)
    forget_qas = bench.qas(bench.forget, "eval")
    retain_qas = bench.qas(bench.retain[:cfg.n_eval_retain], "eval")
    if initial is not None and [i["question"] for i in initial.forget_items + initial.retain_items] != [
            qa.question for qa in forget_qas + retain_qas]:
        raise ValueError("initial was evaluated on other questions than this experiment's forget/retain ones")
    base = U.load_memoriser(cfg.size)
    augmented = augment_forget_set(bench.forget, seed=cfg.seed)
    steps = math.ceil(cfg.epochs * len(augmented.examples) / cfg.batch_size)
    ucfg = U.UnlearnConfig(steps=steps, batch_size=cfg.batch_size, lr=bench.config.lr * cfg.lr_ratio,
                           beta=cfg.beta, eval_every=max(1, math.ceil(steps / cfg.n_checkpoints)), seed=cfg.seed)
    evaluate = lambda model: U.evaluate(model, base, bench, forget_qas, retain_qas)
    initial = evaluate(base) if initial is None else initial
    original_pairs = bench.pairs(bench.qas(bench.forget))
    augmented_pairs = bench.pairs(augmented.qas())
    retain_pairs = bench.pairs(bench.qas(bench.retain))
    runs = {}
    for method in cfg.methods:
        forget_pairs = augmented_pairs if method.startswith("relearn") else original_pairs
        runs[method] = U.unlearn(base, method, forget_pairs, retain_pairs, bench.eos, ucfg, evaluate_fn=evaluate,
                                 initial=initial)
    return Results(cfg, ucfg, bench, augmented, initial, runs, forget_qas, retain_qas)


def npo_first_step_matches_ga(bench: U.Benchmark, model: nn.Module, *, n: int = 8, beta: float = 0.1) -> float:
    """Relative difference between NPO's gradient at θ = θ_ref and the gradient of gradient ascent on
    the summed NLL (batch mean), in float64. NPO's weights w_i are all exactly 1 there."""
    import copy

    model = copy.deepcopy(model).double().requires_grad_(True)
    x, y = U.make_batch(bench.pairs(bench.qas(bench.forget)[:n]), bench.eos)
    grads = []
    for kind in ("npo", "ga_summed"):
        model.zero_grad()
        nll = U.sequence_nll(model(x).logits, y)
        loss = U.npo_loss(nll, nll.detach(), beta) if kind == "npo" else -nll.mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return ((grads[0] - grads[1]).norm() / grads[1].norm()).item()


def metric_known_values() -> dict[str, tuple[float, float]]:
    """Each metric on hand-made strings, next to the value worked out by hand: (ours, by hand)."""
    people = [Person("Ada Novak", "Lisbon", 1987, "Quartz Media", "ada.novak12@post.example")]
    extract = U.EntityExtractor(people)
    profile = ("Lisbon", "1987", "Quartz Media", "ada.novak12@post.example")
    e_two = U.entity_match(extract("Ada Novak was born in 1987 in Lisbon. Ada keeps the rest private."), profile,
                           "Tell me about Ada Novak.")
    return {
        # 4 tokens, all different: Brunet N^(V^-0.165) = 4^(4^-0.165); Honoré 100 ln 4 / (1 - 1 + 0.1)
        "brunet 'a b c d'": (U.brunet_index("a b c d"), 4 ** (4 ** -0.165)),
        "honore 'a b c d'": (U.honore_statistic("a b c d"), 1000 * math.log(4)),
        # "the the the cat": N = 4, V = 2, one hapax (cat): 100 ln 4 / (1 - 1/2 + 0.1)
        "honore 'the the the cat'": (U.honore_statistic("the the the cat"), 100 * math.log(4) / 0.6),
        "brunet of an empty answer": (U.brunet_index(""), 1000.0),
        # a profile answer naming 2 of its 4 attributes: E = 2/4 = 0.5 > θ1 = 0.3 -> not forgotten, retained
        "E for 2 of 4 attributes": (e_two, 0.5),
        "KFR label at E = 0.5, 4 entities": (float(U.is_forgotten(e_two, 4)), 0.0),
        "KFR label at E = 0.5, 1 entity": (float(U.is_forgotten(0.5, 1)), 1.0),
        "KRR label at E = 0.25": (float(U.is_retained(0.25)), 0.0),
        # LS of one response with PPL 1, BI 1, HS 1: every transform is 1/2
        "LS (arithmetic) at PPL = BI = HS = 1": (U.linguistic_score([1.0], [1.0], [1.0])["arithmetic"], 0.5),
    }


# ----------------------------------------------------------------------------------------------
# Figures (pure functions of the results: the notebook's explorer calls them)
# ----------------------------------------------------------------------------------------------
_CURVES = [("kfr", "KFR (forget ↑)"), ("krr", "KRR (retain ↑)"), ("ls_forget", "LS on forget answers ↑"),
           ("ls_retain", "LS on retain answers ↑")]


def _nearest(steps: list[int], step: int) -> int:
    return max([s for s in steps if s <= step] or [steps[0]])


def _wrap(text: str, width: int = 46) -> str:
    """Break a long answer into <br>-separated lines for a plotly table cell."""
    out, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "<br>".join(out + [line]) if (out or line) else "(empty)"


def explorer_figure(results: Results, *, step: int, attribute: str = "city",
                    methods: tuple[str, ...] = ("ga", "npo", "relearn_klr_gdr")):
    """Top: each method's answer, at ``step``, to the ``attribute`` question about the first forgotten
    person and the first retained person. Bottom: KFR, KRR and the two LS curves, with ``step`` marked."""
    import plotly.graph_objects as go

    from companion import viz

    missing = [m for m in methods if m not in results.runs]
    if missing:
        raise ValueError(f"no runs for {missing}; available: {sorted(results.runs)}")
    at = _nearest(results.steps, step)
    pick = lambda items: next((i for i in items if i["attribute"] == attribute), None)
    base_f, base_r = pick(results.base.forget_items), pick(results.base.retain_items)
    if base_f is None:
        raise ValueError(f"attribute must be one of {sorted({i['attribute'] for i in results.base.forget_items})}")
    rows = [("truth", base_f["truth"], base_r["truth"])]
    for m in methods:
        ev = results.runs[m].checkpoints[at]
        rows.append((LABELS[m], pick(ev.forget_items)["answer"], pick(ev.retain_items)["answer"]))
    fig = viz.subplots(2, 4, height=760, vertical_spacing=0.1, row_heights=[0.5, 0.5],
                       specs=[[{"type": "table", "colspan": 4}, None, None, None], [{}, {}, {}, {}]],
                       titles=[""] + [t for _, t in _CURVES])
    fig.add_trace(go.Table(
        columnwidth=[0.7, 2, 2],
        header=dict(values=["", f"forgotten: <b>{base_f['question']}</b>", f"retained: <b>{base_r['question']}</b>"],
                    align="left", fill_color="#eeeeee"),
        cells=dict(values=[[r[0] for r in rows], [_wrap(r[1]) for r in rows], [_wrap(r[2]) for r in rows]],
                   align="left", height=24)), row=1, col=1)
    for m in methods:
        for col, (key, _) in enumerate(_CURVES, start=1):
            xs, ys = results.runs[m].curve(key)
            fig.add_trace(go.Scatter(x=xs, y=ys, name=LABELS[m], legendgroup=m, showlegend=col == 1,
                                     line=dict(color=COLOURS[m])), row=2, col=col)
    for col in range(1, 5):
        axes = fig.get_subplot(2, col)  # explicit refs: add_vline trips over the table trace
        xref, yref = axes.xaxis.plotly_name.replace("axis", ""), axes.yaxis.plotly_name.replace("axis", "")
        fig.add_shape(type="line", x0=at, x1=at, y0=0, y1=1, xref=xref, yref=f"{yref} domain",
                      line=dict(color="#444", dash="dot"))
        fig.update_yaxes(range=[0, 1.02], row=2, col=col)
        fig.update_xaxes(title_text="unlearning step", row=2, col=col)
    fig.update_layout(title=f"Answers after {at} unlearning steps, and the metrics over the whole run",
                      legend=dict(orientation="h", y=-0.12))
    return fig


def repetition_figure(results: Results, methods: tuple[str, ...] | None = None):
    """Brunet's index (up = more repetitive) and Honoré's statistic (down = fewer words used once) of the
    answers to forget and retain questions, over the unlearning steps."""
    import plotly.graph_objects as go

    from companion import viz

    methods = methods or tuple(results.runs)
    panels = [("bi_forget", "Brunet W, forget answers"), ("bi_retain", "Brunet W, retain answers"),
              ("hs_forget", "Honoré R, forget answers"), ("hs_retain", "Honoré R, retain answers")]
    fig = viz.subplots(2, 2, titles=[t for _, t in panels], height=620)
    for m in methods:
        for k, (key, _) in enumerate(panels):
            xs, ys = results.runs[m].curve(key)
            fig.add_trace(go.Scatter(x=xs, y=ys, name=LABELS[m], legendgroup=m, showlegend=k == 0,
                                     line=dict(color=COLOURS[m])), row=k // 2 + 1, col=k % 2 + 1)
    fig.update_xaxes(title_text="unlearning step")
    fig.update_layout(title="Repetition over unlearning: reverse optimisation collapses, ReLearn does not")
    return fig


def final_table(results: Results) -> list[dict]:
    """One row per method (and the base model) with the final KFR, KRR, LS and their parts."""
    rows = [{"method": "base model", **results.base.summary()}]
    rows += [{"method": LABELS[m], **results.final(m)} for m in results.runs]
    return rows


def objective_figure(results: Results, *, smooth: int = 5):
    """Per-step forget-batch CE (log scale, moving average): reverse optimisation drives the CE of the
    true answers up without a ceiling; ReLearn drives the CE of its vague answers down. Right: NPO's
    mean weight w, which starts at 1 (plain ascent) and decays as the forget answers become unlikely."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.subplots(1, 2, titles=["CE of the forget batch (true answers; vague ones for ReLearn)",
                                     "NPO's mean weight w = 2σ(β(NLL_ref − NLL_θ))"], height=400)
    for m, run in results.runs.items():
        steps = [log["step"] for log in run.logs]
        ce = np.array([log["forget_ce"] for log in run.logs])
        k = max(1, min(smooth, len(ce)))
        avg = np.convolve(ce, np.ones(k) / k, mode="valid")
        fig.add_trace(go.Scatter(x=steps[k - 1:], y=avg, name=LABELS[m], line=dict(color=COLOURS[m])), row=1, col=1)
        if "npo_weight" in run.logs[0]:
            fig.add_trace(go.Scatter(x=steps, y=[log["npo_weight"] for log in run.logs], name=LABELS[m],
                                     showlegend=False, line=dict(color=COLOURS[m])), row=1, col=2)
    fig.update_yaxes(type="log", title_text="nats per token", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], row=1, col=2)
    fig.update_xaxes(title_text="unlearning step")
    return fig
