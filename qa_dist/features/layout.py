"""Where a tokenizer puts its special tokens and type ids around a sequence pair, read from one
real encoding, and the raw tokenizer the window builder calls."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qa_dist.errors import DataError


@dataclass(frozen=True)
class PairLayout:
    """Where a tokenizer puts special tokens and type ids around a (first, second) sequence pair."""

    context_first: bool
    """True for tokenizers that pad on the left: the context is then the first sequence."""
    pre: tuple[int, ...]
    mid: tuple[int, ...]
    post: tuple[int, ...]
    pre_types: tuple[int, ...]
    mid_types: tuple[int, ...]
    post_types: tuple[int, ...]
    first_type: int
    second_type: int
    cls_token_id: int | None

    @property
    def num_special(self) -> int:
        return len(self.pre) + len(self.mid) + len(self.post)


def pair_layout(tokenizer) -> PairLayout:
    """Read the special-token template of ``tokenizer`` from one real pair encoding."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; "
            "qa-dist needs offset mappings, which only fast tokenizers provide"
        )
    if getattr(tokenizer, "truncation_side", "right") != "right":
        raise DataError("tokenizers that truncate on the left are not supported (truncation_side='left')")
    context_first = getattr(tokenizer, "padding_side", "right") == "left"
    enc = tokenizer("first words", "second words", return_token_type_ids=True)
    ids, types, seq = enc["input_ids"], enc["token_type_ids"], enc.sequence_ids(0)
    runs: list[tuple[object, list[int], list[int]]] = []  # (sequence id or None, ids, types)
    for token, type_id, s in zip(ids, types, seq, strict=True):
        if runs and runs[-1][0] == s:
            runs[-1][1].append(token)
            runs[-1][2].append(type_id)
        else:
            runs.append((s, [token], [type_id]))
    kinds = [r[0] for r in runs]
    specials = {0: ([], []), 1: ([], []), 2: ([], [])}
    position = 0  # 0: before the first sequence, 1: between, 2: after the second
    for s, run_ids, run_types in runs:
        if s is None:
            specials[position][0].extend(run_ids)
            specials[position][1].extend(run_types)
        else:
            position = s + 1
    if [k for k in kinds if k is not None] != [0, 1]:
        raise DataError(f"{type(tokenizer).__name__}: unexpected pair layout {kinds}")
    first_types = next(r[2] for r in runs if r[0] == 0)
    second_types = next(r[2] for r in runs if r[0] == 1)
    return PairLayout(
        context_first=context_first,
        pre=tuple(specials[0][0]),
        mid=tuple(specials[1][0]),
        post=tuple(specials[2][0]),
        pre_types=tuple(specials[0][1]),
        mid_types=tuple(specials[1][1]),
        post_types=tuple(specials[2][1]),
        first_type=first_types[0],
        second_type=second_types[0],
        cls_token_id=tokenizer.cls_token_id,
    )


@dataclass(frozen=True)
class WindowTokenizer:
    """What the window builder needs of a tokenizer, small and picklable: the pair layout, the Rust
    tokenizer as JSON, and whether the model reads token type ids. A pool worker gets this instead
    of the transformers tokenizer, so it never imports transformers (seconds per worker)."""

    layout: PairLayout
    backend_json: str
    with_types: bool

    @classmethod
    def of(cls, tokenizer) -> WindowTokenizer:
        if isinstance(tokenizer, WindowTokenizer):
            return tokenizer
        layout = pair_layout(tokenizer)
        with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ["token_type_ids"])
        return cls(layout, tokenizer.backend_tokenizer.to_str(), with_types)

    def backend(self):
        """The Rust tokenizer with truncation and padding off (a tokenizer.json may carry them),
        made once per process. Called directly: the transformers wrapper spends as long converting
        each encoding into a dict as the tokenizer spends tokenizing."""
        cached = _BACKENDS.get(self.backend_json)
        if cached is None:
            from tokenizers import Tokenizer  # (light: no transformers)

            cached = Tokenizer.from_str(self.backend_json)
            cached.no_truncation()
            cached.no_padding()
            _BACKENDS.clear()  # one tokenizer per process at a time is what builds use
            _BACKENDS[self.backend_json] = cached
        return cached


_BACKENDS: dict[str, object] = {}


LONG_TEXT = 1 << 18
"""Characters past which a text is tokenized in pieces: the Rust tokenizer holds some 150 bytes per
character of one text while it works (its alignments, tokens, offsets), gigabytes for a 50 MB
context, and Python lists of its offsets as much again."""
_PROBE = 256
"""Characters each side of a cut that tokenizing the two pieces apart must leave unchanged."""
_OVERLAP = 64
"""Characters before a piece that are tokenized with it, and their tokens dropped."""


def _cut_is_clean(backend, text: str, cut: int) -> bool:
    """Whether tokenizing ``text`` cut at ``cut`` gives the tokens and offsets of tokenizing it
    whole, judged on the ``_PROBE`` characters around the cut. The cut must fall between two
    pre-tokens of that window, with a whole pre-token on each side inside it (a pre-token running
    past the window, like a long run of spaces under a byte-level BPE, would hide where the real
    boundary is); a tokenizer without a pre-tokenizer, or one that keeps the text as one piece
    (Metaspace with ``split=False``), is never cut. Then the pieces must tokenize as the window does."""
    lo, hi = max(0, cut - _PROBE), min(len(text), cut + _PROBE)
    pre = backend.pre_tokenizer
    if pre is None:
        return False
    at = cut - lo
    pieces = [span for _, span in pre.pre_tokenize_str(text[lo:hi])]
    if any(s < at < e for s, e in pieces):
        return False
    if not any(s > 0 and e <= at for s, e in pieces) or not any(at <= s and e < hi - lo for s, e in pieces):
        return False
    whole = backend.encode(text[lo:hi], add_special_tokens=False)
    left_ids, left_offsets = _piece(backend, text, lo, cut, lo)
    right_ids, right_offsets = _piece(backend, text, cut, hi, lo)
    return whole.ids == left_ids + right_ids and [tuple(o) for o in whole.offsets] == [
        tuple(o) for o in (*left_offsets.tolist(), *right_offsets.tolist())
    ]


def _piece(backend, text: str, start: int, end: int, origin: int = 0) -> tuple[list[int], np.ndarray]:
    """Ids and offsets (from ``origin``) of the tokens of ``text[start:end]`` as they are within
    the text: tokenized with ``_OVERLAP`` characters before ``start``, whose tokens are then
    dropped, so the first token is not one that starts a sequence (a byte-level BPE trims the
    offsets of a leading space inside a text, not at its start)."""
    begin = max(origin, start - _OVERLAP)
    encoding = backend.encode(text[begin:end], add_special_tokens=False)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2) + (begin - origin)
    keep = offsets[:, 0] >= start - origin if start > begin else np.ones(len(offsets), dtype=bool)
    ids = np.asarray(encoding.ids, dtype=np.int64)[keep].tolist()
    return ids, offsets[keep]


def _cuts(backend, text: str) -> list[int] | None:
    """Where to cut a long text into pieces of at most ``LONG_TEXT`` characters, each cut at the
    start of a run of spaces (or, in a text without spaces, between two characters) where
    ``_cut_is_clean`` holds; None where no such cut is found."""
    cuts = [0]
    while len(text) - cuts[-1] > LONG_TEXT:
        lowest, end = cuts[-1] + LONG_TEXT // 2, cuts[-1] + LONG_TEXT
        for _ in range(32):
            space = text.rfind(" ", lowest, end)
            cut = space if space > lowest else end - 1  # (a text without spaces, as Chinese is)
            while cut > lowest and text[cut - 1].isspace():
                cut -= 1  # (to the run's start: inside a run of spaces is inside one pre-token)
            if cut <= lowest:
                return None
            if _cut_is_clean(backend, text, cut):
                break
            end = cut
        else:
            return None
        cuts.append(cut)
    return [*cuts, len(text)]


def _tokenize_long(backend, text: str) -> tuple[list[int], np.ndarray]:
    """Ids and ``(n, 2)`` character offsets of one long text, tokenized piece by piece."""
    cuts = _cuts(backend, text)
    if cuts is None:  # (no clean cut: whole, whatever it costs)
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    ids: list[int] = []
    offsets = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        piece_ids, piece_offsets = _piece(backend, text, lo, hi)
        ids.extend(piece_ids)
        offsets.append(piece_offsets)
    return ids, np.concatenate(offsets)


def tokenize_texts(backend, texts: list[str], offsets: bool = True) -> tuple[list[list[int]], list | None]:
    """Ids (and character offsets) of each text, without special tokens. The offsets of a text
    longer than ``LONG_TEXT`` characters come as an ``(n, 2)`` array, those of others as lists."""
    if not offsets:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)], None
    long = {i for i, t in enumerate(texts) if len(t) > LONG_TEXT}
    short = [t for i, t in enumerate(texts) if i not in long] if long else texts
    encodings = iter(backend.encode_batch(short, add_special_tokens=False))
    ids, offs = [], []
    for i, text in enumerate(texts):
        if i in long:
            text_ids, text_offsets = _tokenize_long(backend, text)
        else:
            e = next(encodings)
            text_ids, text_offsets = e.ids, e.offsets
        ids.append(text_ids)
        offs.append(text_offsets)
    return ids, offs
