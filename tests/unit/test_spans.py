"""The span search is the exact n best valid spans, checked against brute force, in both forms:
tensor operations (accelerators) and the compiled CPU kernel."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qa_dist.eval.candidates import _candidates_torch, candidates_from_logits
from qa_dist.eval.spans import top_spans, window_candidates_cpu


def cpu_kernel_spans(start, end, mask, n_best, max_len):
    """The CPU kernel's spans, shaped like top_spans' output."""
    real, cls = np.ones(mask.shape, bool), np.zeros(len(mask), np.int64)
    s, e, score, _, _ = window_candidates_cpu(start.numpy(), end.numpy(), mask.numpy(), real, cls, n_best, max_len)
    return torch.from_numpy(s.astype(np.int64)), torch.from_numpy(e.astype(np.int64)), torch.from_numpy(score)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    length=st.integers(1, 24),
    max_len=st.integers(1, 30),
    n_best=st.integers(1, 8),
    ties=st.booleans(),
    search=st.sampled_from([top_spans, cpu_kernel_spans]),
)
def test_top_spans_equal_brute_force(seed, length, max_len, n_best, ties, search):
    g = torch.Generator().manual_seed(seed)
    start, end = torch.randn(3, length, generator=g), torch.randn(3, length, generator=g)
    if ties:  # small integers: many spans share a score
        start, end = start.mul(1.5).round(), end.mul(1.5).round()
    mask = torch.rand(3, length, generator=g) > 0.3
    s, e, score = search(start, end, mask, n_best, max_len)
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


@pytest.mark.parametrize("search", [top_spans, cpu_kernel_spans])
def test_a_span_the_top_k_approximation_misses(search):
    """The tutorials keep the 20 best starts and 20 best ends; here the best valid span starts at a
    token that is not among the best starts (those are all after every good end)."""
    length = 60
    start = torch.full((1, length), -5.0)
    end = torch.full((1, length), -5.0)
    start[0, 30:55] = 3.0  # 25 high starts, all after position 29
    end[0, 5] = 4.0  # the only high end comes early
    start[0, 2] = 1.0  # so the best valid span is (2, 5)
    assert 2 not in torch.topk(start[0], 20).indices  # the approximation never looks at this start
    s, e, score = search(start, end, torch.ones(1, length, dtype=torch.bool), 1, 30)
    assert (int(s[0, 0]), int(e[0, 0])) == (2, 5)
    assert float(score[0, 0]) == 5.0


def test_cpu_kernel_gives_the_candidates_of_the_tensor_version():
    """On padded windows with the context in the middle, as real features have them: the same
    spans and scores, and the same null scores and log-normalisers up to float rounding."""
    g = torch.Generator().manual_seed(0)
    windows, length = 64, 96
    start, end = torch.randn(windows, length, generator=g) * 3, torch.randn(windows, length, generator=g) * 3
    real_len = torch.randint(20, length + 1, (windows,), generator=g)
    position = torch.arange(length)[None, :]
    real = position < real_len[:, None]
    context = (position >= 8) & (position < real_len[:, None] - 1)
    cls = torch.randint(0, 4, (windows,), generator=g)
    args = (np.arange(windows), start, end, context, real, cls)
    cpu = candidates_from_logits(*args, n_best=20, max_answer_length=30)
    tensor = _candidates_torch(*args, 20, 30)
    for field in ("window", "start", "end", "score"):
        np.testing.assert_array_equal(getattr(cpu, field), getattr(tensor, field))
    np.testing.assert_array_equal(cpu.null, tensor.null)
    np.testing.assert_allclose(cpu.log_norm, tensor.log_norm, rtol=1e-6)
