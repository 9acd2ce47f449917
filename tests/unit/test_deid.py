"""mlpipe.deid: PS3.15 Annex E de-identification, checked on the real DICOM files pydicom ships."""

import copy
import datetime
import functools
import io
import json
import re
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import UID

from mlpipe import deid
from mlpipe.anonymize import pseudonym
from mlpipe.deid import (
    PROFILE, REPEATING, column_policy, date_offset_days, deidentify, header_values_removed, profile_action,
    remap_uid, shift_date, value_bytes, year_only,
)  # fmt: skip

KEY = b"test key one"
OTHER_KEY = b"test key two"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# Not DICOM: README.txt (twice), README, crayons.icc, rtplan.dump, rtstruct.dump, test1.json, test_PN.json, zipMR.gz
NOT_DICOM = 9
VALID_UID = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


@functools.cache
def _corpus() -> tuple[dict[str, tuple[bytes, bool]], tuple[str, ...]]:
    """Every file under pydicom's test_files: {relative name: (raw bytes, read with force)}, and the
    names pydicom cannot read. Files without a preamble (no_meta.dcm, rtstruct.dcm) need force."""
    readable, skipped = {}, []
    for path in sorted(p for p in TEST_FILES.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        for force in (False, True):
            if force and path.suffix != ".dcm":
                skipped.append(path.name)
                break
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pydicom.dcmread(io.BytesIO(raw), force=force)
            except (InvalidDicomError, Exception):
                if force:
                    skipped.append(path.name)
                continue
            readable[path.relative_to(TEST_FILES).as_posix()] = (raw, force)
            break
    return readable, tuple(skipped)


def _read(name: str) -> Dataset:
    raw, force = _corpus()[0][name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(raw), force=force)


def _write(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf)
    return buf.getvalue()


def _reread(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), force=True)


def _patient(ds: Dataset) -> str:
    return str(ds.get("PatientID", "") or "")


def _days(da: str) -> int:
    return datetime.date(int(da[:4]), int(da[4:6]), int(da[6:8])).toordinal()


@functools.cache
def _deidentified(dates: str) -> dict[str, tuple[dict[str, set[bytes]], bytes, dict]]:
    """Every readable file: ({value of header_values_removed of the original: its encodings},
    the de-identified file's bytes, the report)."""
    out = {}
    for name in _corpus()[0]:
        ds = _read(name)
        removed = header_values_removed(ds, dates=dates)
        report = deidentify(ds, KEY, patient=_patient(ds), dates=dates)
        out[name] = ({v: value_bytes(v, ds) for v in removed}, _write(ds), report.to_dict())
    return out


# --- the table -----------------------------------------------------------------------------------


def test_profile_is_table_e1_1_of_the_library():
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    tables = dicom_anonymization_database_selector("dicomfields_2026c")
    entries = [t for name, tags in tables.items() if name != "ALL_TAGS" for t in tags]
    assert len(PROFILE) + len(REPEATING) == len(entries) == len(set(entries))  # one action per tag
    assert len(PROFILE) > 600
    assert PROFILE[0x00100010] == "Z"  # Patient's Name
    assert PROFILE[0x00100020] == "Z/D"  # Patient ID
    assert PROFILE[0x0020000D] == "U"  # Study Instance UID
    assert PROFILE[0x00080080] == "X/Z/D"  # Institution Name
    assert PROFILE[0x00081140] == "X/Z/U*"  # Referenced Image Sequence
    assert PROFILE[0x00101010] == "X"  # Patient's Age
    assert set(PROFILE.values()) == {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    # repeating groups: curve data (50xx,xxxx), overlay data and comments (60xx,3000), (60xx,4000)
    assert profile_action(0x50001234) == profile_action(0x501E0000) == "X"
    assert profile_action(0x60003000) == profile_action(0x60023000) == profile_action(0x601E4000) == "X"
    assert profile_action(0x60000010) is None  # Overlay Rows: not listed
    assert profile_action(0x00091001) == profile_action(0x00290010) == "X"  # private
    assert profile_action(0x00280010) is None  # Rows
    assert profile_action(0x7FE00010) is None  # Pixel Data


def test_column_policy():
    assert column_policy("PatientID", "LO") == "pseudonymize"
    assert column_policy("StudyInstanceUID", "UI") == column_policy("SOPInstanceUID", "UI") == "remap_uid"
    assert column_policy("AnnotationGroupUID", "UI") == "remap_uid"  # a UID the profile replaces (D)
    assert column_policy("StudyDate", "DA") == column_policy("AcquisitionDateTime", "DT") == "shift_date"
    assert column_policy("PatientBirthDate", "da") == "shift_date"
    assert column_policy("StudyUpdateDateTime", "DT") == "shift_date"  # unlisted dates too: no raw date
    assert column_policy("StudyDate", "DA", dates="year") == "generalize_date"
    assert column_policy("StudyTime", "TM") == "keep"
    assert column_policy("StudyTime", "TM", dates="year") == "drop"
    for keyword, vr in [("PatientName", "PN"), ("InstitutionName", "LO"), ("PatientAge", "AS"),
                        ("AccessionNumber", "SH"), ("StudyDescription", "LO"), ("OverlayData", "OW"),
                        ("ReferringPhysicianName", "PN"), ("PatientSex", "CS")]:  # fmt: skip
        assert column_policy(keyword, vr) == "drop", keyword
    assert column_policy("Modality", "CS") is None
    assert column_policy("Manufacturer", "LO") is None
    assert column_policy("no_such_keyword", "LO") is None
    assert column_policy("StudyDate", "") == "shift_date"  # the VR from the dictionary
    with pytest.raises(ValueError):
        column_policy("StudyDate", "DA", dates="month")


# --- the keyed functions -------------------------------------------------------------------------


def test_remap_uid_is_a_valid_keyed_uid():
    uids = [f"1.2.840.113619.2.{i}.{i * 7919}" for i in range(300)] + ["1.2.3", "1.3.6.1.4.1.5962.1.1.0.0.0\0"]
    for uid in uids:
        new = remap_uid(uid, KEY)
        assert VALID_UID.match(new), new
        assert len(new) <= 64 and UID(new).is_valid
        assert new == remap_uid(uid, KEY) != remap_uid(uid, OTHER_KEY)
    assert len({remap_uid(u, KEY) for u in uids}) == len(uids)
    assert remap_uid("1.3.6.1.4.1.5962.1.1.0.0.0\0", KEY) == remap_uid("1.3.6.1.4.1.5962.1.1.0.0.0", KEY)
    assert remap_uid("", KEY) == ""
    # the same across runs and machines: a fixed value
    assert remap_uid("1.2.3", b"k") == "2.25.47150218202070415693786377932662851010"


def test_date_offset_is_keyed_negative_and_never_zero():
    offsets = [date_offset_days(f"patient {i}", KEY) for i in range(500)]
    assert all(-3650 <= o <= -1 for o in offsets)
    assert len(set(offsets)) > 400  # spread over the range
    assert date_offset_days("patient 1", KEY) == offsets[1]
    assert date_offset_days("patient 1", OTHER_KEY) != offsets[1]
    assert {date_offset_days(f"p{i}", KEY, max_days=1) for i in range(20)} == {-1}
    assert all(-30 <= date_offset_days(f"p{i}", KEY, max_days=30) <= -1 for i in range(50))
    assert date_offset_days("4MR1", b"k") == -1214  # the same across runs and machines
    with pytest.raises(ValueError):
        date_offset_days("p", KEY, max_days=0)


def test_shift_date_edge_cases():
    assert shift_date("20200301", "DA", -1) == "20200229"  # leap day
    assert shift_date("20210101", "DA", -367) == "20191231"
    assert shift_date("20200301 ", "DA", -1) == "20200229"  # DICOM's padding
    # DT keeps its time, fraction, UTC offset and precision
    assert shift_date("20200301120000.123456+0100", "DT", -1) == "20200229120000.123456+0100"
    assert shift_date("20200301235959-0500", "DT", -10) == "20200220235959-0500"
    assert shift_date("2020030112", "DT", -1) == "2020022912"
    assert shift_date("202003", "DT", -1) == "202002"  # from the month's first day
    assert shift_date("2020", "DT", -1) == "2019"
    assert shift_date("2020+0100", "DT", -1) == "2019+0100"
    assert shift_date("dt", "dt", 0) == ""  # malformed
    # multiple values each, a malformed one emptied
    assert shift_date("20200301\\20200302", "DA", -1) == "20200229\\20200301"
    assert shift_date("20200301\\2020-03-02", "DA", -1) == "20200229\\"
    for bad in ["2020-03-01", "20201301", "20200230", "2020031", "abcdefgh", "00000101", "20200301-20200401"]:
        assert shift_date(bad, "DA", -1) == "", bad
    for bad in ["2020030112.5", "20200301120000.1234567", "20200301+01", "20201301"]:
        assert shift_date(bad, "DT", -1) == "", bad
    assert shift_date("00010101", "DA", -1) == ""  # before year 1
    assert shift_date("", "DA", -1) == ""
    with pytest.raises(ValueError):
        shift_date("120000", "TM", -1)


def test_year_only():
    assert year_only("20200301", "DA") == "20200101"
    assert year_only("20200301", "DA", for_column=True) == "2020"
    assert year_only("20200301120000.5+0100", "DT") == year_only("202003", "DT") == "2020"
    assert year_only("20200301\\20190101", "DA") == "20200101\\20190101"
    assert year_only("2020-03-01", "DA") == year_only("", "DA") == ""


# --- every real file -----------------------------------------------------------------------------


def test_every_readable_file_leaks_no_removed_value():
    readable, skipped = _corpus()
    assert len(skipped) == NOT_DICOM and not any(name.endswith(".dcm") for name in skipped), skipped
    assert len(readable) >= 150  # ~80 test files and the DICOMDIR test tree
    checked = 0
    for name, (removed, data, report) in _deidentified("shift").items():
        leaks = [v for v, encoded in removed.items() if any(b in data for b in encoded)]
        assert not leaks, f"{name}: {leaks}"
        assert not [v for v in removed if v in json.dumps(report)], name  # the report holds no value
        checked += len(removed)
        back = _reread(data)
        assert back.PatientIdentityRemoved == "YES", name
        assert [c.CodeValue for c in back.DeidentificationMethodCodeSequence][-2:] == ["113100", "113107"], name
        assert back.LongitudinalTemporalInformationModified == "MODIFIED"
        privates = []
        back.walk(lambda _, elem: privates.append(elem.tag) if elem.tag.is_private else None)
        assert privates == [], name
        meta = getattr(back, "file_meta", None) or {}
        if "SOPInstanceUID" in back and "MediaStorageSOPInstanceUID" in meta:
            assert meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID, name
        uids = []
        back.walk(lambda _, e: uids.extend(map(str, e.value if e.VM > 1 else [e.value]))
                  if profile_action(e.tag) == "U" and e.VR == "UI" and e.value else None)  # fmt: skip
        assert all(VALID_UID.match(u) for u in uids), name
    assert checked > 2000  # the check has something to find


def test_every_readable_file_year_only():
    for name, (removed, data, report) in _deidentified("year").items():
        leaks = [v for v, encoded in removed.items() if any(b in data for b in encoded)]
        assert not leaks, f"{name}: {leaks}"
        back = _reread(data)
        assert [c.CodeValue for c in back.DeidentificationMethodCodeSequence][-1:] == ["113100"], name
        for keyword in ("StudyDate", "ContentDate", "PatientBirthDate"):
            value = str(back.get(keyword, "") or "")
            assert value == "" or re.fullmatch(r"\d{4}0101", value), (name, keyword, value)


def test_report_counts_actions_and_codes():
    report = _deidentified("shift")["CT_small.dcm"][2]
    assert json.loads(json.dumps(report)) == report
    assert report["profile"] == deid.PROFILE_SOURCE and "dicomfields_2026c" in report["profile"]
    assert report["options"] == [
        {"code": "113100", "scheme": "DCM", "meaning": "Basic Application Confidentiality Profile"},
        {"code": "113107", "scheme": "DCM",
         "meaning": "Retain Longitudinal Temporal Information Modified Dates Option"},
    ]  # fmt: skip
    assert report["private_tags_removed"] > 100  # GE's private groups
    assert report["uids_remapped"] == 6 and report["dates_shifted"] == 5 and report["times_kept"] == 5
    assert report["pseudonymized"] == 2 and report["removed"] > 0 and report["emptied"] > 0 and report["replaced"] > 0
    assert report["sequences_removed"] == 1  # Other Patient IDs Sequence (X)
    sr = _deidentified("shift")["test-SR.dcm"][2]
    assert sr["sequences_cleaned"] > 5 and sr["sequences_emptied"] > 0 and sr["uids_remapped"] > 10


def test_uids_are_consistent_across_files_calls_and_keys():
    files = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]
    originals = [_read(n) for n in files]
    assert len({o.StudyInstanceUID for o in originals}) == 1
    new = {_reread(_deidentified("shift")[n][1]).StudyInstanceUID for n in files}
    assert len(new) == 1 and new != {originals[0].StudyInstanceUID}
    again = _read("MR_small.dcm")
    deidentify(again, KEY, patient=_patient(again))
    assert again.StudyInstanceUID in new
    assert again.SOPInstanceUID == _reread(_deidentified("shift")["MR_small.dcm"][1]).SOPInstanceUID
    other = _read("MR_small.dcm")
    deidentify(other, OTHER_KEY, patient=_patient(other))
    assert other.StudyInstanceUID not in new
    # a reference inside a sequence gets the same new UID as the file it points to
    dicomdir = _reread(_deidentified("shift")["dicomdirtests/DICOMDIR"][1])
    image = _reread(_deidentified("shift")["dicomdirtests/77654033/CR1/6154"][1])
    assert image.SOPInstanceUID in {r.get("ReferencedSOPInstanceUIDInFile") for r in dicomdir.DirectoryRecordSequence}
    assert image.StudyInstanceUID in {r.get("StudyInstanceUID") for r in dicomdir.DirectoryRecordSequence}


def test_dates_of_one_patient_keep_their_intervals():
    original = _read("waveform_ecg.dcm")
    after = _reread(_deidentified("shift")["waveform_ecg.dcm"][1])
    assert original.PatientBirthDate and original.StudyDate
    assert after.StudyDate != original.StudyDate and after.PatientBirthDate != original.PatientBirthDate
    age = _days(original.StudyDate) - _days(original.PatientBirthDate)
    assert _days(after.StudyDate) - _days(after.PatientBirthDate) == age
    shift = _days(after.StudyDate) - _days(original.StudyDate)
    assert shift == date_offset_days(original.PatientID, KEY) < 0
    assert after.AcquisitionDateTime[8:] == original.AcquisitionDateTime[8:]  # the time of day kept
    assert after.StudyTime == original.StudyTime
    # the same patient in another file: the same shift; dates nested in sequences too
    dicomdir, image = _read("dicomdirtests/DICOMDIR"), _read("dicomdirtests/77654033/CR1/6154")
    assert image.StudyDate in {r.get("StudyDate") for r in dicomdir.DirectoryRecordSequence}
    deidentify(dicomdir, KEY, patient=image.PatientID)  # the patient of that file's records
    deidentify(image, KEY, patient=image.PatientID)
    assert image.StudyDate in {r.get("StudyDate") for r in dicomdir.DirectoryRecordSequence}


def test_patient_id_and_name_become_the_manifest_pseudonym():
    original = _read("CT_small.dcm")
    after = _reread(_deidentified("shift")["CT_small.dcm"][1])
    assert after.PatientID == pseudonym(original.PatientID, KEY) == str(after.PatientName)
    assert _reread(_deidentified("shift")["test-SR.dcm"][1]).PatientName == ""  # no Patient ID, no name


def test_pixel_data_is_untouched():
    for name in ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"]:
        original = _read(name)
        after = _reread(_deidentified("shift")[name][1])
        assert after.PixelData == original.PixelData, name
        assert after.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert (_reread(_deidentified("shift")["CT_small.dcm"][1]).pixel_array == _read("CT_small.dcm").pixel_array).all()


def test_nested_datasets_get_the_same_treatment():
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.StudyDate = "PID-123456", "Doe^Jane", "20200315"
    ds.SOPInstanceUID = "1.2.3.4.5.6"
    ds.add_new(0x00291010, "LO", "private text")
    inner = Dataset()  # in an unlisted sequence, and deeper
    inner.PatientID, inner.PatientName, inner.StudyDate = "PID-123456", "Doe^Jane", "20200301"
    inner.ReferencedSOPInstanceUID = "1.2.3.4.5.6"
    inner.InstitutionName = "General Hospital"
    inner.add_new(0x00291010, "LO", "nested private")
    inner.OtherPatientIDsSequence = Sequence([Dataset()])  # X: removed at any depth
    inner.OtherPatientIDsSequence[0].PatientID = "OTHER-999"
    inner.ReferencedStudySequence = Sequence([Dataset()])  # X/Z: left empty
    inner.ReferencedStudySequence[0].ReferencedSOPInstanceUID = "1.2.3.9"
    inner.add_new(0x60003000, "OW", b"\0\1" * 4)  # overlay data (60xx,3000)
    deeper = Dataset()
    deeper.PersonName = "Smith^John"  # (0040,A123) D
    deeper.DateTime = "20200301101500"
    inner.ContentSequence = Sequence([deeper])  # D: kept, cleaned by tag
    ds.ReferencedImageSequence = Sequence([inner])  # X/Z/U*: kept, UIDs remapped
    report = deidentify(ds, KEY, patient="PID-123456")
    offset = date_offset_days("PID-123456", KEY)
    item = ds.ReferencedImageSequence[0]
    assert item.PatientID == ds.PatientID == pseudonym("PID-123456", KEY) == item.PatientName
    assert item.ReferencedSOPInstanceUID == ds.SOPInstanceUID == remap_uid("1.2.3.4.5.6", KEY)
    assert item.StudyDate == shift_date("20200301", "DA", offset) != "20200301"
    assert ds.StudyDate == shift_date("20200315", "DA", offset)
    assert item.InstitutionName == "ANONYMIZED"
    assert "OtherPatientIDsSequence" not in item and len(item.ReferencedStudySequence) == 0
    assert 0x60003000 not in item and 0x00291010 not in item and 0x00291010 not in ds
    assert item.ContentSequence[0].PersonName == "ANONYMIZED"
    assert item.ContentSequence[0].DateTime == shift_date("20200301101500", "DT", offset)
    assert report.private_tags_removed == 2 and report.sequences_removed == 1 and report.sequences_emptied == 1


def test_repeat_run_appends_no_duplicate_record_and_clean_pixels_is_recorded():
    ds = _read("CT_small.dcm")
    pixels = ds.PixelData
    deidentify(ds, KEY, patient="x")
    deidentify(ds, KEY, patient="x", clean_pixels=True)
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107", "113101"]
    assert len(ds.DeidentificationMethod) == len(set(ds.DeidentificationMethod))
    assert ds.BurnedInAnnotation == "NO" and ds.PixelData == pixels
    with pytest.raises(ValueError):
        deidentify(copy.deepcopy(ds), KEY, patient="x", dates="month")
    with pytest.raises(ValueError):
        deidentify(copy.deepcopy(ds), b"", patient="x")
