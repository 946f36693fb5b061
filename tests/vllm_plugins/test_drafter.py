"""Drafter logic without vLLM: suffix automaton vs brute force, the LRU output cache, copying,
adaptive draft length, per-request state, the batch protocol, config parsing and the method alias."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from longkit.errors import ConfigError, HostVersionError, LongkitError
from longkit.vllm_plugins.patching import is_wrapped, unwrap_method, wrap_method
from longkit.vllm_plugins.spec import (
    PROPOSER_PATH,
    BatchDrafter,
    OutputCache,
    SimulatedEngineClock,
    StepCostModel,
    SuffixAutomaton,
    SuffixDrafter,
    SuffixSpecConfig,
    replay,
    replay_batch,
)
from longkit.vllm_plugins.spec.method import rewrite_speculative_config


# -- suffix automaton ----------------------------------------------------------------------------
def _occurs(seq, pat):
    return any(seq[i : i + len(pat)] == pat for i in range(len(seq) - len(pat) + 1))


@pytest.mark.parametrize("alphabet", [2, 3, 7])
def test_automaton_longest_earlier_suffix_matches_brute_force(alphabet):
    rng = random.Random(alphabet)
    for _ in range(40):
        sam, seq = SuffixAutomaton(), []
        for _ in range(rng.randrange(1, 70)):
            seq.append(rng.randrange(alphabet))
            sam.extend([seq[-1]])
            n = len(seq)
            want = next((L for L in range(n - 1, 0, -1) if _occurs(seq[: n - 1], seq[n - L :])), 0)
            assert sam.match_len == want, seq
            if want:
                e = sam.match_end
                assert e < n - 1 and seq[e - want + 1 : e + 1] == seq[n - want :], seq
        assert sam.num_states <= 2 * len(seq) + 1


def test_automaton_prefers_most_recent_repetition():
    sam = SuffixAutomaton()
    sam.extend([1, 2, 3, 1, 2, 4, 1, 2])
    assert (sam.match_len, sam.match_end) == (2, 4)  # the later "1 2" (followed by 4), not the first
    assert sam.copy_from(sam.match_end, 2) == [4, 1]


def test_automaton_match_is_matching_statistics():
    rng = random.Random(0)
    for _ in range(200):
        seq = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        sam = SuffixAutomaton()
        sam.extend(seq)
        ctx = [rng.randrange(4) for _ in range(rng.randrange(1, 10))]
        n, end = sam.match(ctx)
        want = next((L for L in range(len(ctx), 0, -1) if _occurs(seq, ctx[-L:])), 0)
        assert n == want
        if n:
            assert seq[end - n + 1 : end + 1] == ctx[-n:]
        lengths = [m for m, _ in sam.matches(ctx)]
        assert lengths == sorted(lengths, reverse=True) and (not lengths or lengths[0] == n)


@pytest.mark.parametrize("max_len", [None, 1, 3, 6])
def test_walk_resumes_in_pieces_and_caps_like_a_window(max_len):
    rng = random.Random(max_len or 0)
    for _ in range(100):
        seq = [rng.randrange(3) for _ in range(rng.randrange(1, 40))]
        sam = SuffixAutomaton()
        sam.extend(seq)
        ctx = [rng.randrange(3) for _ in range(rng.randrange(1, 25))]
        state = (0, 0)
        for i in range(len(ctx)):  # one token at a time, as a growing request feeds it
            state = sam.walk(ctx[i : i + 1], state, max_len)
            window = ctx[: i + 1] if max_len is None else ctx[max(0, i + 1 - max_len) : i + 1]
            assert state == sam.walk(window)  # same state and length as a fresh walk of the window
        assert list(sam.suffix_matches(*state)) == sam.matches(window)


def test_copy_continues_a_periodic_tail_and_stops_at_separator():
    sam = SuffixAutomaton()
    sam.extend([9, 1, 2, 1, 2, 1, 2])
    assert sam.copy_from(sam.match_end, 6) == [1, 2, 1, 2, 1, 2]
    sam2 = SuffixAutomaton()
    sam2.extend([5, 6, 7, -1, 8])
    assert sam2.copy_from(0, 5) == [6, 7]
    assert sam2.copy_from(4, 3) == []  # nothing follows the last token


# -- global output cache -------------------------------------------------------------------------
def test_cache_lookup_returns_continuation_and_key():
    c = OutputCache(max_sequences=10, max_tokens=1000)
    c.add("a", [1, 2, 3, 4, 5])
    c.add("b", [7, 2, 3, 9, 9])
    n, cont, key = c.lookup([0, 7, 2, 3], 4)
    assert (n, cont, key) == (3, [9, 9], "b")
    assert c.lookup([1, 2], 2)[1:] == ([3, 4], "a")
    assert c.lookup([42], 3) == (0, [], None)


def test_cache_lru_eviction_by_count_and_tokens_and_touch():
    c = OutputCache(max_sequences=2, max_tokens=1000)
    c.add("a", [1, 2, 3])
    c.add("b", [4, 5, 6])
    c.touch("a")
    c.add("c", [7, 8, 9])  # evicts b (least recently used), keeps a (touched)
    assert c.keys() == ["a", "c"]
    assert c.lookup([4, 5], 1) == (0, [], None)  # evicted content is never drafted
    t = OutputCache(max_sequences=100, max_tokens=7)
    t.add("x", [1, 2, 3])
    t.add("y", [4, 5, 6])
    t.add("z", [7, 8])  # 8 tokens > 7: evict x
    assert t.keys() == ["y", "z"] and t.num_tokens == 5
    t.add("huge", list(range(100, 120)))  # longer than the whole budget: not stored
    assert "huge" not in t


def test_cache_dedupes_identical_outputs():
    c = OutputCache(max_sequences=10, max_tokens=1000)
    c.add("a", [1, 2, 3])
    c.add("b", [4, 5])
    c.add("a2", [1, 2, 3])  # same content: refresh "a" instead of storing twice
    assert c.keys() == ["b", "a"] and c.num_tokens == 5


def test_cache_random_operations_match_reference_through_rebuilds():
    rng = random.Random(1)
    c = OutputCache(max_sequences=6, max_tokens=60)
    ref: dict[int, list[int]] = {}
    for step in range(600):
        seq = [rng.randrange(5) for _ in range(rng.randrange(1, 15))]
        c.add(step, seq)
        if tuple(seq) not in {tuple(v) for v in ref.values()}:
            ref[step] = seq
        ref = {k: ref[k] for k in c.keys()}  # the cache decides the LRU order; check it kept the bounds
        assert len(ref) <= 6 and sum(map(len, ref.values())) <= 60
        exact = step % 7 == 0
        if exact:
            c.compact()
        ctx = [rng.randrange(5) for _ in range(rng.randrange(1, 6))]
        n, cont, key = c.lookup(ctx, 5)
        if n:  # a real match in a live sequence, and cont is what followed it there
            live = ref[key]
            assert any(
                live[i : i + n] == ctx[-n:] and live[i + n : i + n + len(cont)] == cont
                for i in range(len(live) - n + 1)
            )
        if exact:  # right after a rebuild: the longest live match, never a miss
            want = next((L for L in range(len(ctx), 0, -1) if any(_occurs(v, ctx[-L:]) for v in ref.values())), 0)
            assert n == want
    assert c.indexed_tokens <= 2 * (c.num_tokens + len(c)) + 1024 + 16  # dead tokens are reclaimed


def test_cache_matcher_equals_a_fresh_lookup_through_adds_evictions_and_rebuilds():
    rng = random.Random(2)
    c = OutputCache(max_sequences=5, max_tokens=50)
    depth = 4
    matchers = {}  # growing contexts, each with its own incremental matcher
    contexts: dict[int, list[int]] = {}
    for step in range(800):
        op = rng.random()
        if op < 0.15:
            c.add(step, [rng.randrange(4) for _ in range(rng.randrange(1, 12))])  # new version
        elif op < 0.2:
            c.compact()
        elif op < 0.25 or not contexts:
            contexts[step], matchers[step] = [], c.matcher(depth)
        key = rng.choice(list(contexts))
        ctx = contexts[key]
        ctx.extend(rng.randrange(4) for _ in range(rng.choice([0, 1, 1, 2, 7])))
        max_tokens = rng.randrange(0, 6)
        assert matchers[key].lookup(ctx, max_tokens) == c.lookup(ctx[-depth:], max_tokens), step


# -- drafter -------------------------------------------------------------------------------------
def test_copies_a_span_from_the_prompt():
    d = SuffixDrafter(SuffixSpecConfig(num_speculative_tokens=8, max_spec_factor=4.0, min_token_prob=0.0))
    span = list(range(100, 130))
    prompt = [1] + span + [2, 3]
    d.update("r", prompt + span[:4], num_prompt_tokens=len(prompt))
    assert d.propose("r") == span[4:12]


def test_reasked_prompt_is_drafted_from_the_global_cache():
    d = SuffixDrafter(SuffixSpecConfig(num_speculative_tokens=16))
    rng = random.Random(0)
    prompt = [rng.randrange(1000) for _ in range(40)]
    output = [rng.randrange(1000, 2000) for _ in range(60)]
    first = replay(d, "a", prompt, output)
    assert first.accepted_tokens == 0  # nothing to copy from: fresh random tokens
    assert d.active_requests == set() and len(d.cache) == 1
    second = replay(d, "b", prompt, output)
    assert second.accepted_tokens == second.draft_tokens > 0
    assert second.steps < first.steps / 3


def test_draft_length_caps():
    cfg = SuffixSpecConfig(num_speculative_tokens=5, max_spec_factor=1.0, min_token_prob=0.0)
    d = SuffixDrafter(cfg)
    d.update("r", [1, 2, 3, 4, 5, 6, 7, 8, 9, 1], num_prompt_tokens=10)
    assert d.propose("r") == [2]  # match length 1 -> at most 1 token (factor 1.0)
    d.update("r", list(range(1, 10)) * 3, num_prompt_tokens=10)
    assert len(d.propose("r")) == 5  # num_speculative_tokens
    assert len(d.propose("r", max_tokens=2)) == 2  # room left in the context
    assert d.propose("r", max_tokens=0) == []


def test_adaptive_length_shrinks_on_rejection_and_grows_on_acceptance():
    # No global cache: this test isolates the local (copy) source.
    d = SuffixDrafter(SuffixSpecConfig(num_speculative_tokens=16, max_spec_factor=4.0, max_cached_requests=0))
    span = list(range(500, 540))
    prompt = span + [1]
    prior = d.acceptance(0, 8)

    def step(i, model_repeats):
        d.update(i, prompt + span[:8], len(prompt))
        draft = d.propose(i)
        nxt = span[8 : 8 + len(draft) + 1] if model_repeats else [9999]
        d.update(i, prompt + span[:8] + nxt, len(prompt))
        d.finish(i)
        return len(draft)

    # The "model" never repeats the prompt's span: every copy is rejected at its first token.
    rejected = [step(i, False) for i in range(30)]
    assert d.acceptance(0, 8) < prior / 2 and rejected[-1] < rejected[0]
    # Now it repeats spans exactly: the estimate and the draft length recover.
    accepted = [step(i, True) for i in range(30, 150)]
    assert d.acceptance(0, 8) > prior and accepted[-1] > rejected[-1] and accepted[-1] == 16


def test_min_token_prob_turns_drafting_off_for_unreliable_matches():
    d = SuffixDrafter(SuffixSpecConfig(min_token_prob=0.5))
    d.update("r", [1, 2, 3, 9, 1], num_prompt_tokens=5)  # 1-token match: prior 0.3 < 0.5
    assert d.propose("r") == []


def test_state_is_freed_on_finish_and_reindexed_on_divergence():
    d = SuffixDrafter()
    d.update("r", [1, 2, 3], 2)
    d.update("r", [1, 2, 3, 4], 2)
    assert d.num_indexed("r") == 4
    d.update("r", [1, 2, 7, 8, 9], 2)  # history rewritten by the host: re-index from scratch
    assert d.num_indexed("r") == 5
    d.finish("r")
    d.finish("r")  # unknown id: no-op
    assert d.active_requests == set() and d.num_indexed("r") == 0
    assert d.cache.keys() == ["r"]


def test_replay_counts_match_vllm_definitions():
    d = SuffixDrafter(SuffixSpecConfig(num_speculative_tokens=4, max_spec_factor=8.0, min_token_prob=0.0))
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    res = replay(d, "r", prompt, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert res.output_tokens == 9 and res.accepted_tokens <= res.draft_tokens
    assert res.steps == res.output_tokens - res.accepted_tokens  # each step = accepted + 1 new token
    with pytest.raises(ValueError):
        replay(d, "x", prompt, [])


# -- batch protocol (what vLLM calls) ------------------------------------------------------------
def _batch(rows, max_len=64):
    ids = np.zeros((4, max_len), dtype=np.int32)
    for i, (_, toks, _) in enumerate(rows):
        ids[i, : len(toks)] = toks
    return SimpleNamespace(
        req_ids=[r[0] for r in rows],
        num_prompt_tokens=np.array([r[2] for r in rows] + [0] * (4 - len(rows))),
        token_ids_cpu=ids,
    ), np.array([len(r[1]) for r in rows] + [0] * (4 - len(rows)))


def test_batch_drafter_follows_rows_by_request_id_and_frees_state():
    bd = BatchDrafter(
        SuffixSpecConfig(num_speculative_tokens=4, max_spec_factor=4.0, min_token_prob=0.0), max_model_len=64
    )
    with pytest.raises(RuntimeError, match="before the runner hook"):
        bd.propose([[1]], [1], np.zeros((1, 4), dtype=np.int32))
    a = [5, 6, 7, 8, 9, 5, 6]
    b = [20, 21, 22, 23, 20, 21]
    batch, n = _batch([("A", a, 5), ("B", b, 4)])
    bd.on_update_states(batch, finished_req_ids=set(), live_req_ids={"A", "B"})
    drafts = bd.propose([[6], [21]], n, batch.token_ids_cpu)
    assert drafts == [[7, 8, 9, 5], [22, 23, 20, 21]]
    # A finishes; vLLM compacts B into row 0. B's state must follow its id, not its row.
    b2 = b + [22, 23]
    batch2, n2 = _batch([("B", b2, 4)])
    bd.on_update_states(batch2, finished_req_ids={"A"}, live_req_ids={"B"})
    assert bd.drafter.active_requests == {"B"} and "A" in bd.drafter.cache
    assert bd.propose([[22, 23]], n2, batch2.token_ids_cpu) == [[20, 21, 22, 23]]
    assert bd.drafter.num_indexed("B") == len(b2)
    # Partial prefill rows (nothing sampled) get no draft and are not indexed yet.
    batch3, n3 = _batch([("B", b2, 4), ("C", [1, 2, 3], 3)])
    bd.on_update_states(batch3, finished_req_ids=set(), live_req_ids={"B", "C"})
    assert bd.propose([[], []], n3, batch3.token_ids_cpu) == [[], []]
    assert "C" not in bd.drafter.active_requests
    # A request the runner no longer holds is freed even without a finish notice.
    bd.on_update_states(batch3, finished_req_ids=set(), live_req_ids={"C"})
    assert bd.drafter.active_requests == set()
    with pytest.raises(RuntimeError, match="not the bound input batch"):
        bd.propose([[1]], n3, batch3.token_ids_cpu.copy())


def test_batch_drafter_respects_max_model_len():
    bd = BatchDrafter(SuffixSpecConfig(num_speculative_tokens=8, max_spec_factor=8.0), max_model_len=10)
    toks = [1, 2, 3, 4, 1, 2, 3, 4]
    batch, n = _batch([("A", toks, 4)], max_len=10)
    bd.on_update_states(batch, set())
    assert len(bd.propose([[4]], n, batch.token_ids_cpu)[0]) == 1  # 10 - 8 - 1 tokens of room


def test_batch_drafter_stops_drafts_at_max_tokens():
    # vLLM verifies every draft token it gets, also past max_tokens: the drafter reads max_tokens from
    # the runner's requests (the hook's live_req_ids mapping) and drafts at most max_tokens - outputs - 1.
    cfg = SuffixSpecConfig(num_speculative_tokens=8, max_spec_factor=8.0, min_token_prob=0.0)
    bd = BatchDrafter(cfg, max_model_len=64)
    toks = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]  # prompt of 9, 3 outputs so far
    batch, n = _batch([("A", toks, 9)])

    def req(max_tokens):
        return SimpleNamespace(sampling_params=SimpleNamespace(max_tokens=max_tokens))

    bd.on_update_states(batch, set(), {"A": req(100)})
    full = [4, 5, 6, 7, 8, 9, 1, 2]
    assert bd.propose([[3]], n, batch.token_ids_cpu) == [full]
    for max_tokens, want in [(12, full), (7, full[:3]), (6, full[:2]), (5, full[:1]), (4, []), (3, [])]:
        bd.on_update_states(batch, set(), {"A": req(max_tokens)})
        assert bd.propose([[3]], n, batch.token_ids_cpu) == [want], max_tokens
    bd.on_update_states(batch, set(), {"A": SimpleNamespace(sampling_params=None)})  # e.g. pooling
    assert bd.propose([[3]], n, batch.token_ids_cpu) == [full]
    assert bd.timing.steps == 8 and bd.timing.propose_calls == 8 and bd.timing.propose_rows == 8
    assert bd.timing.propose_s > 0 and bd.timing.hook_s > 0


def test_replay_batch_matches_per_request_replay_and_frees_state():
    # Without the global cache and with fixed acceptance rates requests do not influence each other,
    # so driving them as one vLLM batch (rows compacted as they finish) drafts exactly what replaying
    # them one by one does.
    rng = random.Random(3)
    cfg = SuffixSpecConfig(num_speculative_tokens=6, max_spec_factor=2.0, max_cached_requests=0, adaptive=False)
    prompts, outputs = [], []
    for _ in range(5):
        base = [rng.randrange(30) for _ in range(rng.randrange(5, 40))]
        prompts.append(base)
        outputs.append([t if rng.random() < 0.85 else rng.randrange(30) for t in base][: rng.randrange(1, 40)])
    single = [replay(SuffixDrafter(cfg), i, p, o) for i, (p, o) in enumerate(zip(prompts, outputs))]
    bd = BatchDrafter(cfg, max_model_len=4096)
    batched, engine_steps = replay_batch(bd, prompts, outputs)
    assert batched == single
    assert engine_steps == max(r.steps for r in single) + 1  # + the step that delivers the last finish notices
    assert bd.drafter.active_requests == set()
    assert bd.timing.steps == engine_steps and bd.timing.propose_rows == sum(r.steps for r in single)
    with pytest.raises(ValueError):
        replay_batch(bd, prompts, outputs, max_tokens=[1] * 5)


def test_replay_batch_with_the_global_cache_drafts_a_reasked_batch_in_full():
    rng = random.Random(4)
    prompts = [[rng.randrange(500) for _ in range(30)] for _ in range(3)]
    outputs = [[rng.randrange(500, 900) for _ in range(40)] for _ in range(3)]
    bd = BatchDrafter(SuffixSpecConfig(num_speculative_tokens=16), max_model_len=4096)
    first, _ = replay_batch(bd, prompts, outputs, req_ids=["a0", "a1", "a2"])
    again, steps = replay_batch(bd, prompts, outputs, req_ids=["b0", "b1", "b2"], max_tokens=[64] * 3)
    assert sum(r.accepted_tokens for r in first) == 0
    assert all(r.steps <= 4 for r in again) and steps < max(r.steps for r in first)
    assert len(bd.drafter.cache) == 3  # identical outputs are stored once


# -- config and method alias ---------------------------------------------------------------------
def test_config_reads_vllm_fields_and_additional_config():
    spec = {
        "num_speculative_tokens": 7,
        "suffix_decoding_max_tree_depth": 32,
        "suffix_decoding_max_spec_factor": 2.0,
        "method": "custom_class",
    }
    cfg = SuffixSpecConfig.from_vllm(spec, {"longkit_spec": {"max_cached_tokens": 1000, "adaptive": False}})
    assert (cfg.num_speculative_tokens, cfg.max_depth, cfg.max_spec_factor) == (7, 32, 2.0)
    assert (cfg.max_cached_tokens, cfg.adaptive, cfg.min_token_prob) == (1000, False, 0.1)
    obj = SimpleNamespace(num_speculative_tokens=3, suffix_decoding_max_cached_requests=0)
    assert SuffixSpecConfig.from_vllm(obj).max_cached_requests == 0


@pytest.mark.parametrize(
    "spec,extra,match",
    [
        ({"num_speculative_tokens": 0}, None, "num_speculative_tokens must be an int >= 1, got 0"),
        ({"suffix_decoding_max_spec_factor": -1.0}, None, "max_spec_factor must be a number > 0"),
        ({"suffix_decoding_min_token_prob": 2}, None, r"min_token_prob must be a number in \[0, 1\]"),
        ({}, {"longkit_spec": {"max_cached_token": 5}}, "did you mean 'max_cached_tokens'"),
        (
            {},
            {"longkit_spec": {"min_token_prob": 0.2}},
            "set it in --speculative-config as 'suffix_decoding_min_token_prob'",
        ),
        ({}, {"longkit_spec": [1]}, "must be a JSON object"),
        ({}, {"longkit_spec": {"adaptive": "yes"}}, "adaptive must be a bool"),
    ],
)
def test_config_errors_name_the_problem(spec, extra, match):
    with pytest.raises(ConfigError, match=match):
        SuffixSpecConfig.from_vllm(spec, extra)


def _engine_args(spec=None, **kw):
    base = dict(speculative_config=spec, spec_method=None, spec_model=None, spec_tokens=None, additional_config={})
    return SimpleNamespace(**{**base, **kw})


def test_method_alias_rewrites_to_custom_class():
    ea = _engine_args({"method": "longkit_suffix", "suffix-decoding-max-tree-depth": 16})
    rewrite_speculative_config(ea)
    assert ea.speculative_config == {
        "method": "custom_class",
        "model": PROPOSER_PATH,
        "suffix_decoding_max_tree_depth": 16,
        "num_speculative_tokens": 16,
    }
    ea = _engine_args(None, spec_method="longkit_suffix", spec_tokens=5)
    rewrite_speculative_config(ea)
    assert ea.spec_method is None and ea.speculative_config["model"] == PROPOSER_PATH
    assert "num_speculative_tokens" not in ea.speculative_config  # vLLM merges --spec-tokens itself
    other = {"method": "ngram", "num_speculative_tokens": 4}
    ea = _engine_args(dict(other))
    rewrite_speculative_config(ea)
    assert ea.speculative_config == other  # not ours: untouched


def test_method_alias_validates_early():
    with pytest.raises(ConfigError, match="needs no draft model"):
        rewrite_speculative_config(_engine_args({"method": "longkit_suffix", "model": "some/model"}))
    with pytest.raises(ConfigError, match="max_spec_factor"):
        rewrite_speculative_config(_engine_args({"method": "longkit_suffix", "suffix_decoding_max_spec_factor": 0}))
    with pytest.raises(ConfigError, match="did you mean"):  # the custom_class spelling is validated too
        rewrite_speculative_config(
            _engine_args(
                {"model": PROPOSER_PATH, "num_speculative_tokens": 4},
                additional_config={"longkit_spec": {"adaptiv": True}},
            )
        )


# -- patching utility ----------------------------------------------------------------------------
def test_wrap_method_is_idempotent_refuses_others_and_undoes():
    class Host:
        def f(self, x):
            return x + 1

    def make(orig):
        return lambda self, x: orig(self, x) * 10

    assert wrap_method(Host, "f", make, "t1") is True
    assert wrap_method(Host, "f", make, "t1") is False  # loaded again in the same process: no-op
    assert Host().f(1) == 20 and is_wrapped(Host, "f", "t1")
    with pytest.raises(LongkitError, match="already wrapped"):
        wrap_method(Host, "f", make, "t2")
    with pytest.raises(HostVersionError, match="does not exist"):
        wrap_method(Host, "g", make, "t1")
    assert unwrap_method(Host, "f", "t1") and Host().f(1) == 2 and not hasattr(Host, "_orig_f")


def test_register_without_vllm_raises_a_clear_error(monkeypatch):
    import longkit._compat as compat
    import longkit.vllm_plugins as plugins

    monkeypatch.setattr(compat, "installed_version", lambda name: "0.40.0" if name == "vllm" else None)
    monkeypatch.delenv("LONGKIT_SKIP_VERSION_CHECK", raising=False)
    monkeypatch.setattr(plugins, "_registered", False)
    with pytest.raises(HostVersionError, match=r"0.40.0 is installed.*VLLM_PLUGINS"):
        plugins.register()
    assert not plugins.is_registered()


# -- cost-aware draft length ---------------------------------------------------------------------
def test_step_cost_model_recovers_a_linear_step_time_and_its_break_even():
    rng = random.Random(7)
    m = StepCostModel(decay=0.99, min_steps=16)
    t0, t1 = 0.05, 0.02
    for i in range(15):
        m.observe(4 + i % 9, t0 + t1 * (4 + i % 9))
    assert m.coefficients is None and m.break_even(4) == 0.0  # too few steps
    for _ in range(300):
        n = rng.randrange(4, 60)
        m.observe(n, (t0 + t1 * n) * rng.uniform(0.97, 1.03))
    m.observe(10, 50.0)  # a stall is ignored
    c0, c1 = m.coefficients
    assert c0 == pytest.approx(t0, rel=0.15) and c1 == pytest.approx(t1, rel=0.05)
    # break-even p: p * (t0 / rows + t1) = t1
    assert m.break_even(4) == pytest.approx(t1 / (t0 / 4 + t1), rel=0.05)
    assert m.break_even(1) < m.break_even(4) < m.break_even(64) <= 0.9


def test_step_cost_model_does_not_fit_a_slope_to_constant_token_counts():
    m = StepCostModel(min_steps=4)
    for _ in range(50):
        m.observe(8, 0.3)
    assert m.coefficients is None and m.break_even(8) == 0.0


def _agreeing_half_the_time(n_req=6, length=120, seed=5):
    """Prompts whose text the outputs copy with ~40% of tokens changed: drafts are often wrong."""
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(n_req):
        base = [rng.randrange(400) for _ in range(length)]
        prompts.append(base)
        outputs.append([t if rng.random() < 0.6 else rng.randrange(400, 800) for t in base][: length - 10])
    return prompts, outputs


@pytest.mark.parametrize("t1", [0.0, 0.03])
def test_cost_aware_drafting_verifies_fewer_doubtful_tokens_only_when_tokens_cost(t1):
    prompts, outputs = _agreeing_half_the_time()
    res = {}
    for aware in (False, True):
        clock = SimulatedEngineClock(t0=0.05, t1=t1)
        bd = BatchDrafter(SuffixSpecConfig(num_speculative_tokens=16, cost_aware=aware), 4096, clock=clock)
        out, _ = replay_batch(bd, prompts, outputs, clock=clock)
        res[aware] = (sum(r.draft_tokens for r in out), sum(r.accepted_tokens for r in out), clock.now, bd)
    if t1 == 0.0:  # free verification: the break-even is 0, the same drafts as without the cost model
        assert res[True][:2] == res[False][:2]
        assert res[True][3].cost.break_even(6) < 1e-9
    else:
        (d0, _, s0, _), (d1, _, s1, bd) = res[False], res[True]
        assert bd.cost.coefficients[1] == pytest.approx(t1, rel=0.05)
        # 60% of tokens agree, the break-even is ~0.78: doubtful drafts stop once the step cost is learned
        assert d1 < 0.5 * d0, (d0, d1)
        assert s1 < 0.9 * s0, (s0, s1)  # less modelled time for the same outputs


def test_decode_only_step_record():
    from longkit.vllm_plugins.spec.proposer import _decode_only_tokens

    dec = SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={"a": 3, "b": 1},
                          scheduled_spec_decode_tokens={"a": [5, 6]})
    assert _decode_only_tokens(dec) == 4
    assert _decode_only_tokens(SimpleNamespace(**{**vars(dec), "scheduled_new_reqs": ["c"]})) is None
    chunk = SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={"a": 512}, scheduled_spec_decode_tokens={})
    assert _decode_only_tokens(chunk) is None and _decode_only_tokens(None) is None
