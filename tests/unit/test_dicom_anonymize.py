"""Issue 20 at the anonymize stage: the Basic Profile as the default policy of DICOM header
columns (fail-closed where it says nothing of free text), burned-in annotations quarantined and
counted, a flat DICOM folder needing its label column, and scoring under the same rules."""

import shutil

import pandas as pd
import pydicom
import pytest

from mlpipe.anonymize import anonymize
from mlpipe.config import AnonymizeConfig, IngestConfig, PipelineConfig, SourceConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ingest
from tests.dicom_data import ct_folder, deid_data_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on deid-data's over-long values
SMALL = IngestConfig(image_size=32, channels=1, workers=1)


@pytest.fixture
def scans(state, tmp_path):
    return ct_folder(tmp_path / "scans", per_class=4, side=32)


def test_header_columns_follow_the_profile_and_no_identifying_value_stays(scans):
    source = SourceConfig(uri=str(scans.root))
    result = anonymize(ingest(source, SMALL), AnonymizeConfig(policy={}, text_scan="never"), source)
    out = pd.read_parquet(result.file("items.parquet"))
    policy = result.report["policy"]
    assert {policy[c]["action"] for c in ("PatientName", "AccessionNumber", "InstitutionName")} == {"drop"}
    assert (policy["PatientID"]["action"], policy["StudyInstanceUID"]["action"], policy["StudyDate"]["action"]) == (
        "pseudonymize", "remap_uid", "shift_date")  # fmt: skip
    assert policy["Manufacturer"]["action"] == "keep" and policy["Rows"]["action"] == "keep"
    assert not {"PatientName", "AccessionNumber", "InstitutionName"} & set(out.columns)
    assert out["StudyInstanceUID"].str.match(r"^2\.25\.[1-9]\d*$").all() and out["PatientID"].str.startswith("p_").all()
    blob = out.to_csv()
    assert not [v for v in scans.personal if v in blob]
    sources = result.report["dicom"]["policy_sources"]
    assert sources["profile (Table E.1-1)"] > 20 and sources["not in Table E.1-1"] > 20
    assert result.report["residual_scan"]["hits"] == 0 and "Rows" in result.report["residual_scan"]["digit_columns_exempt"]
    method = result.report["dicom"]["method"]  # as (0012,0062)-(0012,0064) would record it, written file or not
    assert method["PatientIdentityRemoved"] == "YES"
    assert [c["CodeValue"] for c in method["DeidentificationMethodCodeSequence"]] == ["113100", "113107"]


def test_an_unlisted_free_text_attribute_stops_the_run_until_it_has_a_policy(scans):
    path = next(scans.root.rglob("*.dcm"))
    ds = pydicom.dcmread(path)
    ds.DetectorDescription = "flat panel, room of Dr Quinn"  # LT: free text the profile does not list
    ds.save_as(path)
    source = SourceConfig(uri=str(scans.root))
    snapshot = ingest(source, SMALL)
    with pytest.raises(MlpipeError, match=r"no anonymization policy for column\(s\): DetectorDescription \(suggest"):
        anonymize(snapshot, AnonymizeConfig(policy={}, text_scan="never"), source)
    result = anonymize(snapshot, AnonymizeConfig(policy={"DetectorDescription": "drop"}, text_scan="never"), source)
    assert result.report["policy"]["DetectorDescription"]["action"] == "drop"


def test_a_burned_in_annotation_is_quarantined_and_counted(scans):
    shutil.copy(deid_data_file("ultrasounds/GREYSCALE_IMAGE.dcm"), scans.root / "round" / "us.dcm")
    source = SourceConfig(uri=str(scans.root))
    snapshot = ingest(source, SMALL)
    assert snapshot.report["kept"] == scans.items + 1
    result = anonymize(snapshot, AnonymizeConfig(policy={}, text_scan="never"), source)
    assert result.report["rows"] == scans.items
    assert result.report["removed"]["quarantined (burned-in annotation (header))"] == 1
    burned = result.report["dicom"]["burned_in"]
    assert (burned["header YES"], burned["header NO"], burned["quarantined"]) == (1, scans.items, 1)
    assert burned["not scanned (text_scan never)"] == 1
    quarantine = pd.read_csv(result.file("quarantine.csv"))
    assert list(quarantine["reason"]) == ["burned-in annotation (header)"] and set(quarantine.columns) == {"row", "reason"}
    # max_drop_fraction counts the quarantined row: past it, the stage stops with the reason.
    with pytest.raises(MlpipeError, match=r"anonymize removed 1 of 9 rows .*burned-in annotation"):
        anonymize(snapshot, AnonymizeConfig(policy={}, text_scan="never", max_drop_fraction=0.1), source)


def test_a_flat_dicom_folder_needs_the_header_attribute_that_holds_the_label(scans, tmp_path):
    from mlpipe.ingest import resolve_config

    flat = tmp_path / "flat"
    flat.mkdir()
    for n, path in enumerate(sorted(scans.root.rglob("*.dcm"))):
        shutil.copy(path, flat / f"{n}.dcm")
    config = PipelineConfig().with_overrides({"source.uri": str(flat)})
    with pytest.raises(MlpipeError, match=r"source.layout dicom: .* set label.columns to the header attribute"):
        resolve_config(config)
    resolved, decided, _ = resolve_config(config.with_overrides({"label.columns": ["Modality"]}))
    assert decided["source.layout"] == "dicom" and decided["split.group_column"] == "PatientID"
    assert resolved.anonymize.policy == {}
    # Nothing else left auto (layout, channels, size set): the slices are still grouped by patient.
    explicit = config.with_overrides({"label.columns": ["Modality"], "source.layout": "dicom", "ingest.channels": 1,
                                      "ingest.image_size": 32})  # fmt: skip
    resolved, decided, _ = resolve_config(explicit)
    assert decided["split.group_column"] == resolved.split.group_column == "PatientID"


def test_dicom_files_without_a_patient_id_are_grouped_by_study(scans, tmp_path):
    """Files whose PatientID was blanked before they reached us: grouped by StudyInstanceUID (a
    study is one patient's), not all under "" (one group: no split); neither: no group column."""
    import pydicom

    from mlpipe.ingest import describe_decided, dicom_group_column, resolve_config

    for blank, expected in ((["PatientID"], "StudyInstanceUID"), (["PatientID", "StudyInstanceUID"], None)):
        root = tmp_path / "-".join(blank)
        shutil.copytree(scans.root, root)
        for path in root.rglob("*.dcm"):
            ds = pydicom.dcmread(path)
            for keyword in blank:
                setattr(ds, keyword, "")
            ds.save_as(path)
        resolved, decided, detection = resolve_config(PipelineConfig().with_overrides({"source.uri": str(root)}))
        assert decided["split.group_column"] == expected and resolved.split.group_column == expected
        line = describe_decided(decided, detection)
        assert f"split.group_column {expected or 'null'} (no DICOM file has a PatientID" in line, line
        if expected:  # the written files' dates moved by their study's offset, as the columns' did
            source = SourceConfig(uri=str(root))
            result = anonymize(ingest(source, SMALL), AnonymizeConfig(policy={}, text_scan="never", write_dicom=True), source)
            out = pd.read_parquet(result.file("items.parquet")).set_index("item_id")
            written = sorted(result.file("dicom").glob("*.dcm"))
            assert len(written) == len(out) == 8
            originals = {(ds := pydicom.dcmread(f)).PixelData: (ds.StudyInstanceUID, ds.StudyDate) for f in root.rglob("*.dcm")}
            offsets: dict[str, set] = {}
            for path in written:
                ds = pydicom.dcmread(path)
                assert ds.StudyDate == out.loc[path.stem, "StudyDate"], path.stem
                study, date = originals[ds.PixelData]  # the pixels are untouched: they name the source file
                offsets.setdefault(study, set()).add(pd.Timestamp(date) - pd.Timestamp(ds.StudyDate))
            assert all(len(days) == 1 for days in offsets.values())  # one offset per study: intervals kept
            assert len(offsets) == 4 and len(set().union(*offsets.values())) > 1  # not one offset for every file
    one = pd.DataFrame({"image": ["a.dcm", "b.dcm", "c.png"], "PatientID": ["", "MRN1", ""],
                        "StudyInstanceUID": ["1.2", "1.3", ""], "__frame": ["0", "0", ""]})  # fmt: skip
    assert dicom_group_column(one) == "PatientID"  # any DICOM file with a PatientID: by patient
    assert dicom_group_column(one.assign(PatientID=["", "", "X"])) == "StudyInstanceUID"  # the PNG row's value does not count
    assert dicom_group_column(one.drop(columns="__frame")) is None  # no DICOM rows


def test_dates_of_files_without_a_patient_id_move_by_their_studys_offset():
    """Offsets are per patient; a file without a PatientID takes its study's (not one offset shared
    by every such file: one known date would give all of them away)."""
    from mlpipe.anonymize import date_subjects, shifted_dates
    from mlpipe.deid import date_offset_days

    key = b"test key"
    rows = pd.DataFrame({"PatientID": ["MRN1", "MRN1", "", "", "", " "],
                         "StudyInstanceUID": ["1.1", "1.2", "1.3", "1.3", "1.4", ""],
                         "StudyDate": ["20200110"] * 6})  # fmt: skip
    subjects = date_subjects(rows)
    assert subjects.tolist() == ["MRN1", "MRN1", "study 1.3", "study 1.3", "study 1.4", ""]
    dates, unparseable = shifted_dates(rows["StudyDate"], "StudyDate", subjects, key, year=False)
    assert unparseable == 0
    assert dates[0] == dates[1] and dates[2] == dates[3]  # one patient's studies; one study's files
    assert len({dates[0], dates[2], dates[4], dates[5]}) == 4  # four subjects, four offsets
    assert date_offset_days("study 1.3", key) != date_offset_days("", key)
    assert date_subjects(rows[["StudyDate"]]).tolist() == [""] * 6  # neither column: one offset


def _ocr_or_skip():
    import os

    from mlpipe.burned_in import ocr_available

    if not ocr_available():
        if os.environ.get("CI"):
            pytest.fail("tesseract is not installed: make test installs it (apt-get install tesseract-ocr)")
        pytest.skip("tesseract is not installed (apt-get install tesseract-ocr)")


def test_redacted_text_is_blacked_out_in_training_pixels_and_every_frame_of_the_written_file(scans):
    import numpy as np

    _ocr_or_skip()
    for name in ("GREYSCALE_IMAGE.dcm", "ultrasound-multiframe.dcm"):  # header YES; the loop: RGB, planar, 30 frames
        shutil.copy(deid_data_file(f"ultrasounds/{name}"), scans.root / "round" / name)
    source = SourceConfig(uri=str(scans.root))
    snapshot = ingest(source, SMALL)
    result = anonymize(snapshot, AnonymizeConfig(policy={}, burned_in="redact", write_dicom=True), source)
    burned = result.report["dicom"]["burned_in"]
    assert burned["redacted"] + burned["quarantined"] == 2 and burned["redacted"] >= 1
    assert burned["scanned by OCR"] == 2 and burned["header NO"] == scans.items  # the CT slices say NO: not read
    # Training reads the stage's own pixel cache, where the redacted rows differ from ingest's.
    pixels, before = np.load(result.file("pixels")), np.load(snapshot.file("pixels.npy"))
    assert result.file("pixels").name == "pixels.npy" and pixels.shape == before.shape
    assert int((pixels != before).any(axis=(1, 2, 3)).sum()) == burned["redacted"]

    written_us = [ds for ds in map(pydicom.dcmread, result.file("dicom").glob("*.dcm")) if ds.get("Modality") == "US"]
    assert len(written_us) == burned["redacted"] == 2  # both located and redacted: none quarantined
    assert sorted(int(ds.get("NumberOfFrames", 1)) for ds in written_us) == [1, 30]
    for ds in written_us:
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence][:2] == ["113100", "113101"]
        source_ds = pydicom.dcmread(deid_data_file(f"ultrasounds/{'ultrasound-multiframe.dcm' if 'NumberOfFrames' in ds else 'GREYSCALE_IMAGE.dcm'}"))
        new, old = ds.pixel_array, source_ds.pixel_array
        assert new.shape == old.shape and ds.get("PlanarConfiguration", 0) == 0
        changed = (new != old).reshape(old.shape[0], -1).any(axis=1) if "NumberOfFrames" in ds else [(new != old).any()]
        assert all(changed)  # every frame got the boxes
        assert (new == old).mean() > 0.9  # only the boxes: the rest of each frame is the source's, not scrambled
