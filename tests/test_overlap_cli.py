"""``bench.py overlap`` end to end on a tiny random-weight Llama (CPU)."""

from __future__ import annotations

import json

from conftest import run_bench


def test_overlap_bench_writes_every_column(tmp_path):
    out = tmp_path / "overlap.json"
    run_bench(tmp_path, "overlap", "--model", "llama-tiny", "--histories", "64", "--repeats", "1", "--decode-tokens",
              "2", "--decode-history", "32", "--group-layers", "2", "--fixed-groups", "--json", out)
    data = json.loads(out.read_text())
    (row,) = data["results"]
    for k in ("full", "load", "new", "sync", "layered", "both", "tail", "staged", "auto"):
        assert row[k] > 0, k
    # every restored variant's logits were compared with the recompute's (fp32: the bench fails above 1e-4)
    assert 0 <= row["max_logit_diff"] <= 1e-4
    assert 0 < row["tail_split"] < 64  # forced with nothing measured yet, or where load and forward meet
    assert row["auto_choice"] in ("load", "recompute", "both") and row["auto_vs_full"] == row["auto"] / row["full"]
    assert row["staged_vs_new"] == row["staged"] / row["new"]
    assert row["layered_vs_max"] == row["layered"] / max(row["load"], row["new"])
    assert row["layered_alt"] > 0 and row["group_layers_alt"] == "2 fixed" and data["group_layers_alt"] == 2
    assert data["fixed_groups_alt"] is True and data["group_pacing"] is True
    assert row["layered_alt_vs_max"] == row["layered_alt"] / max(row["load"], row["new"])
    assert data["decode"]["tok_s_saving_on"] > 0 and data["decode"]["tok_s_saving_off"] > 0
