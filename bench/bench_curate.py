"""The curation job against the same selections written as DuckDB queries, side by side, on synthetic runs.

A synthetic labeled run in the project's output schema (19 objectives; half the units in best-of-N
groups of 4 with human ranks, half in human preference pairs; random texts of realistic length,
prompt ~ 350 and response ~ 1,200 characters, lognormal) is generated once per size under --data
(default /tmp/armolabel-bench-curate, never the repo). For each size and task:

  job:     `python -m jobs.curate --config ...` in a fresh process (embedded Ray start-up included)
  duckdb:  the same selection as one DuckDB query over the same Parquet, written to Parquet, in a
           fresh process (threads = CPUs)

  sft:     filters [score top 30 %], one_per_prompt, not human-rejected
  dpo:     best-of-N best vs worst (identical texts and score ties dropped) + human pairs, flipped
           when the reward disagrees
  rerank:  top 2 per prompt with rank and n_candidates (the job also computes top-1 / Kendall tau-b,
           which the query does not)

Before each measured process the run's files are read once (page cache warm for both ways alike).
Printed per run: wall time, units/s, peak memory of the process tree (sum of RSS over the process
and all its descendants, sampled every 0.2 s), rows out, the job / DuckDB time ratio and the load
average as each started (the machine may be shared). The last line is ONE JSON object with every
figure.

  .venv/bin/python bench/bench_curate.py --sizes 200000,800000
  .venv/bin/python bench/bench_curate.py --sizes 3200000 --tasks dpo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from pipeline import schema  # noqa: E402

OBJECTIVES = [f"bench.objective_{k:02d}" for k in range(19)]
UNITS_PER_FILE = 100_000
ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     etaoin", dtype=np.uint8)


def texts(rng, n: int, mean_chars: float) -> pa.Array:
    """n random texts of lognormal length, as slices of one random buffer (no Python per text)."""
    lengths = np.clip(rng.lognormal(np.log(mean_chars), 0.6, n), 8, 20 * mean_chars).astype(np.int64)
    pool = ALPHABET[rng.integers(0, len(ALPHABET), int(lengths.sum()) + 1)]
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(pool.tobytes())).cast(pa.string())


def hex_ids(prefix: str, values: np.ndarray) -> pa.Array:
    return pa.array([f"{prefix}{v:016x}" for v in values.tolist()], pa.string())


CHUNK_UNITS = 400_000


def synthetic_run(n_units: int, out: Path, seed: int = 0) -> Path:
    """Write a labeled run of n_units units (half best-of-N groups of 4, half preference pairs), in
    chunks of at most CHUNK_UNITS units (bounded memory): each chunk is shuffled and cut into files,
    so the units of a prompt land in different files of their chunk."""
    if (out / "data").exists() and (out / "done").exists():
        return out
    (out / "data").mkdir(parents=True, exist_ok=True)
    file_no = 0
    for k, lo in enumerate(range(0, n_units, CHUNK_UNITS)):
        table = synthetic_chunk(min(CHUNK_UNITS, n_units - lo), seed + k)
        for start in range(0, table.num_rows, UNITS_PER_FILE):
            pq.write_table(
                table.slice(start, UNITS_PER_FILE),
                out / "data" / f"part-{file_no:05d}.parquet",
                row_group_size=50_000,
                compression="zstd",
            )
            file_no += 1
        del table
    (out / "manifest.json").write_text(json.dumps({"run_id": f"bench-{n_units}", "objectives": OBJECTIVES}))
    (out / "done").write_text("")
    return out


def synthetic_chunk(n_units: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n_bon_prompts, n_pref_rows = n_units // 8, n_units // 4  # 4 units / group, 2 units / row
    n = n_bon_prompts * 4 + n_pref_rows * 2
    group = np.concatenate(
        [np.repeat(np.arange(n_bon_prompts), 4), n_bon_prompts + np.repeat(np.arange(n_pref_rows), 2)]
    )
    index = np.concatenate([np.tile(np.arange(4), n_bon_prompts), np.tile(np.arange(2), n_pref_rows)]).astype(np.int32)
    is_bon = np.arange(n) < n_bon_prompts * 4
    prompt_key = rng.integers(0, 2**62, n_bon_prompts + n_pref_rows)
    pid = hex_ids("p", prompt_key[group])
    rid = hex_ids("r", prompt_key[group] ^ 0x5A5A)
    uid = pa.array([f"{r}-{i}" for r, i in zip(rid.to_pylist(), index.tolist())], pa.string())
    prompts_text = texts(rng, n_bon_prompts + n_pref_rows, 350).take(pa.array(group))
    role = pa.array(["user"] * n, pa.string())
    prompt = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32)),
        pa.StructArray.from_arrays([role, prompts_text], fields=list(schema.MESSAGE)),
    )
    response = texts(rng, n, 1200)
    score = rng.normal(0, 1, n).astype(np.float32)
    # human ranks within each group of 4: a noisy copy of the score order
    noisy = score + rng.normal(0, 1, n).astype(np.float32)
    hr = np.zeros(n, dtype=np.int32)
    bon_noisy = noisy[is_bon].reshape(-1, 4)
    hr[is_bon] = np.argsort(np.argsort(-bon_noisy, axis=1), axis=1).reshape(-1)
    pref = np.where(index == 0, "chosen", "rejected")  # null for best-of-N units (mask below)
    columns = {
        "unit_id": uid,
        "row_id": rid,
        "prompt_id": pid,
        "kind": pa.array(np.where(is_bon, "best_of_n", "preference"), pa.string()),
        "source": pa.array(np.where(is_bon, "bench-bon", "bench-pref"), pa.string()),
        "source_uri": pa.array(["/synthetic"] * n, pa.string()),
        "source_row": pa.array(group.astype(np.int64)),
        "prompt": prompt,
        "response": response,
        "response_index": pa.array(index),
        "n_responses": pa.array(np.where(is_bon, 4, 2).astype(np.int32)),
        "preference": pa.array(pref, pa.string(), mask=is_bon),
        "tie": pa.array(np.zeros(n, dtype=bool), pa.bool_(), mask=is_bon),
        "human_rank": pa.array(hr, pa.int32(), mask=~is_bon),
        "response_tokens": pa.array(np.asarray(pc.utf8_length(response)) // 4, pa.int32()),
        "truncated": pa.array(np.zeros(n, dtype=bool)),
        "score": pa.array(score),
        "backbone_fingerprint": pa.array(["bench"] * n, pa.string()),
        "heads_fingerprint": pa.array(["bench"] * n, pa.string()),
        "run_id": pa.array(["bench"] * n, pa.string()),
    }
    for obj in OBJECTIVES:
        r = (score * rng.uniform(0.2, 1.0) + rng.normal(0, 0.5, n)).astype(np.float32)
        columns[schema.objective_column(schema.RATING_PREFIX, obj)] = pa.array(r)
        columns[schema.objective_column(schema.DEBIASED_PREFIX, obj)] = pa.array((r - 0.01).astype(np.float32))
        columns[schema.objective_column(schema.GATE_PREFIX, obj)] = pa.array(np.full(n, 1 / 19, dtype=np.float32))
    out_schema = schema.output_schema(OBJECTIVES)
    table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in out_schema}, schema=out_schema)
    # Arrival order is arbitrary: the units of a prompt land in different files.
    return table.take(pa.array(rng.permutation(n)))


JOB_CONFIGS: dict[str, dict] = {
    "sft": {"filters": [{"column": "score", "top": 0.3}], "sft": {"one_per_prompt": True}},
    "dpo": {"pairs": {"best_of_n": "best_worst", "preference": "flip"}},
    "rerank": {"rerank": {"top_k": 2}},
}

DEDUP = "(SELECT * FROM read_parquet('{run}/data/*.parquet') QUALIFY row_number() OVER (PARTITION BY unit_id) = 1)"
MESSAGES = "list_append(prompt, {'role': 'assistant', 'content': response})"
QUERIES = {
    "sft": f"""
        WITH u AS {DEDUP},
        k AS (SELECT CAST(ceil(0.3 * count(score)) AS BIGINT) AS k FROM read_parquet('{{run}}/data/*.parquet')),
        cut AS (SELECT score AS c FROM read_parquet('{{run}}/data/*.parquet') WHERE score IS NOT NULL
                ORDER BY score DESC LIMIT 1 OFFSET (SELECT k - 1 FROM k)),
        kept AS (SELECT * FROM u WHERE coalesce(preference, '') <> 'rejected' AND score >= (SELECT c FROM cut)
                 QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY score DESC, unit_id) = 1)
        SELECT {MESSAGES} AS messages, prompt_id, unit_id, row_id, source, kind, score, COLUMNS('^(rating|debiased)_')
        FROM kept ORDER BY prompt_id, unit_id""",
    "dpo": f"""
        WITH u AS {DEDUP},
        g AS (SELECT *, row_number() OVER (PARTITION BY prompt_id ORDER BY score DESC, unit_id) AS best,
                        row_number() OVER (PARTITION BY prompt_id ORDER BY score ASC, unit_id DESC) AS worst,
                        count(*) OVER (PARTITION BY prompt_id) AS n
              FROM u WHERE kind = 'best_of_n' AND score IS NOT NULL),
        b AS (SELECT * FROM g WHERE best = 1 AND n >= 2), w AS (SELECT * FROM g WHERE worst = 1 AND n >= 2),
        bon AS (SELECT b.prompt, b.response AS c_text, w.response AS r_text, b.score AS sc, w.score AS sr,
                       b.prompt_id, b.source, 'best_of_n' AS origin, 'kept' AS action, b.unit_id AS cu, w.unit_id AS ru,
                       NULL AS row_id
                FROM b JOIN w USING (prompt_id) WHERE b.response <> w.response AND b.score > w.score),
        c AS (SELECT * FROM u WHERE kind = 'preference' AND preference = 'chosen'),
        r AS (SELECT * FROM u WHERE kind = 'preference' AND preference = 'rejected'),
        pref AS (SELECT c.prompt,
                        CASE WHEN c.score >= r.score THEN c.response ELSE r.response END AS c_text,
                        CASE WHEN c.score >= r.score THEN r.response ELSE c.response END AS r_text,
                        greatest(c.score, r.score) AS sc, least(c.score, r.score) AS sr, c.prompt_id, c.source,
                        'preference' AS origin, CASE WHEN c.score >= r.score THEN 'kept' ELSE 'flipped' END AS action,
                        CASE WHEN c.score >= r.score THEN c.unit_id ELSE r.unit_id END AS cu,
                        CASE WHEN c.score >= r.score THEN r.unit_id ELSE c.unit_id END AS ru, c.row_id
                 FROM c JOIN r USING (row_id) WHERE c.response <> r.response AND c.score IS NOT NULL
                 AND r.score IS NOT NULL)
        SELECT prompt, [{{'role': 'assistant', 'content': c_text}}] AS chosen,
               [{{'role': 'assistant', 'content': r_text}}] AS rejected, sc AS score_chosen, sr AS score_rejected,
               sc - sr AS score_margin, 1 / (1 + exp(-(sc - sr))) AS p_chosen, prompt_id, source, origin, action,
               row_id, cu AS chosen_unit_id, ru AS rejected_unit_id
        FROM (SELECT * FROM bon UNION ALL SELECT * FROM pref) ORDER BY prompt_id, origin, cu, ru""",
    "rerank": f"""
        WITH u AS {DEDUP},
        ranked AS (SELECT *, CAST(row_number() OVER (PARTITION BY prompt_id ORDER BY score DESC, unit_id) - 1 AS INT)
                            AS rank, CAST(count(*) OVER (PARTITION BY prompt_id) AS INT) AS n_candidates
                   FROM u WHERE score IS NOT NULL)
        SELECT {MESSAGES} AS messages, prompt_id, unit_id, row_id, source, kind, rank, n_candidates, score,
               human_rank, COLUMNS('^(rating|debiased)_')
        FROM ranked WHERE rank < 2 ORDER BY prompt_id, rank""",
}


def duckdb_script(task: str, run: Path, out: Path) -> str:
    query = QUERIES[task].replace("{run}", str(run))
    return (
        f"import duckdb, os\ncon = duckdb.connect()\ncon.execute('SET threads TO {os.cpu_count()}')\n"
        f"con.execute('SET preserve_insertion_order = false')\n"
        f'con.execute("""COPY ({query}) TO \'{out}\' (FORMAT parquet, COMPRESSION zstd)""")\n'
        f"print(con.execute(\"SELECT count(*) FROM read_parquet('{out}')\").fetchone()[0])\n"
    )


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; wall time and peak summed RSS of its process tree."""
    load_before = load()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    peak = [0]
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            done.wait(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(peak[0] / 2**30, 2),
        "load_before": load_before,  # 1-minute load average when it started (the machine may be shared)
        "output": output,
    }


def warm_cache(run: Path) -> None:
    """Read every file of the run once, so that each measured process starts with the run in the page
    cache: otherwise whichever way runs first pays the disk reads (other processes on a shared
    machine evict the cache between runs)."""
    for f in sorted((run / "data").glob("*.parquet")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run_job(task: str, run: Path, work: Path) -> dict:
    out = work / f"job-{task}"
    cfg = {"task": task, "run": str(run), "output": str(out), **JOB_CONFIGS[task]}
    (work / f"{task}.yaml").write_text(yaml.safe_dump(cfg))
    warm_cache(run)
    m = measured(
        [sys.executable, "-m", "jobs.curate", "--config", str(work / f"{task}.yaml")], {"RAY_USAGE_STATS_ENABLED": "0"}
    )
    man = json.loads((out / "manifest.json").read_text())
    m.update(rows_out=man["rows_out"], files=len(man["output"]["files"]), partitions=man.get("partitions"))
    m.pop("output")
    return m


def run_duckdb(task: str, run: Path, work: Path) -> dict:
    out = work / f"duckdb-{task}.parquet"
    script = work / f"duckdb-{task}.py"
    script.write_text(duckdb_script(task, run, out))
    warm_cache(run)
    m = measured([sys.executable, str(script)])
    m["rows_out"] = int(m.pop("output").strip().splitlines()[-1])
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200000,800000,3200000", help="comma-separated run sizes (units)")
    ap.add_argument("--tasks", default="sft,dpo,rerank")
    ap.add_argument("--data", default="/tmp/armolabel-bench-curate", help="where synthetic runs are cached")
    args = ap.parse_args()
    data = Path(args.data)
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        run = synthetic_run(size, data / f"run-{size}")
        n_units = pq.ParquetDataset(run / "data").read(columns=["score"]).num_rows
        print(f"== {n_units} units ({run}, ready in {time.perf_counter() - t0:.1f} s)", flush=True)
        work = data / f"work-{size}"
        work.mkdir(parents=True, exist_ok=True)
        for task in args.tasks.split(","):
            job = run_job(task, run, work)
            duck = run_duckdb(task, run, work)
            r = {
                "units": n_units,
                "task": task,
                "job": job,
                "duckdb": duck,
                "job_units_per_s": round(n_units / job["wall_s"]),
                "duckdb_units_per_s": round(n_units / duck["wall_s"]),
                "time_ratio_job_over_duckdb": round(job["wall_s"] / duck["wall_s"], 2),
            }
            results.append(r)
            print(
                f"{task:7s} job {job['wall_s']:7.1f} s {r['job_units_per_s']:>9,} units/s "
                f"peak {job['peak_rss_gb']:5.2f} GB rows {job['rows_out']:>9,} ({job['partitions']} partitions) | "
                f"duckdb {duck['wall_s']:6.1f} s peak {duck['peak_rss_gb']:5.2f} GB rows {duck['rows_out']:>9,} | "
                f"ratio {r['time_ratio_job_over_duckdb']:.2f}x | load {job['load_before']} / {duck['load_before']}",
                flush=True,
            )
    print(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version(),
                },
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
