"""Data accounting: the ledger adds up from real stage reports, and a stage past its drop limit stops."""

import pytest

from mlpipe.accounting import check_drop, ledger, lines
from mlpipe.anonymize import anonymize
from mlpipe.config import PipelineConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ingest
from mlpipe.label import label
from mlpipe.split import split


def test_every_row_of_the_sample_is_accounted_for(state, config):
    snapshot = ingest(config.source, config.ingest)
    dataset = anonymize(snapshot, config.anonymize, config.source)
    labelled = label(dataset, config.label)
    entries = ledger(snapshot.report, dataset.report, labelled.report, split(labelled, config.split).report)
    assert [e["stage"] for e in entries] == ["ingest", "anonymize", "label", "split"]
    assert all(e["closes"] for e in entries)
    assert entries[0]["rows_in"] == 1103 and entries[0]["removed"]["exact duplicates"] == 3
    assert entries[0]["removed"]["quarantined: empty file"] == 1
    assert entries[2]["removed"]["review: unlabelled"] == 26
    for before, after in zip(entries, entries[1:]):
        assert after["rows_in"] == before["kept"]  # nothing falls between two stages
    text = lines(entries, trained_on=700, evaluated_on=150)
    assert text[0] == ("ingest     1103 in, 1096 kept; quarantined 4 (truncated or corrupt (OSError) 1; empty file 1; "
                       "missing file 1; path escapes the dataset root 1), exact duplicates 3")  # one count per kind
    assert text[2] == "label      1096 in, 1058 kept; sent to review 38 (unlabelled 26; tie 12); 10 likely label errors flagged, kept"
    assert text[-1] == "evaluate   evaluated on 150 (the whole test split)"


def test_a_stage_past_its_drop_limit_stops_naming_stage_count_and_reasons():
    with pytest.raises(MlpipeError, match=r"^ingest removed 119 of 120 rows \(99%: 119 exact duplicates\); "
                                          r"ingest.max_drop_fraction is 0.2: fix the data or raise the limit$"):
        check_drop("ingest", 120, {"exact duplicates": 119, "quarantined (empty file)": 0}, 0.2)
    check_drop("ingest", 120, {"exact duplicates": 24}, 0.2)  # exactly the limit passes
    check_drop("ingest", 120, {"exact duplicates": 119}, 1.0)  # the user raised it


def test_ingest_stops_when_most_images_collapse_to_duplicates(state, tmp_path):
    """What case3 did before decoding kept transparency: every image one colour, 119 'duplicates'."""
    from PIL import Image

    from tests.field_cases import CASE_OVERRIDES, write_shapes

    root = write_shapes(tmp_path / "data", ["a", "b"], 10, image=lambda c, i: Image.new("L", (32, 32), 0))
    config = PipelineConfig().with_overrides({**CASE_OVERRIDES, "source.uri": str(root)})
    with pytest.raises(MlpipeError, match=r"^ingest removed 19 of 20 rows \(95%: 19 exact duplicates"):
        ingest(config.source, config.ingest)
