"""The CPU span search, compiled with numba: per window, the n best valid spans, the null score and
the log-normaliser in one pass (``qa_dist.eval.spans.window_candidates_cpu`` is the entry point).

The tensor version (``qa_dist.eval.spans.top_spans``) makes about ten passes over every window plus two
top-k selections, which on the CPU cost more than everything else in post-processing together.
Written by hand because no library selects the n best spans of a band; checked against brute force
and against ``top_spans`` in the tests.

Compiled once per machine (about 5 s) and cached on disk (``_enable_cache``): in ``$NUMBA_CACHE_DIR``
where it is set, else beside this file (``__pycache__``) where the package directory is writable,
else in ``$QA_DIST_CACHE/numba`` or ``~/.cache/qa-dist/numba``, else numba's user cache directory;
where none is writable, every process compiles (and nothing fails).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re

import numba
import numpy as np


@numba.njit(parallel=True, nogil=True)
def window_candidates(start, end, context, real, cls, n_best, band, out_start, out_end, out_score, out_null, out_norm):
    windows, length = start.shape
    neg = np.float32(-np.inf)
    for w in numba.prange(windows):
        s, e, ctx, r = start[w], end[w], context[w], real[w]
        out_null[w] = s[cls[w]] + e[cls[w]]
        best, bs, be = out_score[w], out_start[w], out_end[w]
        best[:] = neg
        bs[:] = 0
        be[:] = 0
        lo, hi = _true_range(r)
        top_s, top_e = neg, neg
        for i in range(lo, hi):
            if r[i]:
                top_s, top_e = max(top_s, s[i]), max(top_e, e[i])
        sum_s, sum_e = 0.0, 0.0
        for i in range(lo, hi):
            if r[i]:
                sum_s += np.exp(s[i] - top_s)
                sum_e += np.exp(e[i] - top_e)
        out_norm[w] = top_s + np.log(sum_s) + top_e + np.log(sum_e) if hi > lo else neg

        lo, hi = _true_range(ctx)
        m = hi - lo
        if m == 0:
            continue
        # The best valid end in [k, k + band) (k counted from lo), by blocks of ``band`` (van Herk /
        # Gil-Werman): the max of a suffix of k's block and a prefix of the next block. (Block loops,
        # not k % band: the integer divisions per token took a quarter of the kernel's time.)
        ends = np.empty(m, np.float32)
        for k in range(m):
            ends[k] = e[lo + k] if ctx[lo + k] else neg
        prefix, suffix = np.empty(m, np.float32), np.empty(m, np.float32)
        for b0 in range(0, m, band):
            b1 = min(b0 + band, m)
            prefix[b0] = ends[b0]
            for k in range(b0 + 1, b1):
                prefix[k] = max(prefix[k - 1], ends[k])
            suffix[b1 - 1] = ends[b1 - 1]
            for k in range(b1 - 2, b0 - 1, -1):
                suffix[k] = max(suffix[k + 1], ends[k])
        # bound[k] = start + the best end from k bounds every span from k. As in ``top_spans``, the
        # n-th largest bound (tau) is at most the n-th best span score, so only starts whose bound
        # reaches tau are expanded: about n of them, best bound first, so that the n-th best span
        # so far rises fast and prunes the rest early.
        bound = np.empty(m, np.float32)
        top_bound, top_start = np.full(n_best, neg, np.float32), np.zeros(n_best, np.int64)
        block_start, block_end = 0, min(band, m)
        for k in range(m):
            if k == block_end:
                block_start, block_end = k, min(k + band, m)
            if k == block_start or block_end == m:
                window_max = suffix[k]  # the window is k's whole block, or runs to the end inside it
            else:
                window_max = max(suffix[k], prefix[min(k + band - 1, m - 1)])
            v = s[lo + k] + window_max if ctx[lo + k] else neg
            bound[k] = v
            if v > top_bound[n_best - 1]:
                q = n_best - 1
                while q > 0 and top_bound[q - 1] < v:
                    top_bound[q], top_start[q] = top_bound[q - 1], top_start[q - 1]
                    q -= 1
                top_bound[q], top_start[q] = v, k
        tau = top_bound[n_best - 1]
        for r in range(n_best):
            k = top_start[r]
            if top_bound[r] == neg or top_bound[r] <= best[n_best - 1]:
                break  # (sorted: no later start can do better)
            _expand(s, ends, lo, k, min(k + band, m), best, bs, be)
            bound[k] = neg  # expanded
        for k in range(m):  # starts tied at tau that did not fit the top n
            if bound[k] >= tau and bound[k] > best[n_best - 1]:
                _expand(s, ends, lo, k, min(k + band, m), best, bs, be)


@numba.njit(nogil=True, inline="always")
def _expand(s, ends, lo, k, stop, best, bs, be):
    """Offer the spans from start ``lo + k`` to the sorted n best (ties keep the earlier offer first)."""
    n_best = len(best)
    for j in range(k, stop):
        v = s[lo + k] + ends[j]
        if v > best[n_best - 1]:
            q = n_best - 1
            while q > 0 and best[q - 1] < v:
                best[q], bs[q], be[q] = best[q - 1], bs[q - 1], be[q - 1]
                q -= 1
            best[q], bs[q], be[q] = v, lo + k, lo + j


@numba.njit(nogil=True)
def _true_range(mask):
    """(first True, last True + 1) of a bool row; (0, 0) if none."""
    lo, hi = 0, len(mask)
    while lo < hi and not mask[lo]:
        lo += 1
    while hi > lo and not mask[hi - 1]:
        hi -= 1
    return lo, hi


# The disk cache. ``cache=True`` would cache in numba's default places only: beside the source, else
# in ~/.cache/numba. From a read-only install with a read-only home (clusters, containers) numba then
# finds no place and raises at import ("no locator available"), so post-processing failed outright;
# and qa-dist's own cache directory ($QA_DIST_CACHE) was never used.
#
# Why per function rather than numba's global settings: ``numba.config.CACHE_DIR`` (NUMBA_CACHE_DIR)
# and NUMBA_CACHE_LOCATOR_CLASSES are process-wide: every numba function any library defines later
# would cache in qa-dist's directory, an environment variable would leak into every subprocess, and
# numba's compiler calls ``config.reload_config()``, which resets config attributes from the
# environment whenever that changed (a mutated ``config.CACHE_DIR`` does not reliably stick). numba
# picks a function's cache directory when caching is enabled on its dispatcher, by trying the
# ``_locator_classes`` of its cache implementation in order; these kernels get a ``FunctionCache``
# whose implementation carries numba's own list with qa-dist's directories inserted after the
# in-tree one. So NUMBA_CACHE_DIR keeps precedence (numba's first locator), a writable package
# directory keeps numba's usual place, and NUMBA_CACHE_LOCATOR_CLASSES, where set, still replaces the
# list (numba's ``CacheImpl`` reads it first). Nothing outside these kernels changes.
#
# Loading compiled code for another machine: numba's index key holds the signature, the target
# triple, the CPU name and its feature flags (``codegen.magic_tuple()``) and a hash of the function's
# bytecode; the index file is dropped when its numba version or the source file's hash (numba >= 0.68;
# mtime and size before) differ, and its name holds the Python version. A different CPU or numba is
# a miss, then a compile. A data file itself carries no CPU check, though, and numba names a new one
# by reading the index first: two processes on different CPUs writing their first entry into one
# index at once could leave one's key pointing to the other's object code. $QA_DIST_CACHE is often
# on a filesystem all nodes share, so qa-dist's directories get one subdirectory per CPU (name and
# hash of the magic tuple): processes on different CPUs never write to the same files.


def _cpu_tag() -> str:
    """The CPU the code is compiled for, as a directory name: LLVM's CPU name and a hash of numba's
    whole codegen key (target triple, CPU name, feature flags; NUMBA_CPU_NAME/FEATURES included)."""
    from numba.core.registry import cpu_target

    magic = cpu_target.target_context.codegen().magic_tuple()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(magic[1]))[:40] or "cpu"
    return f"{name}-{hashlib.sha256(repr(magic).encode()).hexdigest()[:12]}"


def _qa_dist_cache_dirs() -> list[str]:
    """qa-dist's directories for the kernels' cache, in order: ``$QA_DIST_CACHE/numba`` (where the
    variable is set), ``~/.cache/qa-dist/numba`` (where there is a home)."""
    roots = []
    if os.environ.get("QA_DIST_CACHE"):
        roots.append(os.path.join(os.path.expanduser(os.environ["QA_DIST_CACHE"]), "numba"))
    home = os.path.expanduser("~")
    if os.path.isabs(home):  # (no HOME and no passwd entry: "~" stays as it is)
        roots.append(os.path.join(home, ".cache", "qa-dist", "numba"))
    return [os.path.abspath(root) for root in roots]


def _kernel_cache_class():
    """numba's ``FunctionCache`` with qa-dist's directories among its locators (built here, not at
    module level, so that a numba whose caching internals differ costs the cache, not the import)."""
    from numba.core import caching

    tag = _cpu_tag()

    def locator(root: str) -> type:
        class QaDistCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
            """``root/<cpu>/<source directory's name>_<hash of its path>``; numba checks that it is writable."""

            def __init__(self, py_func, py_file):
                self._py_file = py_file
                self._lineno = py_func.__code__.co_firstlineno
                self._cache_path = os.path.join(root, tag, self.get_suitable_cache_subpath(py_file))

            def get_cache_path(self):
                return self._cache_path

        return QaDistCacheLocator

    # numba's list, qa-dist's directories after NUMBA_CACHE_DIR's and the in-tree locators (named
    # ``_InTreeCacheLocator`` and so on before numba 0.62).
    default = list(caching.CompileResultCacheImpl._locator_classes)
    first = [c for c in default if c.__name__.lstrip("_") in ("UserProvidedCacheLocator", "InTreeCacheLocator")]
    rest = [c for c in default if c not in first]

    class KernelCacheImpl(caching.CompileResultCacheImpl):
        _locator_classes = [*first, *(locator(root) for root in _qa_dist_cache_dirs()), *rest]

    class KernelCache(caching.FunctionCache):
        _impl_class = KernelCacheImpl

    return KernelCache


def _enable_cache(*dispatchers) -> None:
    """What ``cache=True`` does (``Dispatcher.enable_caching``: ``self._cache = FunctionCache(...)``),
    with qa-dist's locators. Where no directory is writable numba raises "no locator available" and
    the dispatchers keep their ``NullCache``: each process compiles."""
    try:
        cache_class = _kernel_cache_class()
    except Exception:  # numba's caching internals changed: numba's own places, where one is writable
        cache_class = None
    for dispatcher in dispatchers:
        with contextlib.suppress(Exception):  # "no locator available" (RuntimeError): nowhere writable
            if cache_class is None:
                dispatcher.enable_caching()
            else:
                dispatcher._cache = cache_class(dispatcher.py_func)


# ``_expand`` is inlined into ``window_candidates``'s IR and never compiled on its own; the parallel
# loop's gufunc and ``_true_range`` are linked into ``window_candidates``'s library, so one cache hit
# loads all of it (``_true_range``'s own entry saves its compilation when ``window_candidates`` misses).
_enable_cache(window_candidates, _true_range)
