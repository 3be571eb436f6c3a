"""top_spans is the exact n best valid spans, checked against brute force."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qa_dist.spans import best_spans, top_spans


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    length=st.integers(1, 24),
    max_len=st.integers(1, 30),
    n_best=st.integers(1, 8),
    ties=st.booleans(),
)
def test_top_spans_equal_brute_force(seed, length, max_len, n_best, ties):
    g = torch.Generator().manual_seed(seed)
    start, end = torch.randn(3, length, generator=g), torch.randn(3, length, generator=g)
    if ties:  # small integers: many spans share a score
        start, end = start.mul(1.5).round(), end.mul(1.5).round()
    mask = torch.rand(3, length, generator=g) > 0.3
    s, e, score = top_spans(start, end, mask, n_best, max_len)
    for w in range(3):
        valid = sorted(
            (
                float(start[w, i] + end[w, j])
                for i, j in itertools.product(range(length), repeat=2)
                if mask[w, i] and mask[w, j] and i <= j < i + max_len
            ),
            reverse=True,
        )
        k = min(n_best, len(valid))
        assert [float(x) for x in score[w, :k]] == valid[:k]
        assert all(x == float("-inf") for x in score[w, k:])  # slots without a valid span
        for slot in range(k):
            i, j = int(s[w, slot]), int(e[w, slot])
            assert mask[w, i] and mask[w, j] and i <= j < i + max_len
            assert float(start[w, i] + end[w, j]) == float(score[w, slot])
        assert len({(int(s[w, t]), int(e[w, t])) for t in range(k)}) == k  # distinct spans


def test_a_span_the_top_k_approximation_misses():
    """The tutorials keep the 20 best starts and 20 best ends; here the best valid span starts at a
    token that is not among the best starts (those are all after every good end)."""
    length = 60
    start = torch.full((1, length), -5.0)
    end = torch.full((1, length), -5.0)
    start[0, 30:55] = 3.0  # 25 high starts, all after position 29
    end[0, 5] = 4.0  # the only high end comes early
    start[0, 2] = 1.0  # so the best valid span is (2, 5)
    assert 2 not in torch.topk(start[0], 20).indices  # the approximation never looks at this start
    s, e, score = best_spans(start, end, torch.ones(1, length, dtype=torch.bool), 30)
    assert (int(s[0]), int(e[0])) == (2, 5)
    assert float(score[0]) == 5.0
