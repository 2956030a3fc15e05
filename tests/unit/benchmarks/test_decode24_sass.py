"""`python -m benchmarks.decode24_sass` compiles the decode kernel for sm_90 on a machine
without a GPU and counts its machine code: both metadata forms of a mode compile, the counts
are read from real SASS, and reading cuSPARSELt's metadata adds no global loads (and, for the
gather mode, a few instructions)."""
import json

import pytest

from benchmarks import decode24_sass


def test_sass_counts_of_both_metadata_forms(tmp_path):
    pytest.importorskip("triton")
    own = decode24_sass.compile_variant("gather", False, 90)
    cslt = decode24_sass.compile_variant("gather", True, 90)
    assert (own["metadata"], cslt["metadata"]) == ("own", "cusparselt")
    assert own["tile"] == "1x32x256" and own["global_loads"] > 0
    assert 500 < own["sass_instructions"] < cslt["sass_instructions"]
    assert cslt["global_loads"] == own["global_loads"]
    assert 100 < own["k_loop_instructions"] < own["sass_instructions"]
    assert 16 < own["registers"] <= 255
    assert own["k_loop_per_kept_value"] == own["k_loop_instructions"] * 128 / (32 * 128)
    assert decode24_sass.main(["--modes", "select", "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["metadata"] for r in rows] == ["own", "cusparselt"] and rows[0]["mode"] == "select"
