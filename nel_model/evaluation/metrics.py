"""Ranking metrics: full-KB and candidate-list rank counts, three tie rules, MRR and Hits@k.

Every ranking first counts, for each query, how the other entities of its list compare with the gold entity's score
(:class:`RankCounts`): ``higher`` (strictly above), ``equal`` (exactly equal) and ``unordered`` (a NaN on either
side). A tie rule then turns the counts into metrics:

* ``pessimistic`` (the default): rank = 1 + higher + equal + unordered; every tie and every NaN counts against the
  gold, so a degenerate model that scores everything alike gets the worst rank, never the best.
* ``strict`` (DIM's and GHMFC's code): rank = 1 + higher; ties and other entities' NaNs count for the gold.
* ``mean``: the expectation under random tie-breaking: the gold's rank is uniform over
  ``1 + higher + unordered ... 1 + higher + unordered + equal``; MRR and Hits@k are the exact expectations.

A NaN gold score is a miss under every rule (rank 0, reciprocal rank 0) and is counted: ``RankCounts.nan_gold`` per
query, the ``"nan"`` entry of :func:`metrics_from_counts`. (DIM's code ranks a NaN gold 1: every comparison with
NaN is false, so nothing counts as higher.)

The gold's score comes from the same arithmetic as the others'. Candidate lists: one elementwise product-sum over
a tensor holding the gold's row and the list's, so an exact duplicate of the gold (an identical embedding) ties
with it, never above or below it through rounding. Full KB: the gold's column of the same matrix product (twin
columns have come out identical on the CPUs measured, but that is the BLAS kernel's doing, not a promise; with a
low-precision ``dtype`` every near-tie is re-scored by one product-sum, so twins do tie). Each entity counts once
per list: a repeated candidate is compared once (its first occurrence), and copies of the gold row never count
against it.
``found`` False means "gold not ranked" (candidate protocol with the ``in_list`` rule, gold absent from the list):
a miss under every rule (reciprocal rank 0).

Scores are computed in float32 by default. With ``dtype`` float16/bfloat16 the matrix product runs in low precision
and every entity whose low-precision score lies within the rounding band of the gold's is compared again in float32
(:func:`full_kb_counts`): the counts are those of float32 scoring, at the speed of the low-precision product.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from nel_model.runs import CANDIDATE_RULES, TIE_RULES  # noqa: F401 - the run folder's vocabulary, used here

HITS_AT = (1, 3, 5, 10, 20)
RECHECK_PAIRS = 1 << 20     # float32 re-check pairs per step (bounds the gathered memory)


@dataclass
class RankCounts:
    """Per query (all [N] long, ``found`` and ``nan_gold`` bool): how the other listed entities compare with the
    gold's score, and whether the gold's score is NaN (``nan_gold``; all False when not given); and, when asked
    for, each query's top entities from the same scores (``top_scores`` [N,k] float32, ``top_rows``)."""

    higher: torch.Tensor
    equal: torch.Tensor
    unordered: torch.Tensor
    found: torch.Tensor
    top_scores: torch.Tensor | None = None
    top_rows: torch.Tensor | None = None
    nan_gold: torch.Tensor | None = None

    FIELDS = ("higher", "equal", "unordered", "found", "top_scores", "top_rows", "nan_gold")

    def __post_init__(self) -> None:
        if self.nan_gold is None:
            self.nan_gold = torch.zeros_like(self.found, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.higher)

    @property
    def ranked(self) -> torch.Tensor:
        """Queries whose gold is ranked: found, with a score that is not NaN (the others are misses)."""
        return self.found & ~self.nan_gold

    @staticmethod
    def cat(parts: list["RankCounts"]) -> "RankCounts":
        if not parts:
            z = torch.zeros(0, dtype=torch.long)
            return RankCounts(z, z, z, z.bool())
        return RankCounts(*(None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                            for f in RankCounts.FIELDS))

    def map(self, fn) -> "RankCounts":
        """The same counts with ``fn`` applied to every tensor (e.g. a move to another device)."""
        return RankCounts(*(None if getattr(self, f) is None else fn(getattr(self, f)) for f in RankCounts.FIELDS))

    def to(self, device) -> "RankCounts":
        return self.map(lambda t: t.to(device))

    def ranks(self, rule: str = "pessimistic") -> torch.Tensor:
        """Ranks under ``rule`` (0 = a miss: gold not found, or its score NaN); ``mean`` gives the expected rank (a
        float tensor)."""
        check_rule(rule)
        if rule == "pessimistic":
            r = 1 + self.higher + self.equal + self.unordered
        elif rule == "strict":
            r = 1 + self.higher
        else:
            r = 1 + self.higher + self.unordered + self.equal.double() / 2
        return torch.where(self.ranked, r, torch.zeros_like(r))


def check_rule(rule: str) -> None:
    if rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {rule!r}; expected one of {', '.join(TIE_RULES)}")


def _empty_metrics(ks) -> dict[str, float]:
    out: dict[str, float] = {"mrr": 0.0}
    out.update({f"hits@{k}": 0.0 for k in ks})
    out["n"] = 0
    return out


def metrics_from_ranks(ranks: torch.Tensor | list[int], ks: tuple[int, ...] = HITS_AT) -> dict[str, float]:
    """``{"mrr", "hits@k"..., "n"}`` as fractions in [0, 1]; rank 0 = miss."""
    r = torch.as_tensor(ranks, dtype=torch.float64).reshape(-1)
    n = int(r.numel())
    if n == 0:
        return _empty_metrics(ks)
    found = r > 0
    rr = torch.where(found, 1.0 / r.clamp(min=1), torch.zeros_like(r))
    out: dict[str, float] = {"mrr": float(rr.mean())}
    for k in ks:
        out[f"hits@{k}"] = float((found & (r <= k)).double().mean())
    out["n"] = n
    return out


def metrics_from_counts(counts: RankCounts, rule: str = "pessimistic",
                        ks: tuple[int, ...] = HITS_AT) -> dict[str, float]:
    """Metrics of ``counts`` under a tie rule (``mean``: exact expectations under random tie-breaking): those of
    :func:`metrics_from_ranks` and ``"nan"``, the number of queries whose gold score is NaN (each a miss)."""
    check_rule(rule)
    out = _rule_metrics(counts, rule, ks)
    out["nan"] = int(counts.nan_gold.sum())
    return out


def _rule_metrics(counts: RankCounts, rule: str, ks: tuple[int, ...]) -> dict[str, float]:
    if rule != "mean":
        return metrics_from_ranks(counts.ranks(rule), ks)
    n = len(counts)
    if n == 0:
        return _empty_metrics(ks)
    first = (1 + counts.higher + counts.unordered).double().cpu()          # best rank the gold can get
    t = counts.equal.double().cpu()                                       # the gold's rank is first .. first + t
    found = counts.ranked.cpu()
    # E[1/rank] = (H(first + t) - H(first - 1)) / (t + 1), with the harmonic number H(x) = digamma(x + 1) + gamma
    rr = (torch.special.digamma(first + t + 1) - torch.special.digamma(first)) / (t + 1)
    out: dict[str, float] = {"mrr": float(torch.where(found, rr, torch.zeros_like(rr)).mean())}
    for k in ks:
        p = ((k - first + 1) / (t + 1)).clamp(0.0, 1.0)
        out[f"hits@{k}"] = float(torch.where(found, p, torch.zeros_like(p)).mean())
    out["n"] = n
    return out


def _band(dtype: torch.dtype, q_norm: float, e_norm: float) -> float:
    """Half-width within which a low-precision score difference may disagree in sign with float32's.

    Each score is off by at most ~1.5 eps |q| |e| (inputs rounded to ``dtype``, float32 accumulation, output
    rounded); a difference of two by twice that. A factor 4 over that bound covers reduced-precision reductions."""
    return 4 * 3 * torch.finfo(dtype).eps * q_norm * e_norm


def _compare_f32(q32: torch.Tensor, e32: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 gold_f32: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For (row, col) pairs: per-row counts of col scoring below / above / equal to the row's gold, in float32."""
    below = torch.zeros(n, dtype=torch.long, device=q32.device)
    higher, equal = torch.zeros_like(below), torch.zeros_like(below)
    for s in range(0, len(rows), RECHECK_PAIRS):
        r, c = rows[s:s + RECHECK_PAIRS], cols[s:s + RECHECK_PAIRS]
        sc = (q32[r] * e32[c]).sum(-1)
        g = gold_f32[r]
        below.index_add_(0, r, (sc < g).long())
        higher.index_add_(0, r, (sc > g).long())
        equal.index_add_(0, r, (sc == g).long())
    return below, higher, equal


def count_epilogue(scores: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``scores`` [c,E]: entities scoring below and above ``g`` [c,1], and whether the row is free of NaN
    (then every other entity ties with the gold: equal = E - 1 - below - higher). Two comparison passes and one sum
    instead of three comparison passes; counting on a uint8 view in int32 is several times faster on CPU than
    summing a bool tensor. On CUDA the function is compiled into one fused pass over the scores."""
    below = (scores < g).view(torch.uint8).sum(1, dtype=torch.int32)
    higher = (scores > g).view(torch.uint8).sum(1, dtype=torch.int32)
    clean = ~torch.isnan(scores.sum(1, dtype=torch.float32) + g[:, 0].float())
    return below, higher, clean


class _CompiledOrEager:
    """A compiled function that falls back, with one warning, to its eager original for good the first time the
    compiled one raises. ``torch.compile`` compiles lazily, so a missing backend (no Triton, no C compiler) shows
    only at a call: every call is covered, the first included."""

    def __init__(self, eager: Callable):
        self.eager = eager
        self.compiled: Callable | None = None
        try:
            self.compiled = torch.compile(eager, dynamic=True)
        except Exception as exc:  # noqa: BLE001 - no compiler at all: the eager function is the same function
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        self.compiled = None
        warnings.warn(f"torch.compile of {self.eager.__name__} failed ({type(exc).__name__}: {exc}); "
                      "counting with the eager function (same counts, slower)", RuntimeWarning, stacklevel=3)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager function is the same function
                self._give_up(exc)
        return self.eager(*args)


def compiles_epilogue(device_type: str) -> bool:
    """Whether the count epilogue is compiled on this kind of device (CUDA: one fused pass over the scores)."""
    return device_type == "cuda"


_COMPILED: dict[str, _CompiledOrEager] = {}


def _epilogue(device: torch.device) -> Callable:
    """:func:`count_epilogue`, compiled (one Triton kernel reading the scores once) where
    :func:`compiles_epilogue`; eager elsewhere, and from the first failure of the compiled function on."""
    if not compiles_epilogue(device.type):
        return count_epilogue
    if device.type not in _COMPILED:
        _COMPILED[device.type] = _CompiledOrEager(count_epilogue)
    return _COMPILED[device.type]


def topk_by_row(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` best columns, best first, equal scores in column (KB row) order, a NaN last:
    ``(values [c,k] float32, columns [c,k] long)``; a row is re-sorted whole only when a tie touches its top."""
    k = min(k, scores.shape[1])
    scores = scores.float().nan_to_num(nan=-float("inf"))
    vals, rows = scores.topk(k, dim=1)
    tied = ((scores >= vals[:, -1:]).sum(1) > k) | (vals[:, 1:] == vals[:, :-1]).any(1)
    for i in tied.nonzero().flatten().tolist():
        vals[i], rows[i] = (t[:k] for t in scores[i].sort(descending=True, stable=True))
    return vals, rows


def full_kb_counts(queries: torch.Tensor, entities: torch.Tensor, gold: torch.Tensor, chunk: int = 512,
                   dtype: torch.dtype | None = None, top_k: int = 0) -> RankCounts:
    """:class:`RankCounts` of each query's gold among all ``entities`` ([N,D] x [E,D], on the queries' device).

    Scores are computed ``chunk`` queries at a time as one matrix product in ``dtype`` (default float32); no Python
    loop over entities. A low-precision ``dtype`` is exact too: near-ties are compared again in float32. With
    ``top_k``, each query's best entities (float32 scores, :func:`topk_by_row`) come from the same pass (with a
    low-precision ``dtype``, from a float32 product of the chunk)."""
    dtype = dtype or torch.float32
    dev = queries.device
    gold = gold.to(dev).long()
    E = len(entities)
    low = dtype not in (torch.float32, torch.float64)
    ent = entities.to(dtype)
    q32 = queries.float()
    e32 = entities.float() if low else None
    epilogue = _epilogue(dev)
    if low:
        width = _band(dtype, float(q32.norm(dim=1).max()) if len(q32) else 1.0, float(e32.norm(dim=1).max()))
    parts = []
    for s in range(0, len(queries), chunk):
        q = queries[s: s + chunk].to(dtype)
        g_rows = gold[s: s + chunk]
        rows = torch.arange(len(q), device=dev)
        scores = q @ ent.T                                                       # [c,E]
        if not low:
            parts.append(score_counts(scores, g_rows, top_k, epilogue))
            continue
        g = scores.gather(1, g_rows[:, None])                                    # [c,1]
        diff = scores.float() - g.float()
        below = (diff < -width).view(torch.uint8).sum(1, dtype=torch.int32).long()
        higher = (diff > width).view(torch.uint8).sum(1, dtype=torch.int32).long()
        near = ~((diff < -width) | (diff > width))                              # in the band, or NaN
        near[rows, g_rows] = False
        r, c = near.nonzero(as_tuple=True)
        qc = q32[s: s + chunk]
        gold_f32 = (qc * e32[g_rows]).sum(-1)
        b2, h2, e2 = _compare_f32(qc, e32, r, c, gold_f32, len(q))
        below, higher, equal = below + b2, higher + h2, e2
        nan_gold = torch.isnan(gold_f32)
        unordered = (E - 1) - below - higher - equal
        top = topk_by_row(q32[s: s + chunk] @ e32.T, top_k) if top_k else (None, None)
        parts.append(RankCounts(higher, equal, unordered, torch.ones_like(higher, dtype=torch.bool), *top,
                                nan_gold=nan_gold))
    return RankCounts.cat(parts) if parts else RankCounts.cat([]).to(dev)


def score_counts(scores: torch.Tensor, gold_rows: torch.Tensor, top_k: int = 0,
                 epilogue: Callable | None = None) -> RankCounts:
    """:class:`RankCounts` of each row's gold column among all columns of a score matrix ``scores`` [c,E] (float32:
    the full-KB protocol's chunk, or any other final scores such as a two-stage linker's); with ``top_k``, each
    row's best columns from the same scores."""
    E = scores.shape[1]
    gold_rows = gold_rows.to(scores.device).long()
    g = scores.gather(1, gold_rows[:, None])                                     # [c,1]
    below, higher, clean = (epilogue or _epilogue(scores.device))(scores, g)
    below, higher = below.long(), higher.long()
    equal = (E - 1) - below - higher                                            # rows without NaN
    for i in (~clean).nonzero().flatten().tolist():                             # rare: count NaN rows exactly
        row, gi = scores[i], g[i]
        equal[i] = int((row == gi).sum()) - int(bool(gi == gi))
    unordered = (E - 1) - below - higher - equal
    top = topk_by_row(scores, top_k) if top_k else (None, None)
    return RankCounts(higher, equal, unordered, torch.ones_like(higher, dtype=torch.bool), *top,
                      nan_gold=torch.isnan(g[:, 0]))


def full_kb_ranks(queries: torch.Tensor, entities: torch.Tensor, gold: torch.Tensor, chunk: int = 512,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pessimistic rank of each query's gold among all ``entities`` ([N] long; see :func:`full_kb_counts`)."""
    return full_kb_counts(queries, entities, gold, chunk, dtype).ranks("pessimistic")


def candidate_counts(queries: torch.Tensor, entities: torch.Tensor, candidates: torch.Tensor, gold: torch.Tensor,
                     rule: str = "dim") -> RankCounts:
    """:class:`RankCounts` of the gold against each query's candidate list ([N,C] entity rows, ``-1`` = padding).

    ``dim`` (DIM's and GHMFC's rule): the gold is scored and ranked against the list's other entries whether or
    not the list contains it. ``in_list``: a gold absent from its list is not ranked (``found`` False, a miss).
    A mention without a list (all padding) is a miss under both rules. Each entity counts once per list (a repeated
    candidate at its first occurrence); copies of the gold row are never counted against it. Scores in float32,
    the gold's and the candidates' by one elementwise product-sum, so an identical embedding gives an identical
    score wherever it stands."""
    dev = queries.device
    cands = candidates.to(dev).long()
    gold = gold.to(dev).long()
    rows = torch.cat([gold[:, None], cands.clamp(min=0)], 1)                     # [N,1+C]: the gold, then the list
    prod = entities[rows].float()                                                # [N,1+C,D] (a fresh copy)
    return list_counts(prod.mul_(queries.float()[:, None, :]).sum(-1), cands, gold, rule)


def list_counts(scores: torch.Tensor, candidates: torch.Tensor, gold: torch.Tensor, rule: str = "dim") -> RankCounts:
    """The candidate protocol's :class:`RankCounts` from scores ``[N,1+C]``: the gold's score first, then its list's
    entries' (``candidates`` [N,C] entity rows, ``-1`` = padding); the rules of :func:`candidate_counts`."""
    if rule not in CANDIDATE_RULES:
        raise ValueError(f"unknown candidate rule {rule!r}; expected one of {', '.join(CANDIDATE_RULES)}")
    cands = candidates.to(scores.device).long()
    gold = gold.to(scores.device).long()
    valid = cands >= 0
    g, scores = scores[:, :1], scores[:, 1:]
    is_gold = cands == gold[:, None]
    others = valid & ~is_gold & ~_repeats(cands)
    higher = (others & (scores > g)).sum(1)
    equal = (others & (scores == g)).sum(1)
    below = (others & (scores < g)).sum(1)
    unordered = others.sum(1) - higher - equal - below
    found = valid.any(1) if rule == "dim" else (valid & is_gold).any(1)   # no list at all: a miss
    return RankCounts(higher, equal, unordered, found, nan_gold=torch.isnan(g[:, 0]))


def _repeats(cands: torch.Tensor) -> torch.Tensor:
    """[N,C] bool: the entry repeats an entity already listed earlier in its row."""
    ordered, pos = cands.sort(dim=1, stable=True)               # equal entities stay in list order
    rep = torch.zeros_like(cands, dtype=torch.bool)
    rep[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return torch.zeros_like(rep).scatter_(1, pos, rep)


def candidate_ranks(queries: torch.Tensor, entities: torch.Tensor, candidates: torch.Tensor,
                    gold: torch.Tensor) -> torch.Tensor:
    """Pessimistic rank of the gold among its candidates under the ``in_list`` rule (0 = gold not a candidate)."""
    return candidate_counts(queries, entities, candidates, gold, "in_list").ranks("pessimistic")


def candidate_recall(candidates: torch.Tensor, gold: torch.Tensor,
                     ks: tuple[int, ...] = (1, 5, 10, 20, 50, 100)) -> dict[str, float]:
    """Share of mentions whose gold is among the first k entries of its candidate list, and in the whole list."""
    cands = candidates.long()
    hit = (cands == gold.long()[:, None]) & (cands >= 0)
    n = len(cands)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(hit[:, :k].any(1).double().mean()) if n else 0.0
    out["recall@all"] = float(hit.any(1).double().mean()) if n else 0.0
    out["mean_list_length"] = float((cands >= 0).sum(1).double().mean()) if n else 0.0
    out["n"] = n
    return out
