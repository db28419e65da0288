"""DPO pairs from scored units, as whole-column operations over the units of many prompts.

Two origins:

* best-of-N groups (units of the same prompt_id, default kind `best_of_n`): the higher-scored
  response is `chosen`. Mode `best_worst` makes one candidate per prompt (highest vs lowest score;
  score ties broken by unit_id so the choice never depends on row order); mode `all_pairs` makes every
  pair of distinct responses a candidate. A candidate is dropped when
    - the two responses have identical text             -> "identical_response"
    - the scores are equal (no direction)               -> "score_tie"
    - the margin is below `min_margin`                  -> "below_min_margin"
    - with `min_margin_uncertainty: k` > 0: a unit without score_std -> "missing_uncertainty";
      margin < k * sqrt(std_chosen² + std_rejected²)   -> "uncertain_margin"
* preference rows (the two units sharing a row_id, labelled chosen/rejected by humans): the
  reward margin m = score(human chosen) - score(human rejected) decides, in this order:
    - not two units, one chosen and one rejected (a tie: two units flagged `tie`, in file order)
                                                        -> dropped "incomplete_pair"
    - a unit without a score                            -> dropped "missing_score"
    - identical response texts                          -> dropped "identical_response"
    - human tie: `human_ties: drop`                     -> dropped "human_tie"
                 `human_ties: use_reward`               -> oriented by the reward (equal scores:
                                                           dropped "score_tie"), after the near-tie rule
    - |m| < `tie_epsilon` (near tie; 0 disables)        -> dropped "near_tie"
    - with `min_margin_uncertainty: k` > 0: no score_std on a unit -> dropped "missing_uncertainty";
      |m| < k * sqrt(std_chosen² + std_rejected²) (the reward's order is within its ensemble's
      spread)                                           -> dropped "uncertain_margin"
    - m < 0 (the reward disagrees with the human label):
        policy `keep` -> kept as labelled, `drop` -> dropped "reward_disagrees", `flip` -> flipped
    - otherwise                                         -> kept
  so for every origin kept + flipped + sum(dropped) = pairs_in.

Units repeated with the same unit_id (identical input rows: ids are content-based) are set aside
first and counted as `duplicate_units`, so identical content never pairs with itself.

Every pair carries both scores and score_margin = score_chosen - score_rejected (>= 0 except for
pairs a `keep` policy kept against the reward). It is not called `margin`: TRL's RewardTrainer
reads a column of that name as its loss margin (see tasks.build_dpo for the opt-in one).

The rules are applied as sorts, run boundaries and masks over whole columns (pyarrow + numpy): the
input is sorted once by (prompt_id, score desc, unit_id) for best-of-N groups and by (row_id,
response_index) for preference rows, and each rule is a vector mask in the order listed above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.curation.rerank import float_column, group_starts

BEST_OF_N_MODES = ("best_worst", "all_pairs", "none")
PREFERENCE_POLICIES = ("keep", "drop", "flip", "none")
HUMAN_TIE_RULES = ("drop", "use_reward")
ASSISTANT = "assistant"


@dataclass(frozen=True)
class PairRules:
    best_of_n: str = "best_worst"
    min_margin: float = 0.0  # best-of-N: smallest score margin a pair may have
    group_kinds: tuple = ("best_of_n",)  # unit kinds grouped by prompt into best-of-N candidates
    preference: str = "flip"
    tie_epsilon: float = 0.0  # preference: |margin| below this is a near tie -> dropped
    human_ties: str = "drop"
    # k: keep a pair only when |margin| >= k * sqrt(std_a² + std_b²), the two units' ensemble spread
    # (score_std) combined; 0 disables. Both origins; a unit without score_std -> "missing_uncertainty".
    min_margin_uncertainty: float = 0.0

    def __post_init__(self):
        if self.best_of_n not in BEST_OF_N_MODES:
            raise ValueError(f"pairs.best_of_n must be one of {BEST_OF_N_MODES}, got {self.best_of_n!r}")
        if self.preference not in PREFERENCE_POLICIES:
            raise ValueError(f"pairs.preference must be one of {PREFERENCE_POLICIES}, got {self.preference!r}")
        if self.human_ties not in HUMAN_TIE_RULES:
            raise ValueError(f"pairs.human_ties must be one of {HUMAN_TIE_RULES}, got {self.human_ties!r}")
        if self.min_margin < 0 or self.tie_epsilon < 0:
            raise ValueError("pairs.min_margin and pairs.tie_epsilon must be >= 0")
        k = self.min_margin_uncertainty
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not np.isfinite(k) or k < 0:
            raise ValueError(f"pairs.min_margin_uncertainty must be a finite number >= 0, got {k!r}")


@dataclass
class PairCounts:
    pairs_in: int = 0
    kept: int = 0
    flipped: int = 0
    dropped: dict = field(default_factory=dict)
    duplicate_units: int = 0  # repeated unit_ids (identical rows in the input), set aside before pairing

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(n)

    def to_dict(self) -> dict:
        return {
            "pairs_in": self.pairs_in,
            "kept": self.kept,
            "flipped": self.flipped,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": sum(self.dropped.values()),
            "duplicate_units": self.duplicate_units,
        }


def merge_counts(parts: list[dict]) -> dict:
    total = PairCounts()
    for p in parts:
        total.pairs_in += p["pairs_in"]
        total.kept += p["kept"]
        total.flipped += p["flipped"]
        total.duplicate_units += p.get("duplicate_units", 0)
        for reason, n in p["dropped"].items():
            total.drop(reason, n)
    return total.to_dict()


# --- column helpers ------------------------------------------------------------------------------
def as_table(units) -> pa.Table:
    """Arrow table of units (pandas frames are converted; the tests and the report pass those)."""
    if isinstance(units, pa.Table):
        return units
    t = pa.Table.from_pandas(units, preserve_index=False)
    # pandas' string dtype arrives as large_string; the run's schema (and the outputs) use string.
    fields = [
        f.with_type(pa.string())
        if f.type == pa.large_string()
        else f.with_type(schema.MESSAGES)
        if f.name == "prompt"
        else f
        for f in t.schema
    ]
    return t.cast(pa.schema(fields))


def bool_column(table: pa.Table, name: str) -> np.ndarray:
    """A boolean column with nulls read as False."""
    return pc.fill_null(pc.cast(table.column(name), pa.bool_()), False).to_numpy(zero_copy_only=False)


def equals(table: pa.Table, name: str, value: str) -> np.ndarray:
    return pc.fill_null(pc.equal(table.column(name), value), False).to_numpy(zero_copy_only=False)


def is_in(table: pa.Table, name: str, values) -> np.ndarray:
    return pc.fill_null(pc.is_in(table.column(name), value_set=pa.array(list(values), pa.string())), False).to_numpy(
        zero_copy_only=False
    )


def unique_rows(table: pa.Table, rows: np.ndarray | None = None) -> np.ndarray:
    """Row indices (of `rows`, default all) keeping the first row of each unit_id, in unit_id order."""
    rows = np.arange(table.num_rows, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    ids = table.column("unit_id").take(rows) if len(rows) != table.num_rows else table.column("unit_id")
    order = pc.sort_indices(ids).to_numpy().astype(np.int64)
    if len(order) == 0:
        return order
    return rows[order[group_starts(ids.take(order).combine_chunks())]]


def sorted_runs(table: pa.Table, rows: np.ndarray, keys: list[tuple[str, str]], group: str):
    """`rows` sorted by `keys` (stable), with the start and size of each run of equal `group` values."""
    sub = table.select([k for k, _ in keys]).take(rows)
    order = pc.sort_indices(sub, keys).to_numpy().astype(np.int64) if len(rows) else np.zeros(0, dtype=np.int64)
    rows = rows[order]
    starts = group_starts(table.column(group).take(rows).combine_chunks()) if len(rows) else rows[:0]
    return rows, starts, np.diff(np.append(starts, len(rows)))


def same_text(table: pa.Table, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    resp = table.column("response")
    return pc.fill_null(pc.equal(resp.take(a), resp.take(b)), False).to_numpy(zero_copy_only=False)


def pair_spread(table: pa.Table, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sqrt(score_std[a]² + score_std[b]²): a pair's combined ensemble spread (NaN where either is missing)."""
    if "score_std" not in table.column_names:
        raise ValueError("pairs.min_margin_uncertainty: the units have no score_std column (label with an ensemble)")
    std = float_column(table, "score_std")
    return np.sqrt(std[a] ** 2 + std[b] ** 2)


@dataclass
class Candidates:
    """Pairs as row indices into the units table: `better` becomes chosen, `worse` rejected."""

    better: np.ndarray
    worse: np.ndarray
    origin: str
    flipped: np.ndarray  # bool: oriented against the human label
    agrees: np.ndarray  # float: 1 / 0 / NaN (unknown) - does the human order agree with the pair's

    @classmethod
    def empty(cls, origin: str) -> Candidates:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, origin, z.astype(bool), z.astype(np.float64))


# --- best-of-N --------------------------------------------------------------------------------------
def best_of_n_candidates(table: pa.Table, rows: np.ndarray, rules: PairRules) -> tuple[Candidates, PairCounts]:
    """Pairs among the responses to each prompt; `rows` are the unique units of the grouped kinds."""
    counts = PairCounts()
    if rules.best_of_n == "none":
        return Candidates.empty("best_of_n"), counts
    score = float_column(table, "score")
    rows = rows[~np.isnan(score[rows])]
    # Best first; equal scores ordered by unit_id so results do not depend on row order.
    keyed = table.select(["prompt_id", "unit_id"]).take(rows).append_column("score", pa.array(score[rows]))
    order = (
        pc.sort_indices(keyed, [("prompt_id", "ascending"), ("score", "descending"), ("unit_id", "ascending")])
        .to_numpy()
        .astype(np.int64)
        if len(rows)
        else np.zeros(0, dtype=np.int64)
    )
    rows = rows[order]
    starts = group_starts(keyed.column("prompt_id").take(order).combine_chunks()) if len(rows) else rows[:0]
    sizes = np.diff(np.append(starts, len(rows)))
    if rules.best_of_n == "best_worst":
        g = sizes >= 2
        better, worse = rows[starts[g]], rows[starts[g] + sizes[g] - 1]
    else:
        # Every pair (i < j) of positions within a group, one vectorised block per distinct group size.
        bs, ws = [], []
        for n in np.unique(sizes[sizes >= 2]):
            i, j = np.triu_indices(int(n), k=1)
            first = starts[sizes == n][:, None]
            bs.append(rows[(first + i).ravel()])
            ws.append(rows[(first + j).ravel()])
        better = np.concatenate(bs) if bs else rows[:0]
        worse = np.concatenate(ws) if ws else rows[:0]
    margin = score[better] - score[worse]
    identical = same_text(table, better, worse)
    tie = ~identical & (margin == 0.0)
    small = ~identical & ~tie & (margin < rules.min_margin)
    keep = ~identical & ~tie & ~small
    counts.pairs_in = len(better)
    counts.drop("identical_response", identical.sum())
    counts.drop("score_tie", tie.sum())
    counts.drop("below_min_margin", small.sum())
    if rules.min_margin_uncertainty > 0:
        u = pair_spread(table, better, worse)
        missing = keep & np.isnan(u)
        with np.errstate(invalid="ignore"):
            uncertain = keep & ~missing & (margin < rules.min_margin_uncertainty * u)
        counts.drop("missing_uncertainty", missing.sum())
        counts.drop("uncertain_margin", uncertain.sum())
        keep &= ~missing & ~uncertain
    counts.kept = int(keep.sum())
    hr = float_column(table, "human_rank")
    hb, hw = hr[better[keep]], hr[worse[keep]]
    agrees = np.where(np.isnan(hb) | np.isnan(hw) | (hb == hw), np.nan, (hb < hw).astype(np.float64))
    return Candidates(better[keep], worse[keep], "best_of_n", np.zeros(int(keep.sum()), dtype=bool), agrees), counts


# --- human preference rows -------------------------------------------------------------------------
def preference_candidates(table: pa.Table, rows: np.ndarray, rules: PairRules) -> tuple[Candidates, PairCounts]:
    """One candidate per preference row (units sharing a row_id); `rows` are the unique preference units."""
    counts = PairCounts()
    if rules.preference == "none":
        return Candidates.empty("preference"), counts
    rows, starts, sizes = sorted_runs(
        table, rows, [("row_id", "ascending"), ("response_index", "ascending"), ("unit_id", "ascending")], "row_id"
    )
    counts.pairs_in = len(starts)
    group = np.repeat(np.arange(len(starts)), sizes)
    per_group = lambda mask: np.bincount(group, weights=mask[rows], minlength=len(starts))  # noqa: E731
    two = sizes == 2
    is_tie = two & (per_group(bool_column(table, "tie")) > 0)
    chosen_label, rejected_label = equals(table, "preference", "chosen"), equals(table, "preference", "rejected")
    complete = two & (per_group(chosen_label) == 1) & (per_group(rejected_label) == 1)
    usable = is_tie | complete
    counts.drop("incomplete_pair", (~usable).sum())
    first, second = rows[starts[usable]], rows[starts[usable] + 1]
    tie = is_tie[usable]
    # A tie has no chosen side: keep the file order (response_index) until the reward decides.
    first_is_chosen = tie | chosen_label[first]
    c = np.where(first_is_chosen, first, second)
    r = np.where(first_is_chosen, second, first)
    score = float_column(table, "score")
    margin = score[c] - score[r]
    left = np.ones(len(c), dtype=bool)

    def rule(mask: np.ndarray, reason: str) -> None:
        hit = left & mask
        counts.drop(reason, hit.sum())
        left[hit] = False

    rule(np.isnan(margin), "missing_score")
    rule(same_text(table, c, r), "identical_response")
    if rules.human_ties == "drop":
        rule(tie, "human_tie")
    with np.errstate(invalid="ignore"):
        rule(np.abs(margin) < rules.tie_epsilon, "near_tie")
    rule(tie & (margin == 0.0), "score_tie")
    if rules.min_margin_uncertainty > 0:
        u = pair_spread(table, c, r)
        rule(np.isnan(u), "missing_uncertainty")
        with np.errstate(invalid="ignore"):
            rule(np.abs(margin) < rules.min_margin_uncertainty * u, "uncertain_margin")
    agree = margin >= 0
    if rules.preference == "drop":
        rule(~tie & ~agree, "reward_disagrees")
    # What is left is kept; ties are oriented by the reward, disagreeing pairs flipped under `flip`.
    swap = left & ((tie & (margin < 0)) | (~tie & ~agree & (rules.preference == "flip")))
    better, worse = np.where(swap, r, c)[left], np.where(swap, c, r)[left]
    flipped = (swap & ~tie)[left]
    agrees = np.where(tie, np.nan, agree.astype(np.float64))[left]
    counts.flipped = int(flipped.sum())
    counts.kept = int(left.sum()) - counts.flipped
    return Candidates(better, worse, "preference", flipped, agrees), counts


def make_pairs(units, rules: PairRules, rows: np.ndarray | None = None) -> tuple[pa.Table, dict[str, PairCounts]]:
    """All pairs of a set of whole prompts: preference rows pair within their row, the units of the
    kinds in `rules.group_kinds` pair among the responses to their prompt. Returns the pairs in
    TRL's conversational preference format (sorted by prompt_id, origin, chosen and rejected unit_id)
    and the counts per origin. `rows`: only these rows of `units` (e.g. those that passed the filters)."""
    table = as_table(units)
    rows = np.arange(table.num_rows, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    unique = unique_rows(table, rows)
    in_group, is_pref = is_in(table, "kind", rules.group_kinds), equals(table, "kind", "preference")
    bon, bon_counts = best_of_n_candidates(table, unique[in_group[unique]], rules)
    pref, pref_counts = preference_candidates(table, unique[is_pref[unique]], rules)
    # The same content twice (same unit_id) would otherwise pair with itself or give duplicate pairs.
    bon_counts.duplicate_units = int(in_group[rows].sum() - in_group[unique].sum())
    pref_counts.duplicate_units = int(is_pref[rows].sum() - is_pref[unique].sum())
    return pair_table(table, [bon, pref]), {"best_of_n": bon_counts, "preference": pref_counts}


PAIR_SCHEMA = pa.schema(
    [
        ("prompt", schema.MESSAGES),
        ("chosen", schema.MESSAGES),
        ("rejected", schema.MESSAGES),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("score_margin", pa.float64()),  # score_chosen - score_rejected (not TRL's loss `margin`)
        ("prompt_id", pa.string()),
        ("source", pa.string()),
        ("origin", pa.string()),  # best_of_n | preference
        ("action", pa.string()),  # kept | flipped (against the human label)
        ("human_agrees", pa.bool_()),  # does the human label / rank agree with the reward's order
        ("row_id", pa.string()),
        ("chosen_unit_id", pa.string()),
        ("rejected_unit_id", pa.string()),
    ]
)


def assistant_messages(texts) -> pa.Array:
    """One assistant message per text, as TRL's conversational message lists."""
    texts = pa.array(texts, pa.string()) if not isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    texts = texts.cast(pa.string())
    roles = pa.DictionaryArray.from_arrays(np.zeros(len(texts), dtype=np.int32), pa.array([ASSISTANT])).cast(
        pa.string()
    )
    return pa.ListArray.from_arrays(
        pa.array(np.arange(len(texts) + 1, dtype=np.int32)),
        pa.StructArray.from_arrays([roles, texts], fields=list(schema.MESSAGE)),
    )


def pair_table(table: pa.Table, parts: list[Candidates]) -> pa.Table:
    better = np.concatenate([p.better for p in parts]).astype(np.int64)
    worse = np.concatenate([p.worse for p in parts]).astype(np.int64)
    origin = np.concatenate([np.full(len(p.better), p.origin, dtype=object) for p in parts])
    flipped = np.concatenate([p.flipped for p in parts])
    agrees = np.concatenate([p.agrees for p in parts])
    is_pref = origin == "preference"
    score = float_column(table, "score")
    col = lambda name, idx: table.column(name).take(idx)  # noqa: E731
    out = pa.table(
        {
            "prompt": pc.cast(col("prompt", better), schema.MESSAGES),
            "chosen": assistant_messages(col("response", better)),
            "rejected": assistant_messages(col("response", worse)),
            "score_chosen": score[better],
            "score_rejected": score[worse],
            "score_margin": score[better] - score[worse],
            "prompt_id": col("prompt_id", better),
            "source": col("source", better),
            "origin": pa.array(origin, pa.string()),
            "action": pa.array(np.where(flipped, "flipped", "kept"), pa.string()),
            "human_agrees": pa.array(agrees == 1.0, pa.bool_(), mask=np.isnan(agrees)),
            "row_id": pc.if_else(pa.array(is_pref), col("row_id", better), pa.scalar(None, pa.string())),
            "chosen_unit_id": col("unit_id", better),
            "rejected_unit_id": col("unit_id", worse),
        },
        schema=PAIR_SCHEMA,
    )
    order = pc.sort_indices(
        out.select(["prompt_id", "origin", "chosen_unit_id", "rejected_unit_id"]),
        [
            ("prompt_id", "ascending"),
            ("origin", "ascending"),
            ("chosen_unit_id", "ascending"),
            ("rejected_unit_id", "ascending"),
        ],
    )
    return out.take(order).combine_chunks()


def human_pair_margins(units) -> np.ndarray:
    """score(human chosen) - score(human rejected) for every complete, untied preference row
    (the data a temperature for P(a beats b) is fitted on), ordered by row_id."""
    table = as_table(units)
    score = float_column(table, "score")
    chosen, rejected = equals(table, "preference", "chosen"), equals(table, "preference", "rejected")
    ok = equals(table, "kind", "preference") & ~bool_column(table, "tie") & ~np.isnan(score) & (chosen | rejected)
    rows, starts, sizes = sorted_runs(table, np.flatnonzero(ok), [("row_id", "ascending")], "row_id")
    group = np.repeat(np.arange(len(starts)), sizes)
    n_chosen = np.bincount(group, weights=chosen[rows], minlength=len(starts))
    complete = (sizes == 2) & (n_chosen == 1)
    a, b = rows[starts[complete]], rows[starts[complete] + 1]
    c, r = np.where(chosen[a], a, b), np.where(chosen[a], b, a)
    return score[c] - score[r]
