import json

import pytest

from knowlip.text.caption import FIELDS, CaptionError, CaptionIndex, geo_clause, make_caption, parse_caption

CLAUSES = {f: f"{f} words here" for f in FIELDS}


def test_round_trip_and_keyword_spans():
    cap = make_caption(CLAUSES, geo="43.5900N 4.5200E")
    text = cap.text()
    assert text.startswith("The terrain is classified as terrain words here.")
    assert parse_caption(text) == cap
    spans = cap.keyword_spans()
    assert [f for f, _, _ in spans] == list(FIELDS) + ["geo"]
    for f, start, end in spans:
        assert text[start:end] == cap.clauses[f]


@pytest.mark.parametrize("bad,match", [
    ("Hello. " + make_caption(CLAUSES).text(), "before the first clause"),
    (make_caption(CLAUSES).text().replace("Road presence: roads words here.", ""), "lacks clauses: roads"),
    (make_caption(CLAUSES).text().replace("roads words here", ""), "'roads' has no keywords"),
    ("Water presence: x. " + make_caption(CLAUSES).without("water").text(), "out of order"),
])
def test_malformed_captions_are_rejected(bad, match):
    with pytest.raises(CaptionError, match=match):
        parse_caption(bad)


def test_caption_index_reports_bad_lines_and_looks_up_chip_then_scene(tmp_path):
    good = make_caption(CLAUSES).text()
    f = tmp_path / "captions.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": "sceneA", "caption": good}),
        json.dumps({"id": "sceneA_r00000_c00000", "clauses": {**CLAUSES, "water": "a lake"}}),
        json.dumps({"id": "broken", "caption": "no clauses at all"}),
        "{not json",
    ]) + "\n")
    idx = CaptionIndex(f)
    assert len(idx.errors) == 2 and all(str(f) in e for e in idx.errors)
    assert idx.lookup("sceneA_r00000_c00000", "sceneA").clauses["water"] == "a lake"
    assert idx.lookup("sceneA_r00000_c00064", "sceneA").text() == good
    assert idx.lookup("other", "other") is None


def test_geo_clause_from_metadata():
    meta = {"center_lonlat": [4.52, -43.59], "crs": "EPSG:32731", "sensor": "S1A", "polarisations": ["VV", "VH"],
            "acquisition_time": "2015-03-09T17:30:17Z"}
    assert geo_clause(meta) == "43.5900S 4.5200E (EPSG:32731), imaged by S1A VV+VH on 2015-03-09"
