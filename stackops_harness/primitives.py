"""Reasoning primitives: small synthetic tasks as text, and model-agnostic evaluation.

Five tasks, each an [`Example`][] of a prompt and a short answer, byte-tokenized like the
training text:

- `"induction"`: random two-letter items, then `|` and a query of two consecutive items
  seen earlier; the answer is the item that followed the query's first occurrence.
  `"qa zx mp ko lr ty | mp ko "` → `"lr"`.
- `"varassign_d0"`, `"varassign_d1"`, `"varassign_d2"`: comma-separated assignments, then a
  query; depth `d` follows `d` links `x=y` before reaching a digit. Every variable is
  assigned once, before any use, and there are distractor literals and distractor links.
  `"a=5,b=3,c=b,d=b,e=c,e=?"` → `"3"` (depth 2: e→c→b→3).
- `"math"`: one-digit additions and subtractions with two or three operands, every
  intermediate result in `0..9`. `"5+3-2="` → `"6"`.

**Held-out data.** [`generate`][] draws from one random stream per `(seed, task, stream)`
(a `numpy.random.SeedSequence` spawn key), so the `"eval"` and `"pool"` streams never share
random numbers. Because small tasks (math) can still produce the same prompt twice,
[`make_splits`][] also removes from the pool (the source of few-shot examples and of
fine-tuning examples) every prompt that is in the evaluation set, and
[`evaluate_exact_match`][] never uses a shot whose prompt equals the query's.

**Evaluation.** [`evaluate_exact_match`][] needs only a `generate_fn(prompts,
max_new_tokens) -> completions`; [`greedy_generate`][] builds one from any causal
`logits_fn`, with fixed shapes so that a jitted `logits_fn` compiles once.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from .data import VOCAB_SIZE, decode, encode

TASKS = ("induction", "varassign_d0", "varassign_d1", "varassign_d2", "math")
"""Names accepted by [`generate`][]."""

STREAMS = ("eval", "pool")
"""Random streams of [`generate`][]: held-out evaluation sets, and few-shot/fine-tune pools."""

INDUCTION_ITEMS = tuple(a + b for a in string.ascii_lowercase for b in string.ascii_lowercase)
"""The 676 two-letter items of the induction task."""

INDUCTION_LENGTH = 12
"""Items in an induction sequence (before the query)."""

INDUCTION_QUERY_LEN = 2
"""Items in an induction query."""

VARASSIGN_DISTRACTORS = (2, 2)
"""Distractor literals and distractor links added to every variable-assignment prompt."""

# Consecutive duplicate draws after which generate() concludes the task has run out of new
# prompts (only the math task, with 1320 distinct prompts, gets near that).
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
    n_lit, n_link = VARASSIGN_DISTRACTORS
    n_vars = 1 + depth + n_lit + n_link
    names = [string.ascii_lowercase[i] for i in rng.choice(26, size=n_vars, replace=False)]
    answer = int(rng.integers(10))
    # rhs[k] is a digit or the index of an earlier variable: the definitions form a DAG.
    rhs: list[int | str] = [str(answer)]
    rhs += list(range(depth))  # the query chain: names[k + 1] = names[k]
    rhs += [str(int(d)) for d in rng.integers(10, size=n_lit)]
    rhs += [int(rng.integers(1 + depth + n_lit + i)) for i in range(n_link)]
    # A random topological order: any variable may come first once its source is defined.
    placed: list[int] = []
    ready = [k for k in range(n_vars) if isinstance(rhs[k], str)]
    while ready:
        k = ready.pop(int(rng.integers(len(ready))))
        placed.append(k)
        ready += [j for j in range(n_vars) if rhs[j] == k]
    parts = [f"{names[k]}={rhs[k] if isinstance(rhs[k], str) else names[rhs[k]]}" for k in placed]
    prompt = ",".join(parts) + f",{names[depth]}=?"
    return Example(prompt=prompt, answer=str(answer))


def _math(rng: np.random.Generator) -> Example:
    while True:
        n_ops = int(rng.integers(1, 3))
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


def _one(task_index: int, rng: np.random.Generator) -> Example:
    task = TASKS[task_index]
    if task == "induction":
        return _induction(rng)
    if task == "math":
        return _math(rng)
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

    - `task`: one of [`TASKS`][]: `"induction"`, `"varassign_d0"`, `"varassign_d1"`,
      `"varassign_d2"`, `"math"`.
    - `n`: number of examples.
    - `seed`: non-negative seed.
    - `stream`: `"eval"` for held-out sets, `"pool"` for few-shot/fine-tuning pools.
    - `exclude`: prompts that must not be generated (e.g. an evaluation set's).

    **Returns:**

    A list of `n` [`Example`][]s with distinct prompts.

    !!! Example

        >>> generate("math", 2, seed=0)
        [Example(prompt='1-1=', answer='0'), Example(prompt='2+3=', answer='5')]
        >>> generate("varassign_d2", 1, seed=0)[0]
        Example(prompt='e=9,n=2,a=0,f=n,d=e,z=n,r=z,r=?', answer='2')
    """
    task_index = _check_task(task)
    n = _check_count("n", n, minimum=0)
    seed = _check_count("seed", seed, minimum=0)
    if stream not in STREAMS:
        raise ValueError(f"`stream` must be one of {STREAMS}, got {stream!r}.")
    rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(task_index, STREAMS.index(stream)))
    )
    seen = set(exclude)
    out: list[Example] = []
    misses = 0
    while len(out) < n and misses < _MAX_MISSES:
        ex = _one(task_index, rng)
        if ex.prompt in seen:
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
    """A held-out evaluation set and a disjoint pool for few-shot shots and fine-tuning.

    The evaluation set is `generate(task, n_eval, seed=eval_seed, stream="eval")`; the pool
    comes from the `"pool"` stream and skips every evaluation prompt. Keep `eval_seed`
    fixed and vary `pool_seed` to fine-tune several runs on different examples.

    **Arguments:**

    - `task`: a task name, see [`generate`][].
    - `n_eval`, `n_pool`: sizes of the two sets.
    - `eval_seed`, `pool_seed`: seeds of the two streams.

    **Returns:**

    `Splits(eval=[...], pool=[...])`, with no prompt in both.

    !!! Example

        >>> s = make_splits("math", n_eval=300, n_pool=64)
        >>> len(s.eval), len(s.pool), {e.prompt for e in s.eval} & {e.prompt for e in s.pool}
        (300, 64, set())
    """
    eval_set = generate(task, n_eval, seed=eval_seed, stream="eval")
    pool = generate(
        task, n_pool, seed=pool_seed, stream="pool", exclude={e.prompt for e in eval_set}
    )
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
    k = _check_count("k", k, minimum=0)
    if max_new_tokens is None:
        max_new_tokens = max(len(encode(e.answer)) for e in examples)
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, minimum=1)
    rng = np.random.default_rng(seed)
    prompts = []
    for ex in examples:
        candidates = [s for s in shots_pool if s.prompt != ex.prompt]
        if len(candidates) < k:
            raise ValueError(
                f"`shots_pool` has {len(candidates)} usable shots for a query, fewer than "
                f"`k`={k}; pass a larger pool or a smaller `k`."
            )
        chosen = rng.choice(len(candidates), size=k, replace=False) if k else []
        prompts.append(few_shot_prompt([candidates[i] for i in chosen], ex))
    completions = list(generate_fn(prompts, max_new_tokens))
    if len(completions) != len(prompts):
        raise ValueError(
            f"`generate_fn` returned {len(completions)} completions for {len(prompts)} prompts."
        )
    hits = sum(is_exact_match(c, ex.answer) for c, ex in zip(completions, examples, strict=True))
    return hits / len(examples)


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
