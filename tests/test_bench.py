"""tools/bench.py on the tiny model: the smallest section runs and its report is well formed (no timing bars)."""

from __future__ import annotations

import json
import math

from tools import bench


def test_interleaves_the_cases_after_warmup():
    calls = []
    times = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 4
    assert [len(times[k]) for k in ("a", "b")] == [3, 3]


def test_txt2img_section_report(tiny_model_dir, tmp_path):
    row = bench.bench_txt2img(str(tiny_model_dir), steps=2, size=0, repeats=1, out=tmp_path)
    row["model_name"] = "tiny"
    assert row["size"] == 64 and row["steps"] == 2
    for key in ("median_ours_s", "median_diffusers_s", "median_guard_s", "ratio", "ratio_without_guard"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["median_ours_without_guard_s"] < row["median_ours_s"]
    assert isinstance(row["pass"], bool)
    # The guarded file was really delivered (the guard ran, and was timed).
    assert list((tmp_path / "t2i").rglob("*.png")) and (tmp_path / "t2i" / "audit.jsonl").is_file()
    report = dict(quick=True, date="now", machine=bench.machine(), txt2img=[row], errors={})
    table = bench.markdown(report)
    assert "| tiny | 64 | 2 |" in table
    assert json.loads(json.dumps(report, default=str))["txt2img"][0]["ratio"] == row["ratio"]


def test_preview_section_report(tiny_model_dir, tmp_path):
    row = bench.bench_preview(str(tiny_model_dir), steps=3, size=0, repeats=1, out=tmp_path, every=2)
    assert row["previews_per_image"] == 2 and row["preview_size"] == [64, 64]
    assert math.isfinite(row["overhead"]) and 0 < row["overhead_from_call_cost"] < math.inf


def test_canvas_section_report():
    """The canvas section (bench_canvas's cases, diffusers' panorama views included) reports both ratios."""
    row = bench.bench_canvas("tiny512", steps=1, repeats=1)
    row["model_name"] = "tiny"
    assert set(row["median_s"]) == {"txt2img", "canvas default", "canvas panorama views",
                                    "diffusers panorama (view_batch_size=1)"}
    assert set(row["ratios"]) == {"canvas default / one native image", "canvas panorama views / diffusers panorama"}
    assert all(math.isfinite(v) and v > 0 for v in row["ratios"].values())
    table = bench.markdown(dict(quick=True, date="now", machine=bench.machine(), canvas=[row], errors={}))
    assert "### Large canvas 1024x512 vs one 512 px image (tiny, 1 steps)" in table
    assert "| ratio: canvas panorama views / diffusers panorama |" in table
