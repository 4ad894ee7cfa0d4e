"""Tests of stackops_harness/primitives.py: task generators and model-agnostic evals."""

import doctest
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stackops_harness import data, primitives
from stackops_harness.primitives import Example

# --------------------------------------------------------------------------- checkers
# Independent re-implementations: they parse the prompt text and recompute the answer.


def solve_varassign(prompt: str) -> tuple[str, int]:
    """(answer, depth) of a variable-assignment prompt; asserts it is well-formed."""
    *assignments, query = prompt.split(",")
    m = re.fullmatch(r"([a-z])=\?", query)
    assert m, prompt
    env: dict[str, str] = {}
    for a in assignments:
        m2 = re.fullmatch(r"([a-z])=([a-z0-9])", a)
        assert m2, a
        var, rhs = m2.groups()
        assert var not in env, f"{var} assigned twice in {prompt}"
        assert rhs.isdigit() or rhs in env, f"{rhs} used before assignment in {prompt}"
        env[var] = rhs
    value, depth = env[m.group(1)], 0
    while not value.isdigit():
        value, depth = env[value], depth + 1
    return value, depth


def solve_math(prompt: str) -> str:
    assert re.fullmatch(r"\d([+-]\d){2,3}=", prompt), prompt
    value = int(prompt[0])
    for op, digit in zip(prompt[1:-1:2], prompt[2:-1:2], strict=True):
        value = value + int(digit) if op == "+" else value - int(digit)
        assert 0 <= value <= 9, f"intermediate result out of 0..9 in {prompt}"
    return str(value)


def solve_induction(prompt: str) -> str:
    seq_text, query_text = prompt.split(" | ")
    seq, query = seq_text.split(" "), query_text.split()
    assert query_text.endswith(" ") and len(query) == 2
    assert all(re.fullmatch("[a-z]{2}", item) for item in seq + query)
    for j in range(len(seq) - len(query)):
        if seq[j : j + len(query)] == query:
            return seq[j + len(query)]
    raise AssertionError(f"query not followed by an item in {prompt}")


def solve(task: str, prompt: str) -> str:
    if task == "recall":
        return {e.prompt: e.answer for e in primitives.recall_table()}[prompt]
    if task == "induction":
        return solve_induction(prompt)
    if task == "math":
        return solve_math(prompt)
    return solve_varassign(prompt)[0]


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("task", primitives.TASKS)
def test_generators_are_deterministic_distinct_and_correct(task):
    examples = primitives.generate(task, 300, seed=4)
    assert examples == primitives.generate(task, 300, seed=4)
    assert examples != primitives.generate(task, 300, seed=5)
    assert examples != primitives.generate(task, 300, seed=4, stream="pool")
    assert len({e.prompt for e in examples}) == len(examples)
    for e in examples:
        assert e.answer == solve(task, e.prompt), e
        if task == "induction":
            assert re.fullmatch("[a-z]{2}", e.answer)
        else:
            assert re.fullmatch("[0-9]", e.answer)
        assert len(e.prompt) + len(e.answer) + 1 <= primitives.max_line_length(task)


def _chains(prompt: str) -> list[list[str]]:
    """The chains of a variable-assignment prompt, each from its literal to its end."""
    pairs = dict(p.split("=") for p in prompt.split(",")[:-1])
    heads = [v for v, rhs in pairs.items() if rhs.isdigit()]
    chains = []
    for h in heads:
        chain = [h]
        while nxt := [v for v, rhs in pairs.items() if rhs == chain[-1]]:
            assert len(nxt) == 1, prompt  # chains never branch
            chain += nxt
        chains.append(chain)
    return chains


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_varassign_has_parallel_chains_of_equal_depth(depth):
    examples = primitives.generate(f"varassign_d{depth}", 300, seed=0)
    for e in examples:
        assert solve_varassign(e.prompt)[1] == depth
        chains = _chains(e.prompt)
        assert len(chains) == primitives.VARASSIGN_CHAINS
        assert all(len(c) == depth + 1 for c in chains)  # equal depth: no chain stands out
        literals = [c for c in e.prompt if c.isdigit()]
        assert len(set(literals)) == len(literals) == primitives.VARASSIGN_CHAINS
        query = e.prompt.rsplit(",", 1)[1][0]
        assert sum(c[-1] == query for c in chains) == 1  # the query ends exactly one chain
    answers = [e.answer for e in examples]
    assert set(answers) == set("0123456789")  # every digit can be the answer


def test_shortcut_guesser_gains_nothing_on_parallel_chains():
    # On the old format (the query chain references its root, distractor links point at
    # random variables) the shortcut beats the informed guess; on parallel chains it cannot.
    old = primitives.Example("a=5,b=3,c=a,c=?", "5")
    assert primitives.floors("varassign_d1", [old])["shortcut"] == 1.0
    for depth in (0, 1, 2):
        f = primitives.floors(f"varassign_d{depth}",
                              primitives.generate(f"varassign_d{depth}", 500, seed=0))
        assert f["shortcut"] == pytest.approx(1 / primitives.VARASSIGN_CHAINS)
        assert f["informed"] == pytest.approx(1 / primitives.VARASSIGN_CHAINS)
        assert f["floor"] == max(f["uniform"], f["informed"], f["shortcut"])


def test_floors_for_math_and_recall_are_the_most_frequent_answer():
    exs = [primitives.Example("1+1+1=", "3")] * 3 + [primitives.Example("1+1-1=", "1")]
    f = primitives.floors("math", exs)
    assert f["informed"] == 0.75 and f["shortcut"] is None and f["floor"] == 0.75
    with pytest.raises(ValueError, match="`examples`"):
        primitives.floors("math", [])


def test_math_uses_three_and_four_operands_and_all_results():
    examples = primitives.generate("math", 300, seed=0)
    lengths = {len(e.prompt) for e in examples}
    assert lengths == {6, 8}
    assert {e.answer for e in examples} == set("0123456789")
    shares = primitives.math_kind_shares(examples)
    assert set(shares) == {2, 3} and sum(shares.values()) == pytest.approx(1.0)


def test_recall_facts_are_fixed_and_eval_and_pool_share_them():
    table = primitives.recall_table()
    assert table == primitives.recall_table() and len(table) == primitives.RECALL_FACTS
    assert len({e.prompt for e in table}) == len(table)
    splits = primitives.make_splits("recall", n_eval=500, n_pool=64)
    assert {e.prompt for e in splits.pool} <= {e.prompt for e in table}
    assert {e.prompt for e in splits.pool} & {e.prompt for e in splits.eval}  # closed book


@pytest.mark.parametrize("task", primitives.TASKS)
def test_shots_that_fit_is_the_most_complete_shots_the_context_holds(task):
    context = 128
    k = primitives.shots_that_fit(task, context)
    assert 0 <= k <= primitives.MAX_SHOTS
    splits = primitives.make_splits(task, n_eval=200, n_pool=64)
    prompts = primitives.k_shot_prompts(splits.eval, splits.pool, k=k)
    rows = primitives.teacher_forced_batch(prompts, [e.answer for e in splits.eval],
                                           max_len=context)
    assert rows.tokens.shape == (200, context)
    for p in prompts:
        assert p.count("\n") == k  # k complete shots, nothing cut
    if k < primitives.MAX_SHOTS:  # one more shot of the longest line would not fit
        line = primitives.max_line_length(task)
        assert (k + 1) * line + line - 1 > context


def test_induction_answer_follows_the_first_occurrence(monkeypatch):
    # With three items, queries repeat with different followers: the first one counts.
    monkeypatch.setattr(primitives, "INDUCTION_ITEMS", ("aa", "bb", "cc"))
    examples = primitives.generate("induction", 200, seed=0)
    ambiguous = 0
    for e in examples:
        seq, query = e.prompt.split(" | ")[0].split(), e.prompt.split(" | ")[1].split()
        assert len(seq) == primitives.INDUCTION_LENGTH
        followers = {seq[j + 2] for j in range(len(seq) - 2) if seq[j : j + 2] == query}
        ambiguous += len(followers) > 1
        assert e.answer == solve_induction(e.prompt)
    assert ambiguous > 20
    assert solve_induction("ab cd ef ab cd gh | ab cd ") == "ef"


@pytest.mark.parametrize("task", [t for t in primitives.TASKS if t != "recall"])
def test_splits_keep_eval_prompts_out_of_the_pool(task):
    splits = primitives.make_splits(task, n_eval=400, n_pool=200)
    assert len(splits.eval) == 400 and len(splits.pool) == 200
    assert {e.prompt for e in splits.eval}.isdisjoint(e.prompt for e in splits.pool)
    assert splits.eval == primitives.generate(task, 400, seed=0)
    other = primitives.make_splits(task, n_eval=400, n_pool=200, pool_seed=1)
    assert other.eval == splits.eval and other.pool != splits.pool


def test_disjointness_check_matters_for_small_tasks():
    # The math task has ~1300 distinct prompts: independent streams collide, the split not.
    eval_prompts = {e.prompt for e in primitives.generate("math", 800, seed=0)}
    raw_pool = primitives.generate("math", 200, seed=0, stream="pool")
    assert eval_prompts & {e.prompt for e in raw_pool}
    splits = primitives.make_splits("math", n_eval=800, n_pool=200)
    assert eval_prompts.isdisjoint(e.prompt for e in splits.pool)


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`task`"):
        primitives.generate("sorting", 3, seed=0)
    with pytest.raises(ValueError, match="`n`"):
        primitives.generate("math", -1, seed=0)
    with pytest.raises(ValueError, match="`seed`"):
        primitives.generate("math", 1, seed=-1)
    with pytest.raises(ValueError, match="`stream`"):
        primitives.generate("math", 1, seed=0, stream="train")
    with pytest.raises(ValueError, match="distinct.*`n`"):
        primitives.generate("recall", primitives.RECALL_FACTS + 1, seed=0)
    assert primitives.generate("math", 0, seed=0) == []


def test_chance_accuracy():
    assert primitives.chance_accuracy("induction") == pytest.approx(1 / 676)
    for task in ("varassign_d0", "varassign_d1", "varassign_d2", "math", "recall"):
        assert primitives.chance_accuracy(task) == 0.1
    with pytest.raises(ValueError, match="`task`"):
        primitives.chance_accuracy("nope")


# --------------------------------------------------------------------------- evaluation


def test_few_shot_prompt_format():
    shots = [Example("1+1=", "2"), Example("a=3,a=?", "3")]
    assert primitives.few_shot_prompt(shots, Example("4-1=", "3")) == "1+1=2\na=3,a=?3\n4-1="
    assert primitives.few_shot_prompt([], Example("4-1=", "3")) == "4-1="


def test_is_exact_match():
    assert primitives.is_exact_match("3", "3")
    assert primitives.is_exact_match(" 3\n", "3")
    assert primitives.is_exact_match("ab\nxx", "ab")
    assert not primitives.is_exact_match("\n3", "3")
    assert not primitives.is_exact_match("a", "ab")
    assert not primitives.is_exact_match("4", "3")


def _oracle(task):
    def generate_fn(prompts, max_new_tokens):
        return [solve(task, p.rsplit("\n", 1)[-1]) + "\n" for p in prompts]

    return generate_fn


@pytest.mark.parametrize("task", primitives.TASKS)
def test_evaluate_exact_match_oracle_scores_one_constant_scores_low(task):
    splits = primitives.make_splits(task, n_eval=100, n_pool=20)
    assert primitives.evaluate_exact_match(_oracle(task), splits.eval, splits.pool) == 1.0
    constant = primitives.evaluate_exact_match(
        lambda prompts, n: ["5"] * len(prompts), splits.eval, splits.pool
    )
    assert constant <= 0.3
    wrong = primitives.evaluate_exact_match(
        lambda prompts, n: ["#"] * len(prompts), splits.eval, splits.pool, k=0
    )
    assert wrong == 0.0


def test_evaluate_exact_match_builds_k_shot_prompts_without_the_query():
    splits = primitives.make_splits("varassign_d1", n_eval=30, n_pool=10)
    seen = []

    def spy(prompts, max_new_tokens):
        seen.append((list(prompts), max_new_tokens))
        return _oracle("varassign_d1")(prompts, max_new_tokens)

    # A pool that contains the evaluation examples themselves: they must never be a shot.
    pool = splits.pool + splits.eval
    primitives.evaluate_exact_match(spy, splits.eval, pool, k=5, seed=3)
    ((prompts, max_new_tokens),) = seen
    assert max_new_tokens == 1
    assert len(prompts) == len(splits.eval)
    known = {f"{e.prompt}{e.answer}" for e in pool}
    for prompt, query in zip(prompts, splits.eval, strict=True):
        *shot_lines, last = prompt.split("\n")
        assert last == query.prompt
        assert len(shot_lines) == 5 and len(set(shot_lines)) == 5
        assert all(line in known for line in shot_lines)
        assert f"{query.prompt}{query.answer}" not in shot_lines

    primitives.evaluate_exact_match(spy, splits.eval, pool, k=5, seed=3)
    primitives.evaluate_exact_match(spy, splits.eval, pool, k=5, seed=4)
    assert seen[1][0] == seen[0][0] and seen[2][0] != seen[0][0]


def test_evaluate_exact_match_rejects_bad_inputs():
    splits = primitives.make_splits("math", n_eval=5, n_pool=3)
    ok = _oracle("math")
    with pytest.raises(ValueError, match="`shots_pool`.*`k`"):
        primitives.evaluate_exact_match(ok, splits.eval, splits.pool, k=5)
    with pytest.raises(ValueError, match="`examples`"):
        primitives.evaluate_exact_match(ok, [], splits.pool, k=1)
    with pytest.raises(ValueError, match="`generate_fn`"):
        primitives.evaluate_exact_match(lambda p, n: ["1"], splits.eval, splits.pool, k=1)
    with pytest.raises(ValueError, match="`k`"):
        primitives.evaluate_exact_match(ok, splits.eval, splits.pool, k=-1)


def _always(byte: str):
    def logits_fn(tokens):
        return jnp.broadcast_to(
            (jnp.arange(256) == ord(byte)).astype(jnp.float32), (*tokens.shape, 256)
        )

    return logits_fn


def _successor(tokens):
    """Predicts token + 1 at every position: a causal model that exposes indexing bugs."""
    return jax.nn.one_hot((tokens + 1) % 256, 256)


def test_greedy_generate_with_a_constant_model():
    out = primitives.greedy_generate(_always("7"), ["5+2=", "a"], 4, max_len=16)
    assert out == ["7777", "7777"]


def test_greedy_generate_continues_each_prompt_from_its_own_end():
    prompts = ["abc", "x", "klmnop", "0", "AB"]
    shapes = []

    def logits_fn(tokens):
        shapes.append(tokens.shape)
        return _successor(tokens)

    out = primitives.greedy_generate(logits_fn, prompts, 3, max_len=12, batch_size=2)
    assert out == ["def", "yz{", "qrs", "123", "CDE"]
    assert set(shapes) == {(2, 12)}  # fixed shape, dummy rows fill the last batch


def test_greedy_generate_compiles_a_jitted_model_once():
    traces = []

    @jax.jit
    def logits_fn(tokens):
        traces.append(tokens.shape)
        return _successor(tokens)

    prompts = [e.prompt for e in primitives.generate("math", 7, seed=0)]
    out = primitives.greedy_generate(logits_fn, prompts, 2, max_len=10, batch_size=4)
    assert len(traces) == 1
    assert all(len(o) == 2 for o in out)


def test_greedy_generate_truncates_long_prompts_from_the_left():
    rows = []

    def logits_fn(tokens):
        rows.append(np.asarray(tokens))
        return _successor(tokens)

    out = primitives.greedy_generate(logits_fn, ["0123456789abcdef"], 2, max_len=8)
    assert data.decode(rows[0][0, :6]) == "abcdef"
    assert out == ["gh"]


def test_greedy_generate_rejects_bad_inputs():
    ok = _always("7")
    with pytest.raises(ValueError, match="`max_len`"):
        primitives.greedy_generate(ok, ["a"], 4, max_len=4)
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        primitives.greedy_generate(ok, ["a"], 0, max_len=4)
    with pytest.raises(ValueError, match=r"`prompts\[1\]`"):
        primitives.greedy_generate(ok, ["a", ""], 1, max_len=4)
    with pytest.raises(TypeError, match="`prompts`"):
        primitives.greedy_generate(ok, "abc", 1, max_len=4)
    with pytest.raises(ValueError, match="`logits_fn`"):
        primitives.greedy_generate(lambda t: jnp.zeros((1, 256)), ["a"], 1, max_len=4)
    assert primitives.greedy_generate(ok, [], 1, max_len=4) == []


def test_greedy_generate_and_evaluate_together():
    splits = primitives.make_splits("math", n_eval=20, n_pool=10)

    def generate_fn(prompts, max_new_tokens):
        return primitives.greedy_generate(_always("7"), prompts, max_new_tokens, max_len=128)

    score = primitives.evaluate_exact_match(generate_fn, splits.eval, splits.pool, k=5)
    assert score == pytest.approx(np.mean([e.answer == "7" for e in splits.eval]))


def _peek(tokens):
    """Predicts the token that really comes next in the row: right at every answer position
    exactly when the scoring looks at the right positions."""
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    return jax.nn.one_hot(nxt, 256)


def test_teacher_forcing_scores_every_answer_token_at_its_position():
    prompts = ["ab cd | ab ", "1+1=", "x=3,x=?"]
    answers = ["cd", "2", "3"]
    hits = primitives.teacher_forced_exact_match(_peek, prompts, answers, max_len=16)
    assert hits.tolist() == [True, True, True]

    def wrong_second_token(tokens):  # right on the first answer token, wrong on the second
        logits = _peek(tokens)
        return logits.at[0, len(prompts[0])].set(jax.nn.one_hot(ord("#"), 256))

    hits = primitives.teacher_forced_exact_match(wrong_second_token, prompts, answers,
                                                 max_len=16)
    assert hits.tolist() == [False, True, True]
    assert not primitives.teacher_forced_exact_match(_always("2"), prompts, answers,
                                                     max_len=16)[0]


def test_teacher_forcing_agrees_with_greedy_decoding_on_a_causal_model():
    splits = primitives.make_splits("induction", n_eval=40, n_pool=8)
    prompts = primitives.k_shot_prompts(splits.eval, splits.pool, k=1)
    # A causal model: the successor of each token. Teacher forcing and greedy decoding see
    # the same prefixes, so they agree on every example.
    answers = [primitives.greedy_generate(_successor, [p], 2, max_len=80)[0] for p in prompts]
    answers[::2] = [e.answer for e in splits.eval[::2]]
    tf = primitives.teacher_forced_exact_match(_successor, prompts, answers, max_len=80,
                                               batch_size=7)
    greedy = [primitives.is_exact_match(g, a) for g, a in zip(
        primitives.greedy_generate(_successor, prompts, 2, max_len=80), answers, strict=True)]
    assert tf.tolist() == greedy and tf[1::2].all()


def test_teacher_forcing_keeps_leading_axes_and_compiles_once():
    traces = []

    @jax.jit
    def two_models(tokens):
        traces.append(tokens.shape)
        return jnp.stack([_peek(tokens), _always("#")(tokens)])

    prompts = [e.prompt for e in primitives.generate("math", 10, seed=0)]
    answers = [e.answer for e in primitives.generate("math", 10, seed=0)]
    hits = primitives.teacher_forced_exact_match(two_models, prompts, answers, max_len=12,
                                                 batch_size=4)
    assert hits.shape == (2, 10) and hits[0].all() and not hits[1].any()
    assert traces == [(4, 12)]


def test_teacher_forcing_never_cuts_a_prompt():
    with pytest.raises(ValueError, match=r"`prompts\[0\]`.*`max_len`=8"):
        primitives.teacher_forced_batch(["0123456"], ["78"], max_len=8)
    with pytest.raises(ValueError, match="differ in length"):
        primitives.teacher_forced_batch(["a"], [], max_len=8)
    with pytest.raises(ValueError, match="`logits_fn`"):
        primitives.teacher_forced_exact_match(lambda t: jnp.zeros((1, 256)), ["a"], ["b"],
                                              max_len=4)


def test_finetune_batch_masks_only_the_answer():
    examples = primitives.generate("induction", 8, seed=0) + primitives.generate(
        "varassign_d2", 8, seed=0
    )
    tokens, mask = primitives.finetune_examples_to_batch(examples, seq_len=64)
    assert tokens.shape == (16, 65) and tokens.dtype == np.int32
    assert mask.shape == (16, 64) and mask.dtype == np.float32
    targets = tokens[:, 1:]
    for i, e in enumerate(examples):
        text = f"{e.prompt}{e.answer}\n"
        assert data.decode(tokens[i, : len(text)]) == text
        assert np.all(tokens[i, len(text) :] == 0)
        assert data.decode(targets[i][mask[i] == 1]) == e.answer
        assert mask[i].sum() == len(e.answer)


def test_finetune_batch_rejects_examples_that_do_not_fit():
    with pytest.raises(ValueError, match="`seq_len`.*at least 7"):
        primitives.finetune_examples_to_batch([Example("5+3-2=", "6")], seq_len=6)
    tokens, _ = primitives.finetune_examples_to_batch([Example("5+3-2=", "6")], seq_len=7)
    assert tokens.shape == (1, 8)
    with pytest.raises(ValueError, match="`examples`"):
        primitives.finetune_examples_to_batch([], seq_len=8)
    with pytest.raises(ValueError, match=r"`examples\[0\]`.*empty prompt"):
        primitives.finetune_examples_to_batch([Example("", "6")], seq_len=8)


def test_docstring_examples_run():
    result = doctest.testmod(primitives, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
