"""Reasoning primitives: small synthetic tasks as text, their floors, and their evaluation.

Six tasks, each an [`Example`][] of a prompt and a short answer, byte-tokenized like the
training text (every name, digit and item is one or two bytes):

- `"induction"`: random two-letter items, then `|` and a query of two consecutive items
  seen earlier; the answer is the item that followed the query's first occurrence.
  `"qa zx mp ko lr ty | mp ko "` → `"lr"`.
- `"varassign_d0"`, `"varassign_d1"`, `"varassign_d2"`: [`VARASSIGN_CHAINS`][] parallel
  chains of equal depth `d`, interleaved: each chain starts at a distinct digit and follows
  `d` links `x=y`; the query asks for the last variable of one chain. Every chain has the
  same shape, so only following the queried chain leads to the answer: a guess that picks
  a literal whose variable is used on some right-hand side (the shortcut of a prompt whose
  distractor links point at random variables) is no better than picking any literal.
  `"a=5,b=3,c=a,d=b,d=?"` → `"3"` (depth 1, two chains).
- `"math"`: one-digit additions and subtractions with three or four operands, every
  intermediate result in `0..9`. `"5+3-2+1="` → `"7"`. The prompt space (~10^4) is large
  next to the evaluation set, so holding the evaluation prompts out of the training text
  barely changes the training distribution ([`math_kind_shares`][] measures it).
- `"recall"`: closed-book facts. [`RECALL_FACTS`][] fixed pairs `item:digit` appear in the
  pretraining text (`stackops_harness.corpus`), and the evaluation asks `"qz:"` without the
  fact in context: memorisation, the control for the reasoning tasks.

**Held-out data.** [`generate`][] draws from one random stream per `(seed, task, stream)`
(a `numpy.random.SeedSequence` spawn key), so the `"eval"` and `"pool"` streams never share
random numbers. [`make_splits`][] also removes from the pool (the source of shots and of
fine-tuning examples) every prompt of the evaluation set, except for `"recall"`, whose
facts are the same everywhere by design.

**Floors.** [`floors`][] gives, per task and evaluation set, uniform chance, the informed
guess (the format known, the computation not) and the structural shortcut; a model
computes something only where it beats the highest of them.

**Evaluation.** [`teacher_forced_exact_match`][] scores a whole batch of k-shot prompts
with one forward pass: an example counts when every answer token is the model's argmax
given the prompt and the answer's earlier tokens. [`evaluate_exact_match`][] with
[`greedy_generate`][] is the generation check. [`shots_that_fit`][] is the number of
complete shots a context holds; prompts are never cut.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from .tokenizer import VOCAB_SIZE, decode, encode

TASKS = ("induction", "varassign_d0", "varassign_d1", "varassign_d2", "math", "recall")
"""Names accepted by [`generate`][]."""

REASONING_TASKS = ("induction", "varassign_d0", "varassign_d1", "varassign_d2", "math")
"""The tasks answered from the prompt (open-book); `"recall"` is the closed-book control."""

STREAMS = ("eval", "pool")
"""Random streams of [`generate`][]: held-out evaluation sets, and few-shot/fine-tune pools."""

INDUCTION_ITEMS = tuple(a + b for a in string.ascii_lowercase for b in string.ascii_lowercase)
"""The 676 two-letter items of the induction task."""

INDUCTION_LENGTH = 8
"""Items in an induction sequence (before the query)."""

INDUCTION_QUERY_LEN = 2
"""Items in an induction query."""

VARASSIGN_CHAINS = 3
"""Parallel chains in a variable-assignment prompt (one of them is queried)."""

MATH_OPERATIONS = (2, 3)
"""Operations per math prompt (three or four operands)."""

RECALL_FACTS = 512
"""Closed-book facts `item:digit`; the table is fixed (it does not depend on any seed)."""

MAX_SHOTS = 5
"""The paper's number of in-context shots; [`shots_that_fit`][] never gives more."""

# Consecutive duplicate draws after which generate() concludes the task has run out of new
# prompts.
_MAX_MISSES = 20_000


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance: the model reads `prompt` and should continue with `answer`.

    !!! Example

        >>> ex = Example(prompt="5+3-2=", answer="6")
        >>> ex.prompt + ex.answer
        '5+3-2=6'
    """

    prompt: str
    answer: str


class Splits(NamedTuple):
    """A held-out evaluation set and a disjoint pool of few-shot / fine-tuning examples."""

    eval: list[Example]
    pool: list[Example]


# --------------------------------------------------------------------------- generators


def _check_task(task: str) -> int:
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
    return TASKS.index(task)


def _check_count(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _induction(rng: np.random.Generator) -> Example:
    seq = [INDUCTION_ITEMS[i] for i in rng.integers(len(INDUCTION_ITEMS), size=INDUCTION_LENGTH)]
    q = INDUCTION_QUERY_LEN
    start = int(rng.integers(INDUCTION_LENGTH - q))  # leaves room for a following item
    query = seq[start : start + q]
    # Items repeat by chance, so the query may occur before `start`: the answer is defined
    # by its first occurrence.
    first = next(j for j in range(start + 1) if seq[j : j + q] == query)
    prompt = " ".join(seq) + " | " + " ".join(query) + " "
    return Example(prompt=prompt, answer=seq[first + q])


def _varassign(rng: np.random.Generator, depth: int) -> Example:
    n_chains = VARASSIGN_CHAINS
    names = [string.ascii_lowercase[i] for i in rng.choice(26, size=n_chains * (depth + 1),
                                                            replace=False)]
    digits = [str(d) for d in rng.choice(10, size=n_chains, replace=False)]
    # chain c is names[c*(depth+1) : (c+1)*(depth+1)]: its first variable holds digits[c],
    # each next one copies the previous.
    chains = [names[c * (depth + 1) : (c + 1) * (depth + 1)] for c in range(n_chains)]
    # Interleave the chains in a random order that keeps each chain's own order.
    pos = [0] * n_chains
    parts = []
    owners = rng.permutation(np.repeat(np.arange(n_chains), depth + 1))
    for c in owners:
        k = pos[c]
        rhs = digits[c] if k == 0 else chains[c][k - 1]
        parts.append(f"{chains[c][k]}={rhs}")
        pos[c] += 1
    queried = int(rng.integers(n_chains))
    prompt = ",".join(parts) + f",{chains[queried][-1]}=?"
    return Example(prompt=prompt, answer=digits[queried])


def _math(rng: np.random.Generator) -> Example:
    while True:
        n_ops = MATH_OPERATIONS[int(rng.integers(len(MATH_OPERATIONS)))]
        value = int(rng.integers(10))
        text = str(value)
        for _ in range(n_ops):
            operand = int(rng.integers(10))
            if rng.integers(2):
                value, text = value + operand, f"{text}+{operand}"
            else:
                value, text = value - operand, f"{text}-{operand}"
            if not 0 <= value <= 9:
                break
        else:
            return Example(prompt=text + "=", answer=str(value))


@functools.cache
def _recall_table() -> tuple[Example, ...]:
    rng = np.random.default_rng(np.random.SeedSequence(20240919, spawn_key=(99,)))
    keys = rng.permutation(len(INDUCTION_ITEMS))[:RECALL_FACTS]
    values = rng.integers(10, size=RECALL_FACTS)
    return tuple(Example(f"{INDUCTION_ITEMS[k]}:", str(int(v))) for k, v in zip(keys, values))


def recall_table() -> list[Example]:
    """The closed-book facts: [`RECALL_FACTS`][] pairs `item:` → digit, fixed for all seeds.

    !!! Example

        >>> facts = recall_table()
        >>> len(facts), len({f.prompt for f in facts}), facts[0].prompt[-1]
        (512, 512, ':')
    """
    return list(_recall_table())


def _one(task_index: int, rng: np.random.Generator) -> Example:
    task = TASKS[task_index]
    if task == "induction":
        return _induction(rng)
    if task == "math":
        return _math(rng)
    if task == "recall":
        table = _recall_table()
        return table[int(rng.integers(len(table)))]
    return _varassign(rng, depth=int(task[-1]))


def generate(
    task: str,
    n: int,
    *,
    seed: int,
    stream: str = "eval",
    exclude: Collection[str] = (),
) -> list[Example]:
    """Generate `n` distinct examples of a task, deterministically.

    The random stream is a function of `(seed, task, stream)` only: the same arguments
    always give the same list, and `stream="eval"` and `stream="pool"` never share random
    numbers. Duplicate prompts, and prompts in `exclude`, are skipped.

    **Arguments:**

    - `task`: one of [`TASKS`][].
    - `n`: number of examples.
    - `seed`: non-negative seed.
    - `stream`: `"eval"` for held-out sets, `"pool"` for few-shot/fine-tuning pools.
    - `exclude`: prompts that must not be generated (e.g. an evaluation set's).

    **Returns:**

    A list of `n` [`Example`][]s with distinct prompts.

    !!! Example

        >>> generate("math", 2, seed=0)
        [Example(prompt='0+8-5=', answer='3'), Example(prompt='0+2+1=', answer='3')]
        >>> generate("varassign_d1", 1, seed=0)[0]
        Example(prompt='y=4,e=3,p=7,f=e,x=p,c=y,c=?', answer='4')
    """
    task_index = _check_task(task)
    n = _check_count("n", n, minimum=0)
    seed = _check_count("seed", seed, minimum=0)
    if stream not in STREAMS:
        raise ValueError(f"`stream` must be one of {STREAMS}, got {stream!r}.")
    rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(task_index, STREAMS.index(stream)))
    )
    # `exclude` is only read (never copied: callers pass large sets many times).
    seen: set[str] = set()
    out: list[Example] = []
    misses = 0
    if task == "recall":  # a permutation of the fixed table: no rejection loop needed
        table = _recall_table()
        out = [e for e in (table[i] for i in rng.permutation(RECALL_FACTS))
               if e.prompt not in exclude][:n]
        misses = _MAX_MISSES
    while len(out) < n and misses < _MAX_MISSES:
        ex = _one(task_index, rng)
        if ex.prompt in seen or ex.prompt in exclude:
            misses += 1
        else:
            misses = 0
            seen.add(ex.prompt)
            out.append(ex)
    if len(out) < n:
        raise ValueError(
            f"Found only {len(out)} distinct {task!r} prompts outside `exclude`; "
            f"ask for fewer than `n`={n}."
        )
    return out


def make_splits(
    task: str, *, n_eval: int, n_pool: int, eval_seed: int = 0, pool_seed: int = 0
) -> Splits:
    """A held-out evaluation set and a pool for few-shot shots and fine-tuning.

    The evaluation set is `generate(task, n_eval, seed=eval_seed, stream="eval")`; the pool
    comes from the `"pool"` stream and skips every evaluation prompt (for `"recall"`, the
    closed-book control, it does not: the facts are the same in training, shots and
    queries by design, and a query is never its own shot). Keep `eval_seed` fixed and vary
    `pool_seed` to fine-tune several runs on different examples.

    **Arguments:**

    - `task`: a task name, see [`generate`][].
    - `n_eval`, `n_pool`: sizes of the two sets.
    - `eval_seed`, `pool_seed`: seeds of the two streams.

    **Returns:**

    `Splits(eval=[...], pool=[...])`.

    !!! Example

        >>> s = make_splits("math", n_eval=300, n_pool=64)
        >>> len(s.eval), len(s.pool), {e.prompt for e in s.eval} & {e.prompt for e in s.pool}
        (300, 64, set())
    """
    eval_set = generate(task, n_eval, seed=eval_seed, stream="eval")
    exclude = set() if task == "recall" else {e.prompt for e in eval_set}
    pool = generate(task, n_pool, seed=pool_seed, stream="pool", exclude=exclude)
    return Splits(eval=eval_set, pool=pool)


def chance_accuracy(task: str) -> float:
    """Exact-match accuracy of guessing uniformly among the task's possible answers.

    **Arguments:**

    - `task`: a task name, see [`generate`][].

    **Returns:**

    `1 / 676` for induction (one of the two-letter items), `0.1` for the others (a digit).

    !!! Example

        >>> chance_accuracy("math"), round(chance_accuracy("induction"), 5)
        (0.1, 0.00148)
    """
    _check_task(task)
    if task == "induction":
        return 1.0 / len(INDUCTION_ITEMS)
    return 0.1


def _shortcut_varassign(prompt: str, answer: str) -> float:
    """Expected score of guessing uniformly among the literals whose variable is used on
    some right-hand side (all literals when none is)."""
    pairs = [p.split("=") for p in prompt.split(",")[:-1]]
    used = {rhs for _, rhs in pairs}
    literals = {rhs for _, rhs in pairs if rhs.isdigit()}
    cands = {rhs for var, rhs in pairs if rhs.isdigit() and var in used} or literals
    return 1.0 / len(cands) if answer in cands else 0.0


def induction_one_item_share(examples: Sequence[Example]) -> float:
    """Expected score of a one-item induction guesser: uniformly among the items that follow
    any occurrence of the query's last item (the whole context when none does).

    With 676 items and short sequences, items rarely repeat, so this is close to 1: the
    induction task measures one-item induction copying, not two-item matching.

    !!! Example

        >>> induction_one_item_share(generate("induction", 200, seed=0)) > 0.95
        True
    """
    accs = []
    for e in examples:
        seq_text, query_text = e.prompt.split(" | ")
        seq, last = seq_text.split(), query_text.split()[-1]
        cands = {seq[j + 1] for j in range(len(seq) - 1) if seq[j] == last} or set(seq)
        accs.append(1.0 / len(cands) if e.answer in cands else 0.0)
    return float(np.mean(accs))


def _informed(task: str, examples: Sequence[Example]) -> float:
    if task in ("math", "recall"):
        return Counter(e.answer for e in examples).most_common(1)[0][1] / len(examples)
    accs = []
    for e in examples:
        if task == "induction":
            cands = set(e.prompt.split("|")[0].split())
        else:
            cands = {c for c in e.prompt if c.isdigit()}
        accs.append(1.0 / len(cands) if e.answer in cands else 0.0)
    return float(np.mean(accs))


def floors(task: str, examples: Sequence[Example]) -> dict[str, float | None]:
    """What an evaluation set gives away without the computation: three guessers' scores.

    - `uniform`: [`chance_accuracy`][].
    - `informed`: the format known, the computation not: uniformly among the candidate
      answers visible in the prompt (its digits; its items), or for math and recall the
      most frequent answer of the set.
    - `shortcut`: a structural guesser that needs no chaining: for variable assignment, a
      literal whose variable appears on some right-hand side; `None` for the other tasks.
      (For induction, [`induction_one_item_share`][] says how often matching the query's
      last item alone, a one-item induction head, already gives the answer.)
    - `floor`: the highest of the three. A model computes only where it is above it.

    **Arguments:**

    - `task`: a task name.
    - `examples`: the evaluation set.

    **Returns:** a dict with the four keys above (expected accuracies on `examples`).

    !!! Example

        >>> f = floors("varassign_d2", generate("varassign_d2", 500, seed=0))
        >>> round(f["floor"], 3), f["shortcut"] == f["informed"]
        (0.333, True)
    """
    _check_task(task)
    if not examples:
        raise ValueError("`examples` is empty.")
    out: dict[str, float | None] = {"uniform": chance_accuracy(task),
                                    "informed": _informed(task, examples)}
    if task.startswith("varassign"):
        out["shortcut"] = float(np.mean([_shortcut_varassign(e.prompt, e.answer)
                                         for e in examples]))
    else:
        out["shortcut"] = None
    out["floor"] = max(v for v in out.values() if v is not None)
    return out


def math_kind_shares(examples: Sequence[Example]) -> dict[int, float]:
    """The share of math examples by number of operations (to compare two distributions).

    !!! Example

        >>> sorted(math_kind_shares(generate("math", 200, seed=0)))
        [2, 3]
    """
    counts = Counter(sum(c in "+-" for c in e.prompt) for e in examples)
    return {k: counts[k] / len(examples) for k in sorted(counts)}


def shots_that_fit(task: str, context: int, *, cap: int = MAX_SHOTS) -> int:
    """The number of complete shots, up to `cap`, that fit with any query and its answer.

    Computed from the task's longest line (`prompt + answer + "\\n"`), so that every k-shot
    prompt of the task, answer included, fits in `context` tokens without cutting. A
    context too short for even the query is an error.

    !!! Example

        >>> [shots_that_fit(t, 128) for t in TASKS]
        [2, 5, 3, 2, 5, 5]
    """
    _check_task(task)
    context = _check_count("context", context, minimum=1)
    line = max_line_length(task)
    if line - 1 > context:
        raise ValueError(
            f"`context`={context} cannot hold one {task!r} query and its answer "
            f"({line - 1} tokens); use a longer context or leave the task out."
        )
    return min(cap, (context - (line - 1)) // line)


def max_line_length(task: str) -> int:
    """Bytes of the task's longest `prompt + answer + "\\n"` line.

    !!! Example

        >>> max_line_length("math"), max_line_length("varassign_d0")
        (10, 17)
    """
    _check_task(task)
    if task == "induction":
        return 3 * INDUCTION_LENGTH + 2 + 3 * INDUCTION_QUERY_LEN + 3
    if task == "math":
        return 2 * max(MATH_OPERATIONS) + 4
    if task == "recall":
        return 5
    depth = int(task[-1])
    return 4 * VARASSIGN_CHAINS * (depth + 1) + 5


# --------------------------------------------------------------------------- evaluation


def few_shot_prompt(shots: Sequence[Example], query: Example) -> str:
    """Concatenate solved shots, one per line, then the query's prompt.

    **Arguments:**

    - `shots`: solved examples, each rendered as `f"{prompt}{answer}\\n"`.
    - `query`: the example to solve; its answer is not included.

    **Returns:**

    The prompt text.

    !!! Example

        >>> few_shot_prompt([Example("1+1=", "2"), Example("3-1=", "2")], Example("4+4=", "8"))
        '1+1=2\\n3-1=2\\n4+4='
    """
    return "".join(f"{s.prompt}{s.answer}\n" for s in shots) + query.prompt


def is_exact_match(completion: str, answer: str) -> bool:
    """Whether a model's continuation gives the answer.

    The completion is cut at its first newline and stripped; its first `len(answer)`
    characters must equal `answer`.

    !!! Example

        >>> is_exact_match("3\\n1+1=2", "3"), is_exact_match(" 3", "3"), is_exact_match("4", "3")
        (True, True, False)
    """
    return completion.split("\n", 1)[0].strip()[: len(answer)] == answer


def evaluate_exact_match(
    generate_fn: Callable[[list[str], int], list[str]],
    examples: Sequence[Example],
    shots_pool: Sequence[Example],
    *,
    k: int = 5,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> float:
    """k-shot exact-match accuracy of any text generator on a list of examples.

    For each example, `k` shots are drawn without replacement from `shots_pool` (seeded by
    `seed`, skipping any shot whose prompt equals the example's), joined with
    [`few_shot_prompt`][], and all prompts go to one call of `generate_fn`. Answers are
    scored with [`is_exact_match`][].

    **Arguments:**

    - `generate_fn`: `generate_fn(prompts, max_new_tokens) -> completions`, one
      completion (the continuation only) per prompt; e.g. built on [`greedy_generate`][].
    - `examples`: the evaluation set.
    - `shots_pool`: examples to draw shots from; use [`make_splits`][] to keep it disjoint
      from `examples`. May be empty when `k=0`.
    - `k`: shots per prompt (`0` for zero-shot).
    - `seed`: seed of the shot sampling.
    - `max_new_tokens`: tokens to generate; default: the longest answer's length in bytes.

    **Returns:**

    The fraction of examples answered exactly, in `[0, 1]`.

    !!! Example

        >>> s = make_splits("math", n_eval=20, n_pool=10)
        >>> oracle = lambda prompts, n: [str(eval(p.rsplit("\\n", 1)[-1][:-1])) for p in prompts]
        >>> evaluate_exact_match(oracle, s.eval, s.pool, k=3)
        1.0
    """
    if not examples:
        raise ValueError("`examples` is empty; nothing to evaluate.")
    if max_new_tokens is None:
        max_new_tokens = max(len(encode(e.answer)) for e in examples)
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, minimum=1)
    prompts = k_shot_prompts(examples, shots_pool, k=k, seed=seed)
    completions = list(generate_fn(prompts, max_new_tokens))
    if len(completions) != len(prompts):
        raise ValueError(
            f"`generate_fn` returned {len(completions)} completions for {len(prompts)} prompts."
        )
    hits = sum(is_exact_match(c, ex.answer) for c, ex in zip(completions, examples, strict=True))
    return hits / len(examples)


def k_shot_prompts(
    examples: Sequence[Example], shots_pool: Sequence[Example], *, k: int, seed: int = 0
) -> list[str]:
    """One k-shot prompt per example: `k` shots drawn without replacement from `shots_pool`
    (seeded by `seed`, never a shot whose prompt equals the example's), then the query.

    **Arguments:**

    - `examples`: the queries.
    - `shots_pool`: solved examples to draw shots from.
    - `k`: shots per prompt (`0` for zero-shot).
    - `seed`: seed of the shot sampling.

    **Returns:** a list of prompt strings built with [`few_shot_prompt`][].

    !!! Example

        >>> k_shot_prompts([Example("1+1=", "2")], [Example("2+2=", "4")], k=1)
        ['2+2=4\\n1+1=']
    """
    k = _check_count("k", k, minimum=0)
    rng = np.random.default_rng(seed)
    prompts = []
    for ex in examples:
        candidates = [s for s in shots_pool if s.prompt != ex.prompt]
        if len(candidates) < k:
            raise ValueError(
                f"`shots_pool` has {len(candidates)} usable shots for a query, fewer than "
                f"`k`={k}; pass a larger pool or a smaller `k`."
            )
        chosen: Sequence[int] = (
            rng.choice(len(candidates), size=k, replace=False).tolist() if k else []
        )
        prompts.append(few_shot_prompt([candidates[i] for i in chosen], ex))
    return prompts


class TeacherForcedBatch(NamedTuple):
    """Rows for teacher-forced scoring, built by [`teacher_forced_batch`][].

    - `tokens`: int32 `(N, max_len)`: each row is `prompt + answer`, right-padded.
    - `positions`: int32 `(N, A)`: the positions whose next-token prediction must be each
      answer token (`A` is the longest answer; unused slots repeat position 0).
    - `targets`: int32 `(N, A)`: the answer tokens.
    - `valid`: bool `(N, A)`: which slots are real answer tokens.
    """

    tokens: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    valid: np.ndarray


def teacher_forced_batch(
    prompts: Sequence[str], answers: Sequence[str], *, max_len: int, pad_id: int = 0
) -> TeacherForcedBatch:
    """Token rows `prompt + answer` and where each answer token must be predicted.

    Nothing is cut: a row that does not fit in `max_len` is an error, so a k-shot prompt
    always holds its `k` complete shots.

    **Arguments:**

    - `prompts`, `answers`: the same number of strings (answers non-empty).
    - `max_len`: row length (the evaluation context).
    - `pad_id`: filler token id.

    **Returns:** a [`TeacherForcedBatch`][].

    !!! Example

        >>> b = teacher_forced_batch(["1+1="], ["2"], max_len=8)
        >>> decode(b.tokens[0, :5]), b.positions.tolist(), decode(b.targets[0])
        ('1+1=2', [[3]], '2')
    """
    if isinstance(prompts, str) or isinstance(answers, str):
        raise TypeError("`prompts` and `answers` must be lists of strings, not one string.")
    if len(prompts) != len(answers):
        raise ValueError(
            f"`prompts` ({len(prompts)}) and `answers` ({len(answers)}) differ in length."
        )
    max_len = _check_count("max_len", max_len, minimum=2)
    if not 0 <= pad_id < VOCAB_SIZE:
        raise ValueError(f"`pad_id` must lie in 0..{VOCAB_SIZE - 1}, got {pad_id}.")
    enc_p = [encode(p) for p in prompts]
    enc_a = [encode(a) for a in answers]
    width = max((len(a) for a in enc_a), default=1)
    n = len(prompts)
    tokens = np.full((n, max_len), pad_id, dtype=np.int32)
    positions = np.zeros((n, width), dtype=np.int32)
    targets = np.zeros((n, width), dtype=np.int32)
    valid = np.zeros((n, width), dtype=bool)
    for i, (p, a) in enumerate(zip(enc_p, enc_a, strict=True)):
        if len(p) == 0 or len(a) == 0:
            raise ValueError(f"`prompts[{i}]` and `answers[{i}]` must be non-empty.")
        if len(p) + len(a) > max_len:
            raise ValueError(
                f"`prompts[{i}]` with its answer needs {len(p) + len(a)} tokens, more than "
                f"`max_len`={max_len}; use fewer shots (see shots_that_fit) or a longer context."
            )
        tokens[i, : len(p)] = p
        tokens[i, len(p) : len(p) + len(a)] = a
        # The prediction of answer token j is made at position len(p) - 1 + j.
        positions[i, : len(a)] = len(p) - 1 + np.arange(len(a))
        targets[i, : len(a)] = a
        valid[i, : len(a)] = True
    return TeacherForcedBatch(tokens, positions, targets, valid)


def teacher_forced_exact_match(
    logits_fn: Callable[[Any], Any],
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_len: int,
    batch_size: int | None = None,
    pad_id: int = 0,
) -> np.ndarray:
    """Whether every answer token is the argmax given the prompt and the earlier answer tokens.

    One `logits_fn` call per batch of `batch_size` rows of fixed shape `(batch_size,
    max_len)` (the last batch is filled with dummy rows), so a jitted model compiles once.
    `logits_fn` may return leading axes before `(B, T, V)` (e.g. seeds of a vmapped
    ensemble); the result then has them too.

    **Arguments:**

    - `logits_fn`: `tokens_BxT int32 -> logits (..., B, T, V)`, causal.
    - `prompts`, `answers`: as in [`teacher_forced_batch`][].
    - `max_len`: row length.
    - `batch_size`: rows per call; default: all rows in one call.
    - `pad_id`: filler token id.

    **Returns:** a bool array `(..., N)`: exact match per example.

    !!! Example

        >>> sevens = lambda tokens: jnp.broadcast_to(
        ...     jnp.arange(256) == ord("7"), (*tokens.shape, 256)).astype(jnp.float32)
        >>> teacher_forced_exact_match(sevens, ["3+4=", "1+1="], ["7", "2"], max_len=8).tolist()
        [True, False]
    """
    batch = teacher_forced_batch(prompts, answers, max_len=max_len, pad_id=pad_id)
    n = len(prompts)
    if n == 0:
        return np.zeros((0,), dtype=bool)
    batch_size = _check_count("batch_size", n if batch_size is None else batch_size, minimum=1)
    hits = []
    for start in range(0, n, batch_size):
        rows = slice(start, min(n, start + batch_size))
        m = rows.stop - rows.start
        buf = np.full((batch_size, max_len), pad_id, dtype=np.int32)
        buf[:m] = batch.tokens[rows]
        logits = logits_fn(jnp.asarray(buf))
        if logits.ndim < 3 or tuple(logits.shape[-3:-1]) != buf.shape:
            raise ValueError(
                f"`logits_fn` must map tokens {buf.shape} to logits (..., B, T, V) with "
                f"B, T = {buf.shape}; got shape {tuple(logits.shape)}."
            )
        pred = np.asarray(jnp.argmax(logits, axis=-1))[..., :m, :]  # (..., m, T)
        idx = np.broadcast_to(batch.positions[rows], (*pred.shape[:-1], batch.positions.shape[1]))
        got = np.take_along_axis(pred, idx, axis=-1)
        ok = (got == batch.targets[rows]) | ~batch.valid[rows]
        hits.append(ok.all(axis=-1))
    return np.concatenate(hits, axis=-1)


def greedy_generate(
    logits_fn: Callable[[Any], Any],
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    max_len: int,
    batch_size: int | None = None,
    pad_id: int = 0,
) -> list[str]:
    """Greedy decoding with fixed shapes, for any causal byte-level model.

    Each prompt is byte-encoded, cut from the left to `max_len - max_new_tokens` tokens,
    and written at the start of a row of a `(batch_size, max_len)` int32 buffer padded with
    `pad_id` on the right. Each step runs `logits_fn` on the whole buffer, takes the argmax
    at every row's last filled position and writes it one position further. The buffer's
    shape never changes, so a jitted `logits_fn` compiles once; right padding is harmless
    because a causal model's logits at position `t` ignore later positions (that is the
    one assumption on `logits_fn`). The last chunk is padded with dummy rows.

    **Arguments:**

    - `logits_fn`: `logits_fn(tokens_BxT int32) -> logits_BxTxV`, causal, with
      `V = 256` (a larger `V` works as long as the argmax stays a byte).
    - `prompts`: non-empty prompt strings.
    - `max_new_tokens`: tokens to generate per prompt.
    - `max_len`: buffer length `T`, at least `max_new_tokens + 1`.
    - `batch_size`: rows per `logits_fn` call; default `len(prompts)` (one call per step).
    - `pad_id`: filler token id.

    **Returns:**

    One decoded continuation (without the prompt) per prompt.

    !!! Example

        >>> sevens = lambda tokens: jnp.broadcast_to(
        ...     jnp.arange(256) == ord("7"), (*tokens.shape, 256)).astype(jnp.float32)
        >>> greedy_generate(sevens, ["1+6=", "x"], 3, max_len=16)
        ['777', '777']
    """
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, minimum=1)
    max_len = _check_count("max_len", max_len, minimum=max_new_tokens + 1)
    if isinstance(prompts, str):
        raise TypeError("`prompts` must be a list of strings, not a single string.")
    if not prompts:
        return []
    if batch_size is None:
        batch_size = len(prompts)
    batch_size = _check_count("batch_size", batch_size, minimum=1)
    if not 0 <= pad_id < VOCAB_SIZE:
        raise ValueError(f"`pad_id` must lie in 0..{VOCAB_SIZE - 1}, got {pad_id}.")
    budget = max_len - max_new_tokens
    encoded = []
    for i, p in enumerate(prompts):
        ids = encode(p)
        if len(ids) == 0:
            raise ValueError(f"`prompts[{i}]` is empty; greedy decoding needs a first token.")
        encoded.append(ids[-budget:])

    rows = np.arange(batch_size)
    out: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        buf = np.full((batch_size, max_len), pad_id, dtype=np.int32)
        lens = np.ones(batch_size, dtype=np.int64)  # dummy rows: one pad token
        for r, ids in enumerate(chunk):
            buf[r, : len(ids)] = ids
            lens[r] = len(ids)
        first = lens.copy()
        for _ in range(max_new_tokens):
            logits = jnp.asarray(logits_fn(jnp.asarray(buf)))
            if logits.ndim != 3 or logits.shape[:2] != buf.shape:
                raise ValueError(
                    f"`logits_fn` must map tokens {buf.shape} to logits (B, T, V) with "
                    f"B, T = {buf.shape}; got shape {logits.shape}."
                )
            nxt = np.asarray(jnp.argmax(logits[rows, lens - 1], axis=-1))
            buf[rows, lens] = nxt
            lens += 1
        for r in range(len(chunk)):
            out.append(decode(buf[r, first[r] : first[r] + max_new_tokens]))
    return out


def finetune_examples_to_batch(
    examples: Sequence[Example], seq_len: int, *, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Token rows and an answer-only loss mask for fine-tuning on a few examples.

    Each example becomes the bytes of `f"{prompt}{answer}\\n"` (the few-shot line format),
    right-padded with `pad_id` to `seq_len + 1` tokens, as in the training pipeline (inputs
    `tokens[:, :-1]`, targets `tokens[:, 1:]`). The mask is 1 exactly where the target is
    one of the answer's tokens.

    **Arguments:**

    - `examples`: the fine-tuning examples (e.g. 64 from a pool of [`make_splits`][]).
    - `seq_len`: model context length; every example must fit in `seq_len + 1` tokens.
    - `pad_id`: filler token id.

    **Returns:**

    `(tokens, loss_mask)`: int32 `(N, seq_len + 1)` and float32 `(N, seq_len)`.

    !!! Example

        >>> tokens, mask = finetune_examples_to_batch([Example("5+3-2=", "6")], seq_len=8)
        >>> decode(tokens[0, 1:][mask[0] == 1])
        '6'
    """
    if not examples:
        raise ValueError("`examples` is empty.")
    seq_len = _check_count("seq_len", seq_len, minimum=1)
    if not 0 <= pad_id < VOCAB_SIZE:
        raise ValueError(f"`pad_id` must lie in 0..{VOCAB_SIZE - 1}, got {pad_id}.")
    tokens = np.full((len(examples), seq_len + 1), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), seq_len), dtype=np.float32)
    for i, ex in enumerate(examples):
        n_prompt = len(encode(ex.prompt))
        if n_prompt == 0:
            raise ValueError(f"`examples[{i}]` has an empty prompt.")
        ids = encode(f"{ex.prompt}{ex.answer}\n")
        if len(ids) > seq_len + 1:
            raise ValueError(
                f"`examples[{i}]` needs {len(ids)} tokens, more than `seq_len` + 1 = "
                f"{seq_len + 1}; raise `seq_len` to at least {len(ids) - 1}."
            )
        tokens[i, : len(ids)] = ids
        # Target t is token t + 1, so the answer's tokens [P, P + A) are targets [P-1, P+A-1).
        mask[i, n_prompt - 1 : n_prompt - 1 + len(encode(ex.answer))] = 1.0
    return tokens, mask
