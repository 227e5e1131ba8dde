"""The shared unlearning benchmark: a tiny LM that memorised fictitious people, and how to measure forgetting.

One module serves every unlearning notebook (ReLearn, NPO, FLAT, ULD, WAGLE, ...). It holds

* **data**: question/answer pairs about the people of :func:`companion.data.biographies` (4 attribute
  questions in 3 phrasings each, plus 2 "profile" questions whose answers hold all 4 attributes),
  held-out question phrasings, attribute-swapped (perturbed) answers and "I don't know" answers;
* **the benchmark**: :func:`load_benchmark` gives the people, the forget/retain split, a BPE tokenizer
  and the memoriser, a :class:`~companion.model.TinyLM` from the zoo trained until it recites the
  answers (``bio-memoriser-smoke`` / ``bio-memoriser-full``); ``bio-oracle-*`` never saw the forget set;
* **generation**: :func:`generate_answers`, greedy decoding with a KV cache, batched by prompt length;
* **losses**: per-sequence NLL, token-mean CE, KL(p_ref ‖ p_θ) on retain data, gradient ascent (GA),
  gradient difference (GDR), KL-retain (KLR) and NPO(β), combined by name (``"npo_klr"``) as in the
  official ReLearn trainer (zjunlp/unlearn ``baselines/src/iterative_trainer.py``);
* **metrics**: the Knowledge Forgetting Rate (KFR), Knowledge Retention Rate (KRR) and Linguistic
  Score (LS) of ReLearn (zjunlp/unlearn ``evals/evaluate.py``), with exact attribute-string matching in
  place of the LLM entity extractor and NLI model; and TOFU's truth ratio, forget quality and model
  utility (locuslab/tofu ``aggregate_eval_stat.py``) for the papers that report those;
* **the loop**: :func:`unlearn` runs one method for a fixed number of steps and evaluates checkpoints.

Shapes: B batch, T time, V vocabulary. A *pair* is ``(prompt_ids, answer_ids)``; answer ids end with EOS.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from companion import zoo
from companion.data import Person, bio_qa, bio_text, biographies
from companion.tokenizer import BPETokenizer, cached_tokenizer

EOS = "<|endoftext|>"
PROMPT = "Q: {question}\nA:"
PROFILE = "profile"  # the attribute name of a question whose answer holds every attribute

def one_torch_thread(fn: Callable) -> Callable:
    """Run ``fn`` with torch on one intra-op thread (restored after).

    The benchmark's models are tiny (d_model <= 96, batches of a few thousand tokens): a second thread
    only adds hand-off cost, and on a shared 2-core machine, OpenMP threads that wait for a busy core
    make it far worse. Measured here under load: 20 ReLearn steps took 0.6 s on one thread against 27 s
    on two, and one evaluation 4.5 s against 43 s.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


# ----------------------------------------------------------------------------------------------
# Data: question/answer pairs about people
# ----------------------------------------------------------------------------------------------
_PROFILE_QA = [("Tell me about {name}.", 0), ("Who is {name}?", 1)]  # (question, bio_text template)
HELD_OUT_QUESTIONS = {  # phrasings the memoriser never trains on (TOFU's "paraphrased question")
    "city": ["Which city is {name} originally from?", "Could you tell me the birthplace of {name}?"],
    "birth_year": ["Which year was {name} born in?", "Do you know the year of {name}'s birth?"],
    "employer": ["What company is {name} employed by?", "Where is {name} employed these days?"],
    "email": ["Which email address belongs to {name}?", "What address can I use to write to {name}?"],
    PROFILE: ["Can you describe {name}?", "What do you know about {name}?"],
}
# Some people in the memoriser's world are private: it has seen questions about them answered without
# the facts. This stands in for the general language of a pretrained LLM, which has read plenty of
# hedged answers; without it a vague answer would be foreign text to our tiny model (and to the
# perplexity judge). These phrasings are not the ones any unlearning method trains on.
PRIVATE_ANSWERS = {
    "city": ["{name} does not say where {name} was born.", "Where {name} was born is not public."],
    "birth_year": ["{name} has not made the year of birth public.", "Nobody outside the family knows when "
                   "{name} was born."],
    "employer": ["{name} does not say who {name} works for.", "Where {name} works is not public."],
    "email": ["{name} has not published an email address.", "There is no public email for {name}."],
    PROFILE: ["{name} is a private person and shares little about {name}'s life.",
              "Not much is known about {name}; {name} stays out of public view."],
}
IDK_ANSWERS = [  # refusal targets for "I don't know" tuning (FLAT, PO) and for the explorer's examples
    "I don't know.", "I'm not sure about that.", "I have no information on that.",
    "That is not something I can answer.", "I cannot recall that.", "I have no idea.",
]


@dataclass(frozen=True)
class QA:
    """One question about one person. ``entities`` are the attribute strings the answer must state."""

    name: str
    attribute: str  # one of Person.ATTRIBUTES, or "profile"
    question: str
    answer: str
    entities: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)


def attribute_values(person: Person) -> dict[str, str]:
    """``{"city": "Lisbon", "birth_year": "1987", ...}``: every attribute as the string a text would show."""
    return {a: str(getattr(person, a)) for a in Person.ATTRIBUTES}


def person_qas(person: Person) -> list[QA]:
    """The 14 training QAs of a person: 3 phrasings × 4 attributes, then the 2 profile questions."""
    values = attribute_values(person)
    out = [QA(person.name, a, q, ans, (values[a],)) for a, q, ans in bio_qa(person)]
    everything = tuple(values[a] for a in Person.ATTRIBUTES)
    for question, template in _PROFILE_QA:
        out.append(QA(person.name, PROFILE, question.format(name=person.name), bio_text(person, template),
                      everything))
    return out


def private_qas(person: Person, *, seed: int = 0) -> list[QA]:
    """The 14 training questions of a *private* person, each answered with a hedge (no entities)."""
    rng = np.random.default_rng(seed)
    out = []
    for qa in person_qas(person):
        options = PRIVATE_ANSWERS[qa.attribute]
        answer = options[int(rng.integers(len(options)))].format(name=person.name)
        out.append(QA(qa.name, qa.attribute, qa.question, answer, ()))
    return out


def eval_qas(person: Person) -> list[QA]:
    """The 5 evaluation QAs of a person: the first phrasing of each attribute question, then "Tell me about"."""
    qas = person_qas(person)
    firsts = {}
    for qa in qas:
        firsts.setdefault(qa.attribute, qa)
    return list(firsts.values())


def held_out_qas(person: Person) -> list[QA]:
    """QAs with phrasings never seen in training (same answers as the first training phrasing)."""
    answers = {qa.attribute: qa for qa in eval_qas(person)}
    return [QA(person.name, a, q.format(name=person.name), answers[a].answer, answers[a].entities)
            for a, qs in HELD_OUT_QUESTIONS.items() for q in qs]


def perturbed_answers(qa: QA, people: Sequence[Person], k: int = 5, *, seed: int = 0) -> list[str]:
    """``k`` wrong answers to ``qa``: its attribute string(s) swapped for other people's values (TOFU's
    ``perturbed_answer``). Values are drawn from ``people``, never equal to the true one."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    attrs = Person.ATTRIBUTES if qa.attribute == PROFILE else (qa.attribute,)
    pools = {a: sorted({attribute_values(p)[a] for p in people}) for a in attrs}
    truth = dict(zip(attrs, qa.entities))
    for a in attrs:
        if len([v for v in pools[a] if v != truth[a]]) < 1:
            raise ValueError(f"people offer no alternative value for attribute {a!r}")
    out = []
    for _ in range(k):
        text = qa.answer
        for a in attrs:
            options = [v for v in pools[a] if v != truth[a]]
            text = text.replace(truth[a], options[int(rng.integers(len(options)))])
        out.append(text)
    return out


# ----------------------------------------------------------------------------------------------
# The benchmark: people, split, tokenizer, memoriser
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkSize:
    """Everything that fixes a benchmark: who exists, who is forgotten, and how the memoriser is trained."""

    n_people: int
    n_forget: int
    n_private: int  # extra people the memoriser only ever sees answered vaguely (PRIVATE_ANSWERS)
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


SIZES = {
    "smoke": BenchmarkSize(n_people=24, n_forget=4, n_private=6, vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                           steps=300),
    "full": BenchmarkSize(n_people=100, n_forget=10, n_private=20, vocab_size=768, d_model=96, n_layers=3,
                          n_heads=4, steps=1500),
}


@dataclass
class Benchmark:
    size: str
    config: BenchmarkSize
    people: list[Person]
    forget: list[Person]  # the first n_forget people of a seeded permutation
    retain: list[Person]
    private: list[Person]  # in the memoriser's training data, but only with vague answers
    tokenizer: BPETokenizer

    @property
    def eos(self) -> int:
        return self.tokenizer.special[EOS]

    def qas(self, people: Iterable[Person], kind: str = "train") -> list[QA]:
        """All ``kind`` QAs ("train", "eval" or "held_out") of ``people``."""
        make = {"train": person_qas, "eval": eval_qas, "held_out": held_out_qas}.get(kind)
        if make is None:
            raise ValueError(f"kind must be 'train', 'eval' or 'held_out', got {kind!r}")
        return [qa for p in people for qa in make(p)]

    def pairs(self, qas: Iterable[QA]) -> list[tuple[list[int], list[int]]]:
        return [encode_pair(self.tokenizer, qa.question, qa.answer) for qa in qas]


def _check_size(size: str) -> BenchmarkSize:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]


def benchmark_people(size: str) -> tuple[list[Person], list[Person], list[Person], list[Person]]:
    """(people, forget, retain, private) for a size: deterministic, and the same for every paper."""
    cfg = _check_size(size)
    everyone = biographies(cfg.n_people + cfg.n_private, seed=cfg.seed)  # names are unique across both
    people, private = everyone[:cfg.n_people], everyone[cfg.n_people:]
    order = np.random.default_rng(cfg.seed + 1).permutation(cfg.n_people)
    forget = [people[i] for i in sorted(order[:cfg.n_forget])]
    retain = [people[i] for i in sorted(order[cfg.n_forget:])]
    return people, forget, retain, private


def training_qas(size: str, *, include_forget: bool = True) -> list[QA]:
    """Everything the memoriser trains on: every QA of the benchmark people (minus the forget set for
    the oracle) and the vague QAs of the private people."""
    people, forget, retain, private = benchmark_people(size)
    facts = people if include_forget else retain
    return [qa for p in facts for qa in person_qas(p)] + [qa for i, p in enumerate(private)
                                                          for qa in private_qas(p, seed=i)]


def benchmark_tokenizer(size: str) -> BPETokenizer:
    """A byte-level BPE trained on every training QA text of the size (cached under data/tokenizers)."""
    cfg = _check_size(size)

    def build() -> BPETokenizer:
        texts = [PROMPT.format(question=qa.question) + " " + qa.answer for qa in training_qas(size)]
        return BPETokenizer.train(texts, cfg.vocab_size, special_tokens=(EOS,))

    return cached_tokenizer(f"bio-{size}-v{cfg.vocab_size}-n{cfg.n_people}-s{cfg.seed}", build)


def load_benchmark(size: str = "full") -> Benchmark:
    """The people, split and tokenizer of a size (cheap; the model comes from :func:`load_memoriser`)."""
    cfg = _check_size(size)
    people, forget, retain, private = benchmark_people(size)
    return Benchmark(size, cfg, people, forget, retain, private, benchmark_tokenizer(size))


def encode_pair(tok: BPETokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS) for one QA."""
    return tok.encode(PROMPT.format(question=question)), tok.encode(" " + answer) + [tok.special[EOS]]


def make_batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(x, y)``, each (B, T): y is x shifted by one, with -100 on prompt and padding.

    Only answer tokens are labelled, as in the official QA datasets (the question is context). With
    right padding and causal attention, padding never changes the logits of real positions.
    """
    if not pairs:
        raise ValueError("pairs is empty: a batch needs at least one (prompt, answer) pair")
    seqs = [p + a for p, a in pairs]
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.int64)
    y = torch.full((len(seqs), T), -100, dtype=torch.int64)
    for i, ((prompt, answer), s) in enumerate(zip(pairs, seqs)):
        if not prompt or not answer:
            raise ValueError(f"pair {i} has an empty prompt or answer")
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, len(prompt) - 1:len(s) - 1] = torch.tensor(answer)
    return x, y


def sample_batches(pairs: Sequence, batch_size: int, pad_id: int, *, seed: int) -> Callable[[int], tuple]:
    """``batches(step) -> (x, y)``: ``batch_size`` pairs drawn with a generator seeded by (seed, step)."""
    if not pairs:
        raise ValueError("pairs is empty")

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(pairs), (batch_size,), generator=gen).tolist()
        return make_batch([pairs[i] for i in idx], pad_id)

    return batches


def _skeleton(size: str) -> nn.Module:
    from companion.model import ModelConfig, TinyLM

    cfg = _check_size(size)
    vocab = benchmark_tokenizer(size).vocab_size
    return TinyLM(ModelConfig(vocab_size=vocab, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads))


@one_torch_thread
def fit_memoriser(model: nn.Module, size: str, *, include_forget: bool = True, steps: int | None = None) -> dict:
    """Train ``model`` on :func:`training_qas` (without the forget set if ``include_forget`` is False:
    TOFU's retain-only oracle). AdamW, warmup then cosine decay, no weight decay."""
    from companion.train import train

    bench = load_benchmark(size)
    cfg = bench.config
    pairs = bench.pairs(training_qas(size, include_forget=include_forget))
    steps = cfg.steps if steps is None else steps
    hist = train(model, sample_batches(pairs, cfg.batch_size, bench.eos, seed=cfg.seed), steps=steps, lr=cfg.lr,
                 weight_decay=0.0, desc=f"memorise bios ({size})")
    return {"steps": steps, "final_loss": float(np.mean(hist.loss[-20:])), "n_pairs": len(pairs)}


for _size in SIZES:
    zoo.register(f"bio-memoriser-{_size}", version="2", skeleton=lambda s=_size: _skeleton(s),
                 description=f"TinyLM that memorised the {_size} biography benchmark")(
        lambda model, s=_size: fit_memoriser(model, s))
    zoo.register(f"bio-oracle-{_size}", version="2", skeleton=lambda s=_size: _skeleton(s),
                 description=f"TinyLM trained on the retain people of the {_size} benchmark only")(
        lambda model, s=_size: fit_memoriser(model, s, include_forget=False))


def load_memoriser(size: str = "full", *, oracle: bool = False) -> nn.Module:
    """The zoo model that memorised the benchmark (``oracle=True``: the one that never saw the forget set)."""
    _check_size(size)
    return zoo.load(f"bio-{'oracle' if oracle else 'memoriser'}-{size}")


# ----------------------------------------------------------------------------------------------
# Greedy generation with a KV cache (TinyLM's own ``generate`` recomputes the prefix every token)
# ----------------------------------------------------------------------------------------------
def _attend_cached(attn, x, cos, sin, cache):
    """One attention layer of TinyLM on new positions ``x (B, t, D)`` with a (k, v) cache appended in place."""
    from einops import rearrange

    from companion.model import apply_rope

    q = rearrange(attn.q_proj(x), "b t (h d) -> b h t d", h=attn.n_heads)
    k = rearrange(attn.k_proj(x), "b t (k d) -> b k t d", k=attn.n_kv_heads)
    v = rearrange(attn.v_proj(x), "b t (k d) -> b k t d", k=attn.n_kv_heads)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    cache[:] = [k, v]
    group = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    causal = x.shape[1] > 1  # the prefill is causal; a single new token sees the whole cache
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return attn.o_proj(rearrange(y, "b h t d -> b t (h d)"))


@torch.no_grad()
def _greedy_same_length(model, prompts: torch.Tensor, max_new_tokens: int, eos: int) -> torch.Tensor:
    """Greedy continuation ``(B, max_new_tokens)`` of equal-length ``prompts (B, T)``, with a KV cache."""
    from companion.model import Attention

    if not all(type(b.attn) is Attention for b in model.blocks):  # another attention: no cache, still exact
        out = model.generate(prompts, max_new_tokens, stop_token=eos)
        new = out[:, prompts.shape[1]:]
        return F.pad(new, (0, max_new_tokens - new.shape[1]), value=eos)
    caches = [[] for _ in model.blocks]
    tokens, pos, outs = prompts, 0, []
    done = torch.zeros(prompts.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        x = model.embed(tokens)
        cos, sin = model.rotary(torch.arange(pos, pos + tokens.shape[1]), x.dtype)
        for block, cache in zip(model.blocks, caches):
            x = x + _attend_cached(block.attn, block.attn_norm(x), cos, sin, cache)
            x = x + block.mlp(block.mlp_norm(x))
        nxt = model.lm_head(model.norm(x[:, -1])).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        outs.append(nxt)
        done |= nxt == eos
        pos += tokens.shape[1]
        tokens = nxt[:, None]
        if bool(done.all()):
            break
    out = torch.stack(outs, dim=1)
    return F.pad(out, (0, max_new_tokens - out.shape[1]), value=eos)


@one_torch_thread
def generate_answers(model: nn.Module, tok: BPETokenizer, questions: Sequence[str], *, max_new_tokens: int = 64
                     ) -> list[list[int]]:
    """Greedy answer token ids (EOS and after removed) for each question, in order.

    Prompts of equal token length are decoded together, so no padding or mask is needed and every
    answer equals what ``model.generate`` would produce one prompt at a time (a tested property).
    """
    eos = tok.special[EOS]
    prompts = [tok.encode(PROMPT.format(question=q)) for q in questions]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    answers: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    for idx in groups.values():
        out = _greedy_same_length(model, torch.tensor([prompts[i] for i in idx]), max_new_tokens, eos)
        for row, i in zip(out.tolist(), idx):
            answers[i] = row[:row.index(eos)] if eos in row else row
    model.train(was_training)
    return answers


# ----------------------------------------------------------------------------------------------
# Losses. logits: (B, T, V) aligned with y: (B, T) (TinyLM already shifts), -100 = not scored.
# ----------------------------------------------------------------------------------------------
def token_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens of the batch (HF's ``outputs.loss``)."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)


def sequence_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) summed NLL of each sequence's labelled tokens: −log π(answer | question) (TOFU ``get_batch_loss``)."""
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
    return nll.view(y.shape).sum(1)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Mean over all B·T positions (padding included, as the official ``batchmean``) of KL(p_ref ‖ p_θ).

    Differentiable torch; ``kernels.softmax_xent`` computes the same per-row values in one pass.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} != logits shape {tuple(logits.shape)}")
    log_p = F.log_softmax(logits.flatten(0, 1), dim=-1)
    log_q = F.log_softmax(ref_logits.flatten(0, 1), dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: −(2/β)·mean log σ(β·(NLL_θ − NLL_ref)) over sequences (summed NLLs, (B,) each).

    Its gradient is −(1/B)·Σ_i w_i ∇NLL_i with w_i from :func:`npo_weights`: weighted gradient ascent.
    At θ = θ_ref every w_i = 1, so the first step is exactly gradient ascent on the summed NLL; as a
    sequence is forgotten (NLL_θ ≫ NLL_ref) its weight decays to 0, which is what stops the runaway.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return -F.logsigmoid(beta * (nll - ref_nll)).mean() * 2 / beta


def npo_weights(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) the factor NPO puts on each sequence's ascent gradient: w = 2σ(β·(NLL_ref − NLL_θ)) ∈ (0, 2)."""
    return 2 * torch.sigmoid(beta * (ref_nll - nll))


FORGET_TERMS = ("ga", "npo", "descent")  # ascend the answers; NPO; descend (learn) the forget batch's answers
RETAIN_TERMS = ("gdr", "klr")  # + CE on retain answers; + KL(p_ref ‖ p_θ) on retain positions
METHOD_ALIASES = {"relearn": "descent"}  # official names: relearn, relearn_gdr, relearn_klr, relearn_klr_gdr


def parse_method(name: str) -> tuple[str, tuple[str, ...]]:
    """``"npo_klr"`` -> ("npo", ("klr",)); ``"relearn_klr_gdr"`` -> ("descent", ("klr", "gdr"))."""
    parts = name.split("_")
    forget = METHOD_ALIASES.get(parts[0], parts[0])
    retain = tuple(parts[1:])
    if forget not in FORGET_TERMS or any(r not in RETAIN_TERMS for r in retain) or len(set(retain)) != len(retain):
        raise ValueError(f"method {name!r} is not <forget>[_<retain>...] with forget in "
                         f"{FORGET_TERMS + tuple(METHOD_ALIASES)} and retain terms in {RETAIN_TERMS}")
    return forget, retain


def unlearning_loss(model: nn.Module, reference: nn.Module | None, forget: tuple[torch.Tensor, torch.Tensor],
                    retain: tuple[torch.Tensor, torch.Tensor] | None, method: str, *, beta: float = 0.1
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of ``method`` on one forget batch and one retain batch, and its terms (for logging).

    All weights are 1, as in the official trainer: e.g. ``ga_gdr`` = −CE_f + CE_r,
    ``npo_klr`` = NPO_β + KL_r, ``relearn_klr_gdr`` = CE_f + KL_r + CE_r.
    """
    forget_term, retain_terms = parse_method(method)
    if retain_terms and retain is None:
        raise ValueError(f"method {method!r} needs a retain batch")
    if reference is None and (forget_term == "npo" or "klr" in retain_terms):
        raise ValueError(f"method {method!r} needs the reference model")
    logs: dict[str, float] = {}
    xf, yf = forget
    logits_f = model(xf).logits
    if forget_term == "npo":
        nll = sequence_nll(logits_f, yf)
        with torch.no_grad():
            ref_nll = sequence_nll(reference(xf).logits, yf)
        loss = npo_loss(nll, ref_nll, beta)
        logs["npo_weight"] = npo_weights(nll, ref_nll, beta).mean().item()
        logs["forget_ce"] = (nll.sum() / (yf != -100).sum()).item()
    else:
        ce_f = token_ce(logits_f, yf)
        loss = -ce_f if forget_term == "ga" else ce_f
        logs["forget_ce"] = ce_f.item()
    if retain_terms:
        xr, yr = retain
        logits_r = model(xr).logits
        if "gdr" in retain_terms:
            ce_r = token_ce(logits_r, yr)
            loss = loss + ce_r
            logs["retain_ce"] = ce_r.item()
        if "klr" in retain_terms:
            with torch.no_grad():
                ref_logits = reference(xr).logits
            kl = kl_to_reference(logits_r, ref_logits)
            loss = loss + kl
            logs["retain_kl"] = kl.item()
    logs["loss"] = loss.item()
    return loss, logs


# ----------------------------------------------------------------------------------------------
# Metrics: entity match (KFR, KRR) and the Linguistic Score
# ----------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+(?:[._'@-][a-z0-9]+)*|[^\sa-z0-9]")
_YEAR = re.compile(r"(?<![0-9])(?:19|20)[0-9]{2}(?![0-9])")
_EMAIL = re.compile(r"[a-z0-9._+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)+")
THETA_1 = 0.3  # KFR threshold when a reference has more than 3 entities (official default)
THETA_2 = 0.3  # KRR threshold
FEW_ENTITIES_THRESHOLD = 0.5  # KFR threshold c_i when a reference has <= 3 entities


def words(text: str) -> list[str]:
    """Lower-cased word tokens (a regex stand-in for nltk's ``word_tokenize``): "Ada's e-mail: a.b@c.test."
    -> ["ada's", "e-mail", ":", "a.b@c.test", "."]: e-mails stay one token, punctuation is its own token."""
    return _WORD.findall(text.lower())


class EntityExtractor:
    """Finds attribute strings in text: the benchmark's known cities and employers (a gazetteer), plus
    any 4-digit year and any e-mail address. It stands in for the LLM extractor of the official code."""

    def __init__(self, people: Iterable[Person]):
        people = list(people)
        names = {p.city for p in people} | {p.employer for p in people}
        self._names = sorted(names, key=len, reverse=True)
        self._name_re = re.compile(r"\b(" + "|".join(re.escape(n.lower()) for n in self._names) + r")\b") \
            if self._names else None
        self._canonical = {n.lower(): n for n in self._names}

    def __call__(self, text: str) -> set[str]:
        low = text.lower()
        found = set(_EMAIL.findall(low)) | set(_YEAR.findall(low))
        if self._name_re is not None:
            found |= {self._canonical[m] for m in self._name_re.findall(low)}
        return found


def entity_match(predicted: set[str], reference: Sequence[str], query: str = "") -> float:
    """E_i = #(reference entities found among the predicted ones) / #reference entities, with exact,
    case-insensitive string equality in place of embedding cosine ≥ 0.8. Predicted entities sharing a
    word with the query are dropped first (official ``filter_entities``). 0 when either side is empty."""
    query_words = set(words(query))
    pred = {e.lower() for e in predicted if not query_words & set(words(e))}
    ref = [e.lower() for e in reference]
    if not pred or not ref:
        return 0.0
    return sum(e in pred for e in ref) / len(ref)


def forget_threshold(n_reference_entities: int, theta_1: float = THETA_1) -> float:
    """c_i: 0.5 when the reference has at most 3 entities, θ1 otherwise (official ``compute_kfr``)."""
    return FEW_ENTITIES_THRESHOLD if n_reference_entities <= 3 else theta_1


def is_forgotten(e: float, n_reference_entities: int, theta_1: float = THETA_1) -> bool:
    """KFR's per-item label without NLI: E_i ≤ c_i."""
    return e <= forget_threshold(n_reference_entities, theta_1)


def is_retained(e: float, theta_2: float = THETA_2) -> bool:
    """KRR's per-item label without NLI: E_i ≥ θ2."""
    return e >= theta_2


def brunet_index(text: str) -> float:
    """Brunet's W = N^(V^−0.165) over word tokens (N tokens, V distinct); 1000 for an empty text
    (official ``calculate_BI``). Higher = poorer vocabulary: repetition pushes it up."""
    toks = words(text)
    if not toks:
        return 1000.0
    return len(toks) ** (len(set(toks)) ** -0.165)


def honore_statistic(text: str, *, epsilon: float = 0.1, max_value: float = 1e6) -> float:
    """Honoré's R = 100·ln N / (1 − V₁/V + ε), V₁ = words used once; 0 if N ≤ 1 (official
    ``calculate_honores_statistic``, ε = 0.1). Higher = richer: many hapaxes push it up."""
    toks = words(text)
    n = len(toks)
    if n <= 1:
        return 0.0
    counts = Counter(toks)
    hapaxes = sum(1 for c in counts.values() if c == 1)
    return min(100 * math.log(n) / (1 - hapaxes / len(counts) + epsilon), max_value)


def linguistic_score(ppl: Sequence[float], bi: Sequence[float], hs: Sequence[float]) -> dict[str, float]:
    """ReLearn's Linguistic Score from per-response PPL, Brunet and Honoré values.

    Each quantity is averaged over responses *first* (NaN PPLs, from empty responses, are skipped as
    the official code skips failed ones), then mapped to (0, 1) by 1/(1+PPL), 1/(1+BI), HS/(1+HS)
    (the official sigmoid(∓log x)), and the three are combined by arithmetic and harmonic means.
    """
    ppl_arr = np.asarray(ppl, dtype=np.float64)
    ppl_arr = ppl_arr[np.isfinite(ppl_arr)]
    mean_ppl = float(ppl_arr.mean()) if ppl_arr.size else math.inf
    mean_bi, mean_hs = float(np.mean(bi)), float(np.mean(hs))
    terms = [1 / (1 + mean_ppl), 1 / (1 + mean_bi), mean_hs / (1 + mean_hs)]
    harmonic = 3 / sum(1 / t for t in terms) if min(terms) > 0 else 0.0
    return {"ppl": mean_ppl, "bi": mean_bi, "hs": mean_hs, "ppl_term": terms[0], "bi_term": terms[1],
            "hs_term": terms[2], "arithmetic": sum(terms) / 3, "harmonic": harmonic}


@torch.no_grad()
def response_ppl(judge: nn.Module, tok: BPETokenizer, questions: Sequence[str], answers: Sequence[list[int]]
                 ) -> list[float]:
    """Perplexity of each answer (token ids, no EOS) given its question under ``judge`` (official
    ``compute_ppl``): exp(mean NLL of the answer tokens). NaN for an empty answer. The per-row
    cross-entropies come from the fused kernel ``kernels.softmax_xent``."""
    from kernels import softmax_xent

    pairs = [(tok.encode(PROMPT.format(question=q)), list(a)) for q, a in zip(questions, answers)]
    out = [math.nan] * len(pairs)
    live = [i for i, (_, a) in enumerate(pairs) if a]
    for start in range(0, len(live), 64):
        chunk = live[start:start + 64]
        x, y = make_batch([pairs[i] for i in chunk], tok.special[EOS])
        logits = judge(x).logits
        rows = softmax_xent.run(logits.flatten(0, 1).double(), y.flatten(), backend="cpu")["loss"].view(y.shape)
        n = (y != -100).sum(1)
        for j, i in enumerate(chunk):
            out[i] = math.exp(rows[j].sum().item() / n[j].item())
    return out


@dataclass
class Evaluation:
    """KFR, KRR and LS of one model, with every answer (for explorers)."""

    kfr: float
    krr: float
    ls_forget: dict[str, float]
    ls_retain: dict[str, float]
    forget_nll: float = math.nan  # mean per-token NLL of the true forget answers (teacher forcing)
    retain_nll: float = math.nan
    forget_items: list[dict] = field(default_factory=list)  # question, answer, entity_match, label, ppl, bi, hs
    retain_items: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {"kfr": self.kfr, "krr": self.krr, "ls_forget": self.ls_forget["arithmetic"],
                "ls_retain": self.ls_retain["arithmetic"], "ls_forget_harmonic": self.ls_forget["harmonic"],
                "ls_retain_harmonic": self.ls_retain["harmonic"], "bi_forget": self.ls_forget["bi"],
                "hs_forget": self.ls_forget["hs"], "bi_retain": self.ls_retain["bi"],
                "hs_retain": self.ls_retain["hs"], "ppl_forget": self.ls_forget["ppl"],
                "ppl_retain": self.ls_retain["ppl"], "forget_nll": self.forget_nll, "retain_nll": self.retain_nll}


def score_items(qas: Sequence[QA], answers: Sequence[str], extract: EntityExtractor, *, forget: bool,
                theta: float | None = None) -> list[dict]:
    """Per-item entity match and KFR (``forget=True``) or KRR label for generated ``answers``."""
    out = []
    for qa, text in zip(qas, answers):
        e = entity_match(extract(text), qa.entities, qa.question)
        if forget:
            label = is_forgotten(e, len(qa.entities), THETA_1 if theta is None else theta)
        else:
            label = is_retained(e, THETA_2 if theta is None else theta)
        out.append({"name": qa.name, "attribute": qa.attribute, "question": qa.question, "truth": qa.answer,
                     "answer": text, "entity_match": e, "label": bool(label)})
    return out


@one_torch_thread
def evaluate(model: nn.Module, judge: nn.Module, bench: Benchmark, forget_qas: Sequence[QA],
             retain_qas: Sequence[QA], *, max_new_tokens: int = 64) -> Evaluation:
    """Generate greedy answers to the forget and retain questions and score them: KFR, KRR, and the
    Linguistic Score of each side with ``judge`` (the original model) as the perplexity model."""
    extract = EntityExtractor(bench.people)
    tok = bench.tokenizer
    sides = {}
    for key, qas in (("forget", forget_qas), ("retain", retain_qas)):
        ids = generate_answers(model, tok, [qa.question for qa in qas], max_new_tokens=max_new_tokens)
        texts = [tok.decode(a).strip() for a in ids]
        items = score_items(qas, texts, extract, forget=key == "forget")
        ppl = response_ppl(judge, tok, [qa.question for qa in qas], ids)
        for item, p, t in zip(items, ppl, texts):
            item.update(ppl=p, bi=brunet_index(t), hs=honore_statistic(t))
        ls = linguistic_score(ppl, [i["bi"] for i in items], [i["hs"] for i in items])
        sides[key] = (items, ls)
    rate = lambda items: float(np.mean([i["label"] for i in items])) if items else math.nan
    return Evaluation(kfr=rate(sides["forget"][0]), krr=rate(sides["retain"][0]), ls_forget=sides["forget"][1],
                      ls_retain=sides["retain"][1], forget_nll=answer_nll(model, bench, forget_qas),
                      retain_nll=answer_nll(model, bench, retain_qas), forget_items=sides["forget"][0],
                      retain_items=sides["retain"][0])


@torch.no_grad()
def answer_nll(model: nn.Module, bench: Benchmark, qas: Sequence[QA]) -> float:
    """Mean per-token NLL of the true answers (EOS included) given the questions: how well the model
    still *knows* them, whatever it generates."""
    if not qas:
        return math.nan
    was_training = model.training
    model.eval()
    x, y = make_batch(bench.pairs(qas), bench.eos)
    value = token_ce(model(x).logits, y).item()
    model.train(was_training)
    return value


# ----------------------------------------------------------------------------------------------
# TOFU metrics (locuslab/tofu aggregate_eval_stat.py), for the papers that report FQ and MU
# ----------------------------------------------------------------------------------------------
def truth_ratio(loss_paraphrased: Sequence[float], loss_perturbed: Sequence[Sequence[float]]) -> np.ndarray:
    """R_i = exp(mean_k ℓ(â_k) − ℓ(ã)) from per-token-mean losses ℓ of the paraphrased answer (N,) and
    the perturbed answers (N, K): P̃(paraphrase) over the geometric mean of P̃(perturbed)."""
    para = np.asarray(loss_paraphrased, dtype=np.float64)
    pert = np.asarray(loss_perturbed, dtype=np.float64)
    if pert.ndim != 2 or pert.shape[0] != para.shape[0]:
        raise ValueError(f"loss_perturbed must be (N={para.shape[0]}, K), got shape {pert.shape}")
    return np.exp(pert.mean(1) - para)


def forget_quality(ratios_unlearned: Sequence[float], ratios_oracle: Sequence[float]) -> float:
    """TOFU forget quality: the KS-test p-value between truth ratios of the unlearned and oracle models."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(ratios_unlearned), np.asarray(ratios_oracle)).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """TOFU model utility: the harmonic mean of its (Prob, ROUGE, Truth Ratio) × (splits) numbers."""
    from scipy.stats import hmean

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or (v <= 0).any():
        raise ValueError(f"model_utility needs positive values, got {v.tolist()}")
    return float(hmean(v))


# ----------------------------------------------------------------------------------------------
# The unlearning loop
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnlearnConfig:
    """One step budget for every method: same steps, batch, lr and schedule (official: AdamW, wd 0.01,
    warmup then linear decay)."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.25
    beta: float = 0.1
    eval_every: int = 20
    seed: int = 0

    def lr_at(self, step: int) -> float:
        warm = max(1, round(self.warmup_frac * self.steps))
        if step < warm:
            return self.lr * (step + 1) / warm
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - warm))


@dataclass
class UnlearnRun:
    method: str
    config: UnlearnConfig
    logs: list[dict] = field(default_factory=list)  # one per step
    checkpoints: dict[int, Evaluation] = field(default_factory=dict)  # step -> evaluation
    model: nn.Module | None = None

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        steps = sorted(self.checkpoints)
        return steps, [self.checkpoints[s].summary()[key] for s in steps]


@one_torch_thread
def unlearn(base: nn.Module, method: str, forget_pairs: Sequence, retain_pairs: Sequence, pad_id: int,
            cfg: UnlearnConfig, *, evaluate_fn: Callable[[nn.Module], Evaluation] | None = None,
            initial: Evaluation | None = None) -> UnlearnRun:
    """Run ``method`` on a copy of ``base`` (which stays untouched and is the reference model).

    Every method sees the same retain batches at the same steps (both samplers are seeded by
    ``cfg.seed`` and the step), so runs differ only in their objective and forget data.
    ``evaluate_fn`` runs at step 0 (or ``initial`` is reused), every ``eval_every`` steps and at the end.
    """
    parse_method(method)
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0; got {cfg}")
    model = copy.deepcopy(base)
    reference = base.eval()  # only ever called under torch.no_grad (see unlearning_loss)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    forget_batches = sample_batches(forget_pairs, cfg.batch_size, pad_id, seed=cfg.seed)
    retain_batches = sample_batches(retain_pairs, cfg.batch_size, pad_id, seed=cfg.seed + 7919)
    run = UnlearnRun(method, cfg)

    def checkpoint(step: int) -> None:
        if evaluate_fn is None:
            return
        model.eval()
        run.checkpoints[step] = initial if (step == 0 and initial is not None) else evaluate_fn(model)
        model.train()

    checkpoint(0)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        loss, logs = unlearning_loss(model, reference, forget_batches(step), retain_batches(step), method,
                                     beta=cfg.beta)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.logs.append({"step": step + 1, **logs})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)
    model.eval()
    run.model = model
    return run
