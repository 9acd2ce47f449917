"""deid: DICOM de-identification per DICOM PS3.15 Annex E, the Basic Application Level
Confidentiality Profile (Table E.1-1), with the Retain Longitudinal Temporal Information with
Modified Dates Option. A pure library module: no stage, no tracking.

The table is not copied here: `PROFILE` is built from dicom-anonymizer's transcription of Table
E.1-1 of the current standard (`dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c`),
and `deidentify` applies it through the library's own `anonymize_dataset`. What we override, and why:

- UIDs (U): the library maps them to random UIDs in a module-global dict (different on every run,
  shared by every caller). Ours: `remap_uid`, a keyed HMAC-SHA256 under the 2.25 root: the same
  UID and key give the same new UID in every run and every process, so references between files
  (a study's series, a Referenced SOP Instance UID) stay consistent.
- Dates (DA, DT): the library writes 00010101. Ours: every date and date-time, listed or not, is
  shifted by a keyed per-patient number of days (`date_offset_days`), so one patient's intervals
  survive; or, with dates="year", reduced to the year (`year_only`). Unlisted dates are treated
  alike on purpose: one raw date next to shifted ones would give the patient's offset away.
- Times (TM): kept when dates are shifted. The shift is a whole number of days, so a time of day
  stays right against its shifted date, and PS3.15's Modified Dates Option keeps the temporal
  relationships (E.3.6); without its date a time of day identifies no one. With dates="year" the
  intervals are gone anyway, and times get the profile's own action (removed, emptied or a dummy).
- Patient ID (Z/D): the keyed pseudonym of `mlpipe.anonymize.pseudonym` (Z permits a consistent
  dummy value), so grouping by patient still works and matches the manifest's column. Patient's
  Name (Z) becomes the same pseudonym (empty where the dataset has no Patient ID): a viewer or
  PACS that groups by name still groups right, and the value says nothing about the person.
- Conditional actions (Z/D, X/Z, X/D, X/Z/D) on plain attributes: as the library does, the variant
  that keeps any IOD conformant (Z for X/Z, a dummy D for the rest), since the attribute's Type in
  the IOD is not known here.
- Sequences: the library acts on top-level attributes only, and on a sequence it overwrites every
  nested value with a dummy (random UIDs included). Ours: X and X/D remove the sequence; Z, X/Z and
  X/Z/D leave it empty (zero items: valid for Type 2 and 3); D and X/Z/U* keep the items and every
  element in every nested dataset, at any depth, gets the same treatment by its own tag (Person
  Name, Date, UID inside a Content Sequence; the Referenced SOP Instance UID of a Referenced Image
  Sequence, remapped like the file it points to). Unlisted sequences are walked the same way.
- Repeating groups: the table's masked entries, (50xx,xxxx) Curve Data and (60xx,3000) Overlay
  Data / (60xx,4000) Overlay Comments, both X, cannot be int keys of `PROFILE`; they live in
  `REPEATING` and `profile_action` matches them by mask (groups 0x5000-0x50FF and 0x6000-0x60FF as
  the library reads them; the odd groups among them are private and go anyway).
- Private attributes (odd groups): X, at every depth (Table E.1-1's "Private Attributes" row;
  no Retain Safe Private Option).

The method is recorded as PS3.15 E.1.1 and PS3.3 C.7.1.1 ask: Patient Identity Removed YES,
De-identification Method (text) and its Code Sequence with CID 7050 codes (from pydicom's own
concept dictionary), Longitudinal Temporal Information Modified MODIFIED.

Not done here: pixel data is never touched (burned-in text is the caller's OCR/redaction step);
clean_pixels=True only records the Clean Pixel Data Option for pixels the caller already cleaned.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import importlib.metadata
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

from dicomanonymizer import simpledicomanonymizer as _lib
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import RepeatersDictionary, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag

TABLE = "dicomfields_2026c"  # PS3.15 Annex E, Table E.1-1 as of DICOM 2026c
LIBRARY = f"dicom-anonymizer {importlib.metadata.version('dicom-anonymizer')}"
PROFILE_SOURCE = f"PS3.15 Annex E Table E.1-1 ({LIBRARY}, {TABLE})"

_CATEGORIES = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}  # fmt: skip


def _load_table() -> tuple[dict[int, str], dict[tuple[int, int, int, int], str]]:
    tables = dicom_anonymization_database_selector(TABLE)
    exact: dict[int, str] = {}
    repeating: dict[tuple[int, int, int, int], str] = {}
    for category, code in _CATEGORIES.items():
        for entry in tables[category]:
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = code
            else:  # (group, element, group mask, element mask)
                repeating[tuple(entry)] = code
    return exact, repeating


# Tag (as int) -> action code of Table E.1-1: "D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*".
# Exact tags only; the masked entries are in REPEATING, and `profile_action` looks in both.
PROFILE: dict[int, str]
REPEATING: dict[tuple[int, int, int, int], str]
PROFILE, REPEATING = _load_table()

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
DATE_VRS = ("DA", "DT")
DUMMY_ACTIONS = ("D", "Z/D", "X/D", "X/Z/D")  # a plain attribute gets a dummy value (the library's `replace`)
# For a sequence: removed, left with zero items, or kept with its items cleaned by tag.
SEQUENCE_REMOVE = ("X", "X/D")
SEQUENCE_EMPTY = ("Z", "X/Z", "X/Z/D", "Z/D")
UID_ROOT = "2.25."
# Text VRs whose values `header_values_removed` collects (numbers, DS and IS, identify no one).
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


def profile_action(tag: int) -> str | None:
    """Table E.1-1's action for a tag (an int, e.g. 0x00100010); "X" for a private tag; None: not listed."""
    tag = int(tag)
    if tag in PROFILE:
        return PROFILE[tag]
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 1:
        return "X"
    for (g, e, gmask, emask), code in REPEATING.items():
        if group & gmask == g & gmask and element & emask == e & emask:
            return code
    return None


def _keyword_tag(keyword: str) -> int | None:
    tag = tag_for_keyword(keyword)
    if tag is not None:
        return tag
    for mask, entry in RepeatersDictionary.items():  # e.g. OverlayData is (60xx,3000)
        if entry[4] == keyword:
            return int(mask.replace("x", "0"), 16)
    return None


def column_policy(keyword: str, vr: str, *, dates: Literal["shift", "year"] = "shift") -> str | None:
    """What the profile means for a header attribute that becomes a text column of the manifest.

    "remap_uid" (U, or a UID the profile replaces), "shift_date" (any DA/DT: listed ones by the
    Modified Dates Option, unlisted ones too, so no raw date gives the offset away; with
    dates="year": "generalize_date", to the year: `year_only(v, vr, for_column=True)`), "keep" (a
    listed TM under the shift: times stay with shifted dates; "drop" with dates="year"),
    "pseudonymize" (PatientID only), "drop" (everything else the profile lists: X, Z, D, ...; the
    column leaves the manifest), None (the profile does not list it: the caller's own policy decides).
    """
    _check_dates(dates)
    vr = (vr or "").upper()
    tag = _keyword_tag(keyword)
    if not vr and tag is not None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = ""
    if vr in DATE_VRS:
        return "shift_date" if dates == "shift" else "generalize_date"
    code = profile_action(tag) if tag is not None else None
    if code is None:
        return None
    if vr == "TM":
        return "keep" if dates == "shift" else "drop"
    if tag == PATIENT_ID:
        return "pseudonymize"
    if code == "U" or (vr == "UI" and code in DUMMY_ACTIONS):
        return "remap_uid"
    return "drop"


def remap_uid(uid: str, key: bytes) -> str:
    """A keyed replacement UID: "2.25." and the decimal of a 128-bit integer (PS3.5 B.2) from
    HMAC-SHA256(key, uid); at most 44 characters. Shaped as an RFC 9562 version-8 (custom) UUID, as
    B.2 asks for a UUID. The same UID and key always give the same result; "" stays ""."""
    uid = str(uid).strip(" \0")
    if not uid:
        return ""
    digest = hmac.new(key, b"mlpipe.deid uid\0" + uid.encode(), hashlib.sha256).digest()
    n = int.from_bytes(digest[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8
    n = (n & ~(0x3 << 62)) | (0x2 << 62)  # variant 10
    return f"{UID_ROOT}{n}"


def date_offset_days(patient: str, key: bytes, max_days: int = 3650) -> int:
    """The patient's date shift, from -max_days to -1 days (HMAC-SHA256 of the patient under the key).

    One patient, one offset: every date of theirs moves by the same number of days, so intervals
    (age at the study, time between studies) are kept. Always into the past, so no shifted date
    lands in the future, and never 0, so no patient keeps true dates. About ten years by default:
    wide enough that a shifted date says little about the true one. Anyone who learns one true
    date of a patient learns that patient's offset (inherent to the option): the key stays secret.
    """
    if max_days < 1:
        raise ValueError("max_days must be at least 1")
    digest = hmac.new(key, b"mlpipe.deid date offset\0" + str(patient).encode(), hashlib.sha256).digest()
    return -(1 + int.from_bytes(digest[:8], "big") % max_days)


_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
# DT: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX] (PS3.5 6.2)
_DT = re.compile(
    r"^(?P<y>\d{4})(?:(?P<m>\d{2})(?:(?P<d>\d{2})(?P<time>\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?"
    r"(?P<tz>[+-]\d{4})?$"
)


def _parse(value: str, vr: str) -> tuple[datetime.date, int, str] | None:
    """(date, precision: 1 year, 2 month, 3 day, the rest after the date) or None when malformed."""
    value = value.strip(" \0")
    try:
        if vr == "DA":
            m = _DA.match(value)
            return (datetime.date(int(m[1]), int(m[2]), int(m[3])), 3, "") if m else None
        m = _DT.match(value)
        if not m:
            return None
        precision = 1 + (m["m"] is not None) + (m["d"] is not None)
        day = datetime.date(int(m["y"]), int(m["m"] or 1), int(m["d"] or 1))
        return day, precision, (m["time"] or "") + (m["tz"] or "")
    except ValueError:  # month 13, February 30th, year 0
        return None


def _values(value: str) -> list[str]:
    return [] if value is None or value == "" else str(value).split("\\")


def _shift_one(value: str, vr: str, offset_days: int) -> str | None:
    if value.strip(" \0") == "":
        return ""
    parsed = _parse(value, vr)
    if parsed is None:
        return None
    day, precision, rest = parsed
    try:
        shifted = day + datetime.timedelta(days=offset_days)
    except OverflowError:
        return None
    return f"{shifted.year:04d}{shifted.month:02d}{shifted.day:02d}"[: 2 + 2 * precision] + rest


def _year_one(value: str, vr: str, for_column: bool) -> str | None:
    if value.strip(" \0") == "":
        return ""
    parsed = _parse(value, vr)
    if parsed is None:
        return None
    year = f"{parsed[0].year:04d}"
    return year if for_column or vr == "DT" else year + "0101"


def shift_date(value: str, vr: str, offset_days: int) -> str:
    """A DA (YYYYMMDD) or DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX, any precision) value moved by whole days.

    A DT keeps its time, fraction and UTC offset as written, and its precision (a YYYYMM value
    stays YYYYMM, shifted from the month's first day). Multiple values ("\\"-separated) each.
    Empty stays empty; a malformed value (not DICOM DA/DT: "2004-01-19", month 13) becomes "".
    """
    vr = vr.upper()
    if vr not in DATE_VRS:
        raise ValueError(f"shift_date takes DA or DT, not {vr}")
    return "\\".join(v or "" for v in (_shift_one(v, vr, offset_days) for v in _values(value)))


def year_only(value: str, vr: str, *, for_column: bool = False) -> str:
    """The keep-the-year-only option: DA -> "YYYY0101" (a valid DA; PS3.15 names no form), DT ->
    "YYYY" (a valid DT of year precision); for a manifest column (for_column=True) "YYYY" for both.
    Multiple values each; empty stays empty; malformed becomes ""."""
    vr = vr.upper()
    if vr not in DATE_VRS:
        raise ValueError(f"year_only takes DA or DT, not {vr}")
    return "\\".join(v or "" for v in (_year_one(v, vr, for_column) for v in _values(value)))


def _method_codes(dates: str, clean_pixels: bool) -> list:
    out = [codes.DCM.BasicApplicationConfidentialityProfile]
    if clean_pixels:
        out.append(codes.DCM.CleanPixelDataOption)
    if dates == "shift":
        out.append(codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption)
    return out


def _method_text(dates: str, clean_pixels: bool) -> list[str]:
    """De-identification Method (LO: at most 64 characters a value)."""
    lines = ["PS3.15 E.1-1 Basic Application Confidentiality Profile", f"Table {TABLE} ({LIBRARY})"]
    lines.append("Modified Dates: keyed per-patient day offset; times kept" if dates == "shift"
                 else "Dates reduced to the year (DA YYYY0101, DT YYYY)")  # fmt: skip
    lines += ["UIDs: keyed HMAC-SHA256 under 2.25", "Patient ID and Name: keyed pseudonym"]
    lines.append("Private attributes removed")
    if clean_pixels:
        lines.append("Clean Pixel Data: burned-in text redacted")
    return lines


def method_record(dates: str, clean_pixels: bool) -> dict:
    """What (0012,0062), (0012,0063) and (0012,0064) record for these options (PS3.3 C.7.1.1), as
    JSON: for the anonymize report, also when no DICOM file is written."""
    return {"PatientIdentityRemoved": "YES", "DeidentificationMethod": _method_text(dates, clean_pixels),
            "DeidentificationMethodCodeSequence": [{"CodeValue": c.value, "CodingSchemeDesignator": c.scheme_designator,
                                                    "CodeMeaning": c.meaning} for c in _method_codes(dates, clean_pixels)]}  # fmt: skip


@dataclass
class DeidReport:
    """What `deidentify` did, as counts and codes: never a value of the dataset."""

    dates: str
    options: list[dict[str, str]]  # the CID 7050 codes recorded: code, scheme, meaning
    profile: str = PROFILE_SOURCE
    removed: int = 0  # plain attributes removed (X)
    emptied: int = 0  # set to a zero-length value (Z)
    replaced: int = 0  # given a dummy value (D)
    pseudonymized: int = 0  # Patient ID and Patient's Name
    uids_remapped: int = 0  # elements (each value of a multi-valued one remapped)
    dates_shifted: int = 0
    dates_year_only: int = 0
    dates_malformed: int = 0  # values that were no DICOM date: emptied
    times_kept: int = 0  # listed TM elements kept with the shifted dates
    private_tags_removed: int = 0
    sequences_removed: int = 0
    sequences_emptied: int = 0
    sequences_cleaned: int = 0  # kept, every nested element treated by its tag
    burned_in_annotation: str = ""  # the header's BurnedInAnnotation (YES, NO) or "" when absent

    def to_dict(self) -> dict:
        return asdict(self)


def _check_dates(dates: str) -> None:
    if dates not in ("shift", "year"):
        raise ValueError(f"dates must be 'shift' or 'year', not {dates!r}")


def _str_values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


@dataclass
class _Run:
    key: bytes
    offset: int
    dates: str
    report: DeidReport
    pid_pseudonyms: dict[int, str] = field(default_factory=dict)  # id(dataset) -> pseudonym of its PatientID

    def apply(self, dataset: Dataset, tag, code: str) -> None:
        """One listed element, by its action code (the rule `anonymize_dataset` calls, and our walk)."""
        tag = Tag(tag)
        if tag not in dataset:
            return
        elem = dataset[tag]
        vr = elem.VR
        r = self.report
        if vr == "SQ":
            if code in SEQUENCE_REMOVE:
                del dataset[tag]
                r.sequences_removed += 1
            elif code in SEQUENCE_EMPTY:
                elem.value = Sequence()
                r.sequences_emptied += 1
            else:  # D, X/Z/U*: the items stay, cleaned by tag in `_walk`
                r.sequences_cleaned += 1
            return
        if vr in DATE_VRS:
            self.date(elem)
            return
        if vr == "TM" and self.dates == "shift":
            r.times_kept += 1
            return
        if tag in (PATIENT_ID, PATIENT_NAME):
            elem.value = self.pid_pseudonyms.get(id(dataset), "")
            r.pseudonymized += 1
            return
        if vr == "UI" and (code == "U" or code in DUMMY_ACTIONS):
            values = [remap_uid(v, self.key) for v in _str_values(elem.value)]
            elem.value = values[0] if len(values) == 1 else values
            r.uids_remapped += 1
            return
        action = {"X": _lib.delete, "Z": _lib.empty, "X/Z": _lib.empty}.get(code, _lib.replace)
        try:
            action(dataset, tag)
        except NotImplementedError:  # a VR the library has no dummy for (OW, AT, ...): removed
            del dataset[tag]
        if tag not in dataset:
            r.removed += 1
        elif dataset[tag].is_empty:
            r.emptied += 1
        else:
            r.replaced += 1

    def date(self, elem: DataElement) -> None:
        values = _str_values(elem.value)
        if not any(v.strip(" \0") for v in values):
            return
        if self.dates == "shift":
            new = [_shift_one(v, elem.VR, self.offset) for v in values]
            self.report.dates_shifted += 1
        else:
            new = [_year_one(v, elem.VR, False) for v in values]
            self.report.dates_year_only += 1
        self.report.dates_malformed += sum(v is None for v in new)
        new = [v or "" for v in new]
        elem.value = new[0] if len(new) == 1 else new

    def walk(self, dataset: Dataset, top: bool) -> None:
        """Every element at every depth: listed ones by their action (the top level is the library's
        job), unlisted dates shifted too; into every sequence that is still there."""
        for tag in list(dataset.keys()):
            if tag not in dataset:
                continue
            elem = dataset[tag]
            code = profile_action(tag)
            if code is None:
                if elem.VR in DATE_VRS:
                    self.date(elem)
            elif not top:
                self.apply(dataset, tag, code)
            if tag in dataset and dataset[tag].VR == "SQ":
                for item in dataset[tag].value:
                    self.walk(item, top=False)


def _datasets(ds: Dataset) -> Iterator[Dataset]:
    """The dataset and every nested item dataset, depth first."""
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _datasets(item)


def _remove_private(ds: Dataset) -> int:
    removed = 0
    for tag in list(ds.keys()):
        if BaseTag(tag).is_private:
            del ds[tag]
            removed += 1
        elif ds[tag].VR == "SQ":
            removed += sum(_remove_private(item) for item in ds[tag].value)
    return removed


def _entry_action(entry: tuple) -> str:
    """The action code of one entry of the library's table: (group, element) or a masked 4-tuple."""
    return PROFILE[(entry[0] << 16) | entry[1]] if len(entry) == 2 else REPEATING[tuple(entry)]


def _table_rules(ds: Dataset) -> dict:
    """The library's own rules for `ds` (`initialize_actions` of the 2026c table), cut to the exact
    tags present in it or its file meta (the rest would look for absent tags, 650 times a dataset),
    and every masked one."""
    meta = getattr(ds, "file_meta", None)
    present = {(t.group, t.element) for t in ds.keys()} | {(t.group, t.element) for t in (meta or {}).keys()}
    return {k: v for k, v in _lib.initialize_actions(TABLE).items() if len(k) == 4 or k in present}


def deidentify(
    ds: Dataset,
    key: bytes,
    *,
    patient: str,
    dates: Literal["shift", "year"] = "shift",
    clean_pixels: bool = False,
) -> DeidReport:
    """De-identify `ds` in place (file meta too) for writing a de-identified DICOM file.

    `key`: the pseudonym key (as `mlpipe.anonymize.load_key`); `patient`: whose date offset applies
    to every date of the dataset (normally its raw PatientID; the same for all of that patient's
    files). dates="shift": the Modified Dates Option; "year": dates keep only their year.
    clean_pixels=True records the Clean Pixel Data Option: pass it only for pixels the caller has
    already cleaned of burned-in text (this function never touches pixel data).
    """
    _check_dates(dates)
    if not key:
        raise ValueError("an empty key")
    options = _method_codes(dates, clean_pixels)
    report = DeidReport(
        dates=dates,
        options=[{"code": c.value, "scheme": c.scheme_designator, "meaning": c.meaning} for c in options],
        burned_in_annotation=str(ds.get("BurnedInAnnotation", "") or "").strip().upper(),
    )
    run = _Run(key=key, offset=date_offset_days(patient, key), dates=dates, report=report)
    from mlpipe.anonymize import pseudonym  # here, not at import: the anonymize stage imports this module

    report.private_tags_removed = _remove_private(ds)
    for item in _datasets(ds):
        if PATIENT_ID in item:
            run.pid_pseudonyms[id(item)] = pseudonym(str(item[PATIENT_ID].value or "").strip(), key)

    # Every entry of the library's table gets our rule (its own would draw random UIDs, 00010101).
    base = _table_rules(ds)
    rules = {entry: functools.partial(run.apply, code=_entry_action(entry)) for entry in base}
    _lib.anonymize_dataset(ds, extra_anonymization_rules=rules, delete_private_tags=True, base_rules_gen=lambda: base)
    run.walk(ds, top=True)

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    _record_method(ds, options, _method_text(dates, clean_pixels), clean_pixels)
    return report


def _record_method(ds: Dataset, options: list, text: list[str], clean_pixels: bool) -> None:
    """PS3.3 C.7.1.1 (Patient Identification Module's de-identification attributes), appended to
    any earlier de-identification's record."""
    ds.PatientIdentityRemoved = "YES"
    earlier = _str_values(ds.DeidentificationMethod) if "DeidentificationMethod" in ds else []
    ds.DeidentificationMethod = [v for v in earlier if v and v not in text] + text
    seq = ds.DeidentificationMethodCodeSequence if "DeidentificationMethodCodeSequence" in ds else Sequence()
    have = {(item.get("CodeValue"), item.get("CodingSchemeDesignator")) for item in seq}
    for code in options:
        if (code.value, code.scheme_designator) not in have:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator = code.value, code.scheme_designator
            item.CodeMeaning = code.meaning
            seq.append(item)
    ds.DeidentificationMethodCodeSequence = seq
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    if clean_pixels:
        ds.BurnedInAnnotation = "NO"


def header_values_removed(ds: Dataset, *, dates: Literal["shift", "year"] = "shift") -> set[str]:
    """Every non-empty string value of the ORIGINAL `ds` (nested too, file meta included) that
    `deidentify` does not let through unchanged: names, IDs, dates, UIDs, institution, private
    text, everything inside a removed or emptied sequence. Only values of 4+ characters (short
    codes would match everywhere), and none that also occurs within a value that is let through,
    or within the text `deidentify` itself writes (the method record, the library's dummies such
    as ANONYMIZED): those show up anyway, and not as a leak. For tests and leak scans; `ds` is not
    modified."""
    _check_dates(dates)
    changed: set[str] = set()
    kept: set[str] = set()

    def visit(dataset: Dataset, inside_removed: bool) -> None:
        for tag in list(dataset.keys()):
            try:
                elem = dataset[tag]
            except Exception:  # an element pydicom cannot decode is not written back as it was either
                continue
            code = profile_action(tag)
            goes = inside_removed or code is not None or elem.VR in DATE_VRS
            if code is not None and elem.VR == "TM" and dates == "shift" and not inside_removed:
                goes = False
            if elem.VR == "SQ":
                gone = inside_removed or code in SEQUENCE_REMOVE + SEQUENCE_EMPTY or BaseTag(tag).is_private
                for item in elem.value:
                    visit(item, gone)
                continue
            if isinstance(elem.value, bytes | bytearray):
                continue
            strings = [s.strip(" \0") for s in _str_values(elem.value)] if elem.VR in _TEXT_VRS else []
            for s in strings:
                if s and goes and not inside_removed and dates == "year" and elem.VR in DATE_VRS:
                    (kept if year_only(s, elem.VR) == s else changed).add(s)  # 20170101 stays 20170101
                elif s:
                    (changed if goes else kept).add(s)

    visit(ds, False)
    if getattr(ds, "file_meta", None) is not None:
        visit(ds.file_meta, False)
    out = {v for v in changed - kept if len(v) >= 4}
    return {v for v in out if not any(v in k for k in kept | _written_constants())}


@functools.cache
def _written_constants() -> frozenset[str]:
    """Every text `deidentify` writes whatever the input: method records, code meanings, dummies."""
    out = {"YES", "NO", "MODIFIED", "ANONYMIZED", "000Y", "http://anonymized.invalid", "000000.00", "Anonymized"}
    for dates in ("shift", "year"):
        for clean in (False, True):
            out.update(_method_text(dates, clean))
            out.update(c.meaning for c in _method_codes(dates, clean))
    return frozenset(out)



def value_bytes(value: str, ds: Dataset | None = None) -> set[bytes]:
    """How a value can appear in a written file: UTF-8, and the dataset's Specific Character Set."""
    out = {value.encode("utf-8")}
    if ds is not None and "SpecificCharacterSet" in ds:
        try:
            out.add(encode_string(value, convert_encodings(ds.SpecificCharacterSet)))
        except Exception:  # a value the declared character set cannot encode: UTF-8 only
            pass
    return out


__all__ = [
    "PROFILE", "REPEATING", "PROFILE_SOURCE", "DeidReport", "profile_action", "column_policy", "remap_uid",
    "date_offset_days", "shift_date", "year_only", "deidentify", "header_values_removed", "value_bytes",
]  # fmt: skip

