"""DPO pairs from scored units, as pure functions over the units of ONE prompt.

Two origins:

* best-of-N groups (units of the same prompt_id, default kind `best_of_n`): the higher-scored
  response is `chosen`. Mode `best_worst` makes one candidate per prompt (highest vs lowest score;
  score ties broken by unit_id so the choice never depends on row order); mode `all_pairs` makes every
  pair of distinct responses a candidate. A candidate is dropped when
    - the two responses have identical text             -> "identical_response"
    - the scores are equal (no direction)               -> "score_tie"
    - the margin is below `min_margin`                  -> "below_min_margin"
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
    - m < 0 (the reward disagrees with the human label):
        policy `keep` -> kept as labelled, `drop` -> dropped "reward_disagrees", `flip` -> flipped
    - otherwise                                         -> kept
  so for every origin kept + flipped + sum(dropped) = pairs_in.

Units repeated with the same unit_id (identical input rows: ids are content-based) are set aside
first and counted as `duplicate_units`, so identical content never pairs with itself.

Every pair carries both scores and margin = score_chosen - score_rejected (>= 0 except for pairs a
`keep` policy kept against the reward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

BEST_OF_N_MODES = ("best_worst", "all_pairs", "none")
PREFERENCE_POLICIES = ("keep", "drop", "flip", "none")
HUMAN_TIE_RULES = ("drop", "use_reward")


@dataclass(frozen=True)
class PairRules:
    best_of_n: str = "best_worst"
    min_margin: float = 0.0                  # best-of-N: smallest score margin a pair may have
    group_kinds: tuple = ("best_of_n",)      # unit kinds grouped by prompt into best-of-N candidates
    preference: str = "flip"
    tie_epsilon: float = 0.0                 # preference: |margin| below this is a near tie -> dropped
    human_ties: str = "drop"

    def __post_init__(self):
        if self.best_of_n not in BEST_OF_N_MODES:
            raise ValueError(f"pairs.best_of_n must be one of {BEST_OF_N_MODES}, got {self.best_of_n!r}")
        if self.preference not in PREFERENCE_POLICIES:
            raise ValueError(f"pairs.preference must be one of {PREFERENCE_POLICIES}, got {self.preference!r}")
        if self.human_ties not in HUMAN_TIE_RULES:
            raise ValueError(f"pairs.human_ties must be one of {HUMAN_TIE_RULES}, got {self.human_ties!r}")
        if self.min_margin < 0 or self.tie_epsilon < 0:
            raise ValueError("pairs.min_margin and pairs.tie_epsilon must be >= 0")


@dataclass
class PairCounts:
    pairs_in: int = 0
    kept: int = 0
    flipped: int = 0
    dropped: dict = field(default_factory=dict)
    duplicate_units: int = 0   # repeated unit_ids (identical rows in the input), set aside before pairing

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return {"pairs_in": self.pairs_in, "kept": self.kept, "flipped": self.flipped,
                "dropped": dict(sorted(self.dropped.items())), "dropped_total": sum(self.dropped.values()),
                "duplicate_units": self.duplicate_units}


def merge_counts(parts: list[dict]) -> dict:
    total = PairCounts()
    for p in parts:
        total.pairs_in += p["pairs_in"]
        total.kept += p["kept"]
        total.flipped += p["flipped"]
        total.duplicate_units += p.get("duplicate_units", 0)
        for reason, n in p["dropped"].items():
            total.dropped[reason] = total.dropped.get(reason, 0) + n
    return total.to_dict()


def _pair(chosen: pd.Series, rejected: pd.Series, origin: str, action: str, human_agrees) -> dict:
    sc, sr = float(chosen["score"]), float(rejected["score"])
    return {
        "prompt_id": chosen["prompt_id"],
        "row_id": chosen["row_id"] if origin == "preference" else None,
        "source": chosen["source"],
        "origin": origin,
        "prompt": list(chosen["prompt"]),
        "chosen_response": chosen["response"],
        "rejected_response": rejected["response"],
        "chosen_unit_id": chosen["unit_id"],
        "rejected_unit_id": rejected["unit_id"],
        "score_chosen": sc,
        "score_rejected": sr,
        "margin": sc - sr,
        "action": action,
        "human_agrees": human_agrees,
    }


def _human_agrees(better: pd.Series, worse: pd.Series):
    """Whether the human ranks agree with the reward's order (None when either is unranked)."""
    hb, hw = better.get("human_rank"), worse.get("human_rank")
    if hb is None or hw is None or pd.isna(hb) or pd.isna(hw) or hb == hw:
        return None
    return bool(hb < hw)


def best_of_n_pairs(units: pd.DataFrame, rules: PairRules) -> tuple[list[dict], PairCounts]:
    """Pairs among the responses to one prompt (`units` all share a prompt_id)."""
    counts = PairCounts()
    if rules.best_of_n == "none":
        return [], counts
    scored = units[~pd.isna(units["score"])]
    # Best first; equal scores ordered by unit_id so results do not depend on row order.
    ordered = scored.assign(_neg=-scored["score"].astype("float64")).sort_values(["_neg", "unit_id"],
                                                                                kind="mergesort")
    rows = [r for _, r in ordered.iterrows()]
    if len(rows) < 2:
        return [], counts
    if rules.best_of_n == "best_worst":
        candidates = [(rows[0], rows[-1])]
    else:
        candidates = list(combinations(rows, 2))
    pairs = []
    for better, worse in candidates:
        counts.pairs_in += 1
        margin = float(better["score"]) - float(worse["score"])
        if better["response"] == worse["response"]:
            counts.drop("identical_response")
        elif margin == 0.0:
            counts.drop("score_tie")
        elif margin < rules.min_margin:
            counts.drop("below_min_margin")
        else:
            counts.kept += 1
            pairs.append(_pair(better, worse, "best_of_n", "kept", _human_agrees(better, worse)))
    return pairs, counts


def preference_pairs(units: pd.DataFrame, rules: PairRules) -> tuple[list[dict], PairCounts]:
    """One candidate per preference row (its units share a row_id); see the module doc for the rule."""
    counts = PairCounts()
    if rules.preference == "none":
        return [], counts
    pairs = []
    for _, row in sorted(units.groupby("row_id", sort=False), key=lambda kv: kv[0]):
        counts.pairs_in += 1
        is_tie = len(row) == 2 and bool(row["tie"].astype("boolean").fillna(False).any())
        labels = sorted(p for p in row["preference"] if isinstance(p, str))
        if is_tie:
            # A tie has no chosen side: keep the file order (response_index) until the reward decides.
            chosen, rejected = (r for _, r in row.sort_values("response_index").iterrows())
        elif len(row) != 2 or labels != ["chosen", "rejected"]:
            counts.drop("incomplete_pair")
            continue
        else:
            chosen = row[row["preference"].isin(["chosen"])].iloc[0]
            rejected = row[row["preference"].isin(["rejected"])].iloc[0]
        if pd.isna(chosen["score"]) or pd.isna(rejected["score"]):
            counts.drop("missing_score")
            continue
        if chosen["response"] == rejected["response"]:
            counts.drop("identical_response")
            continue
        if is_tie and rules.human_ties == "drop":
            counts.drop("human_tie")
            continue
        margin = float(chosen["score"]) - float(rejected["score"])
        if abs(margin) < rules.tie_epsilon:
            counts.drop("near_tie")
            continue
        if is_tie and margin == 0.0:
            counts.drop("score_tie")
            continue
        if is_tie:
            # No human direction: the reward orients the pair.
            better, worse = (chosen, rejected) if margin > 0 else (rejected, chosen)
            counts.kept += 1
            pairs.append(_pair(better, worse, "preference", "kept", None))
        elif margin >= 0:
            counts.kept += 1
            pairs.append(_pair(chosen, rejected, "preference", "kept", True))
        elif rules.preference == "keep":
            counts.kept += 1
            pairs.append(_pair(chosen, rejected, "preference", "kept", False))
        elif rules.preference == "drop":
            counts.drop("reward_disagrees")
        else:
            counts.flipped += 1
            pairs.append(_pair(rejected, chosen, "preference", "flipped", False))
    return pairs, counts


def pairs_for_prompt(units: pd.DataFrame, rules: PairRules) -> tuple[list[dict], dict[str, PairCounts]]:
    """All pairs for the units of one prompt: preference rows pair within their row, the units of the
    kinds in `rules.group_kinds` pair among themselves."""
    unique = units.sort_values("unit_id", kind="mergesort").drop_duplicates("unit_id")
    pref = unique[unique["kind"].isin(["preference"])]
    group = unique[unique["kind"].isin(list(rules.group_kinds))]
    bon_pairs, bon_counts = best_of_n_pairs(group, rules) if len(group) else ([], PairCounts())
    pref_pairs, pref_counts = preference_pairs(pref, rules) if len(pref) else ([], PairCounts())
    # The same content twice (same unit_id) would otherwise pair with itself or give duplicate pairs.
    bon_counts.duplicate_units = int(units["kind"].isin(list(rules.group_kinds)).sum()) - len(group)
    pref_counts.duplicate_units = int(units["kind"].isin(["preference"]).sum()) - len(pref)
    return bon_pairs + pref_pairs, {"best_of_n": bon_counts, "preference": pref_counts}


def human_pair_margins(units: pd.DataFrame) -> np.ndarray:
    """score(human chosen) - score(human rejected) for every complete, untied preference row
    (the data a temperature for P(a beats b) is fitted on), ordered by row_id."""
    tie = units["tie"].astype("boolean").fillna(False).to_numpy(dtype=bool)
    pref = units[units["kind"].isin(["preference"]).to_numpy() & ~tie & ~pd.isna(units["score"]).to_numpy()]
    pref = pref[pref["preference"].isin(["chosen", "rejected"])]
    complete = pref.groupby("row_id")["preference"].transform(lambda p: sorted(p) == ["chosen", "rejected"])
    pref = pref[complete.astype(bool)]
    chosen = pref[pref["preference"].isin(["chosen"])].set_index("row_id")["score"].astype("float64")
    rejected = pref[pref["preference"].isin(["rejected"])].set_index("row_id")["score"].astype("float64")
    return (chosen - rejected.reindex(chosen.index)).sort_index().to_numpy()


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def to_trl(pairs: list[dict]) -> pd.DataFrame:
    """TRL's conversational preference format (prompt messages; chosen/rejected as assistant message
    lists) plus scores, margin and provenance."""
    columns = ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin", "prompt_id", "source",
               "origin", "action", "human_agrees", "row_id", "chosen_unit_id", "rejected_unit_id"]
    if not pairs:
        return pd.DataFrame({c: [] for c in columns})
    df = pd.DataFrame(pairs)
    df["prompt"] = [[{"role": m["role"], "content": m["content"]} for m in p] for p in df["prompt"]]
    df["chosen"] = [assistant(t) for t in df["chosen_response"]]
    df["rejected"] = [assistant(t) for t in df["rejected_response"]]
    df["margin"] = df["margin"].astype(np.float64)
    return df[columns]
