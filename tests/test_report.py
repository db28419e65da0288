"""The HTML report rendered in real headless Chromium: the DOM Chromium builds holds one chart per
source / objective carrying the run's real numbers, and the screenshot is a drawn page, not blank.
Chromium comes from infra/test-deps.sh."""

import json
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from curation_fixtures import load_units

from jobs import report as report_cli
from pipeline import schema
from pipeline.curation.job import merge_bucket_counts
from pipeline.curation.pairs import PairRules
from pipeline.curation.tasks import build_dpo, select_sft
from pipeline.curation.thresholds import parse_filters, resolve_filters

CHROMIUM = "/usr/bin/chromium"


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).exists(), "headless Chromium missing: run `bash infra/test-deps.sh`"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True)


class Elements(HTMLParser):
    """Every element with its attributes and the text directly inside it, in document order."""

    def __init__(self):
        super().__init__()
        self.elements, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        el = {
            "tag": tag,
            "attrs": dict(attrs),
            "text": "",
            "parents": [e["tag"] for e in self.stack],
            "parent_attrs": [e["attrs"] for e in self.stack],
        }
        self.elements.append(el)
        self.stack.append(el)  # void / self-closed elements get their end tag from handle_startendtag

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        if self.stack:
            self.stack[-1]["text"] += data

    def find(self, tag, cls=None, **attrs):
        out = []
        for e in self.elements:
            if e["tag"] != tag or (cls and cls not in e["attrs"].get("class", "").split()):
                continue
            if all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items()):
                out.append(e)
        return out

    def inside(self, container, tag):
        """Elements of `tag` nested in `container` (ancestors matched by identity)."""
        return [e for e in self.elements if e["tag"] == tag and any(a is container["attrs"] for a in e["parent_attrs"])]


def decode_png(data: bytes) -> np.ndarray:
    """8-bit RGB/RGBA PNG -> (h, w, channels) array; enough of the format for Chromium screenshots."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    assert depth == 8 and color in (2, 6)
    ch = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * ch)
    img = np.zeros((height, width * ch), dtype=np.int32)
    prev = np.zeros(width * ch, dtype=np.int32)
    for y in range(height):
        ftype, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        cur = np.zeros_like(line)
        if ftype in (0, 2):
            cur = (line + (prev if ftype == 2 else 0)) % 256
        else:
            for x in range(len(line)):
                a = cur[x - ch] if x >= ch else 0
                b = prev[x]
                c = prev[x - ch] if x >= ch else 0
                if ftype == 1:
                    pred = a
                elif ftype == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[x] = (line[x] + pred) % 256
        img[y] = cur
        prev = cur
    return img.reshape(height, width, ch).astype(np.uint8)


def curation_manifests(units, tmp_path):
    """Manifests as the jobs write them, from the pure task functions over the whole run."""
    filters = parse_filters([{"column": "score", "top": 0.5}, {"objective": "pandalm.helpfulness", "min": 0.5}])
    filters = resolve_filters(filters, {"score": units["score"].to_numpy()})
    _, sft_counts = select_sft(units, filters, one_per_prompt=True)
    _, dpo_counts = build_dpo(units, [], PairRules(best_of_n="all_pairs", min_margin=0.02, tie_epsilon=0.01))
    paths = []
    for task, counts in (("sft", sft_counts), ("dpo", dpo_counts)):
        man = {"task": task, "config": {"output": f"runs/curated/{task}"}, **merge_bucket_counts([counts])}
        paths.append(tmp_path / f"{task}-manifest.json")
        paths[-1].write_text(json.dumps(man))
    return paths, sft_counts, dpo_counts


@pytest.mark.slow
@pytest.mark.parametrize("which", ["stand_in_scores", "labeling_job"])
def test_report_renders_real_run_data_in_chromium(which, annotated_run, tmp_path, request):
    """On the fixture run and on a run written by the real labeling job (SmolLM2 + trained heads)."""
    if which == "labeling_job":
        annotated_run = request.getfixturevalue("labeled_run")
    OBJECTIVES = json.loads((annotated_run / "manifest.json").read_text())["objectives"]
    units = load_units(annotated_run)
    manifests, sft_counts, dpo_counts = curation_manifests(units, tmp_path)
    out = tmp_path / "report.html"
    assert (
        report_cli.main(
            [
                "--run",
                str(annotated_run),
                "--out",
                str(out),
                *sum((["--curation-manifest", str(m)] for m in manifests), []),
            ]
        )
        == 0
    )
    text = out.read_text()
    # self-contained: nothing to fetch (the only URL is the SVG namespace)
    assert "<script" not in text and "<link" not in text and " src=" not in text
    assert {u for u in text.split('"') if u.startswith(("http://", "https://"))} == {"http://www.w3.org/2000/svg"}

    dom = Elements()
    dom.feed(chromium(tmp_path, "--dump-dom", out.as_uri()).stdout)
    sources = sorted(units["source"].unique())

    # score distribution: one histogram per source, its bars add up to the source's units
    hists = dom.find("svg", "score-hist")
    assert sorted(h["attrs"]["data-source"] for h in hists) == sources
    for h in hists:
        n = int((units["source"] == h["attrs"]["data-source"]).sum())
        assert int(h["attrs"]["data-count"]) == n
        assert (
            sum(int(b["attrs"]["data-count"]) for b in dom.inside(h, "rect") if "bar" in b["attrs"].get("class", ""))
            == n
        )
        labels = {t["text"] for t in dom.inside(h, "text") if t["attrs"].get("class") in ("x-label", "y-label")}
        assert labels == {"score", "units"}

    # per-objective ratings: one chart per objective, one box per source with its count and median
    boxes = dom.find("svg", "objective-box")
    assert sorted(b["attrs"]["data-objective"] for b in boxes) == sorted(OBJECTIVES)
    for chart in boxes:
        col = schema.objective_column(schema.RATING_PREFIX, chart["attrs"]["data-objective"])
        groups = {g["attrs"]["data-group"]: g["attrs"] for g in dom.inside(chart, "g") if "data-group" in g["attrs"]}
        assert sorted(groups) == sources
        for src, attrs in groups.items():
            values = units.loc[units["source"] == src, col].astype(float)
            assert int(attrs["data-count"]) == len(values)
            assert float(attrs["data-median"]) == pytest.approx(values.median(), rel=1e-5)

    # mean gate weights per source
    gates = dom.find("svg", id="gates-chart")[0]
    segments = [s["attrs"] for s in dom.inside(gates, "rect") if "segment" in s["attrs"].get("class", "")]
    assert len(segments) == len(sources) * len(OBJECTIVES)
    for seg in dom.inside(gates, "rect"):
        if "segment" not in seg["attrs"].get("class", ""):
            continue
        src = next(a["data-group"] for a in seg["parent_attrs"] if "data-group" in a)
        col = schema.objective_column(schema.GATE_PREFIX, seg["attrs"]["data-segment"])
        assert float(seg["attrs"]["data-value"]) == pytest.approx(
            units.loc[units["source"] == src, col].astype(float).mean(), rel=1e-5
        )

    # correlations between objectives
    corr = units[[schema.objective_column(schema.RATING_PREFIX, o) for o in OBJECTIVES]].astype(float).corr()
    cells = dom.inside(dom.find("svg", id="correlation-chart")[0], "rect")
    cells = [c["attrs"] for c in cells if c["attrs"].get("class") == "cell"]
    assert len(cells) == len(OBJECTIVES) ** 2
    for c in cells:
        i, j = OBJECTIVES.index(c["data-row"]), OBJECTIVES.index(c["data-col"])
        assert float(c["data-value"]) == pytest.approx(corr.iloc[i, j], abs=1e-5)

    # what each threshold removed, from the SFT manifest
    removed = {
        g["attrs"]["data-label"]: float(g["attrs"]["data-value"])
        for g in dom.inside(dom.find("svg", id="thresholds-removed")[0], "g")
        if "data-label" in g["attrs"]
    }
    expected = {s["label"]: s["removed"] for s in sft_counts["selection"] + sft_counts["filters"]}
    expected["one response per prompt"] = sft_counts["one_per_prompt_removed"]
    assert removed == expected and expected["score top 0.5"] > 0
    outcomes = {
        g["attrs"]["data-label"]: float(g["attrs"]["data-value"])
        for g in dom.inside(dom.find("svg", "pair-outcomes", data_origin="preference")[0], "g")
        if "data-label" in g["attrs"]
    }
    pref = dpo_counts["pairs"]["preference"]
    assert outcomes["kept"] == pref["kept"] and outcomes["flipped"] == pref["flipped"]
    assert sum(outcomes.values()) == pref["pairs_in"]

    # best-of-N agreement: only OASST has human ranks
    assert [h["attrs"]["data-source"] for h in dom.find("svg", "tau-hist")] == ["oasst"]
    bars = {
        g["attrs"]["data-label"]: float(g["attrs"]["data-value"])
        for g in dom.inside(dom.find("svg", id="agreement-chart")[0], "g")
        if "data-label" in g["attrs"]
    }
    bon = units[units["kind"] == "best_of_n"].drop_duplicates("unit_id")
    hits = groups = 0
    for _, g in bon.groupby("prompt_id"):
        if g["human_rank"].notna().sum() >= 2:
            groups += 1
            best = g.sort_values(["score", "unit_id"], ascending=[False, True]).iloc[0]
            hits += int(best["human_rank"] == g["human_rank"].min())
    assert bars["oasst: model"] == pytest.approx(hits / groups, rel=1e-6)


@pytest.mark.slow
def test_report_screenshot_is_a_drawn_page(annotated_run, tmp_path):
    out = tmp_path / "report.html"
    assert report_cli.main(["--run", str(annotated_run), "--out", str(out)]) == 0
    png = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,2000", out.as_uri())
    img = decode_png(png.read_bytes())[:, :, :3]
    assert img.shape[:2] == (2000, 1280)
    non_white = np.any(img < 245, axis=2)
    assert 0.02 < non_white.mean() < 0.9
    colors = {tuple(c) for c in img.reshape(-1, 3)[::7]}
    assert len(colors) > 50
    # the first source's histogram bars are drawn in the first palette colour (#4e79a7)
    assert np.sum(np.all(img == np.array([0x4E, 0x79, 0xA7]), axis=2)) > 500


def test_report_cli_errors_on_a_directory_without_data(tmp_path, capsys):
    assert report_cli.main(["--run", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "no committed Parquet files" in capsys.readouterr().err
