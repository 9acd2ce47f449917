"""Real DICOM for tests: the files pydicom's wheel and PyPI's deid-data ship, and a trainable
ImageFolder of CT slices built on a real header (pydicom's CT_small.dcm) with new patients.

Files are found by globbing the installed packages' data folders: pydicom's
`get_testdata_file(s)` tries the network for files it lacks."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def pydicom_files() -> list[Path]:
    import pydicom

    return sorted((Path(pydicom.__file__).parent / "data" / "test_files").rglob("*.dcm"))


def deid_data_file(name: str) -> Path:
    """A file of PyPI's deid-data, e.g. "ultrasounds/GREYSCALE_IMAGE.dcm" (BurnedInAnnotation YES)."""
    import deid_data

    return Path(deid_data.__file__).parent / "data" / name


def pydicom_file(name: str) -> Path:
    return next(p for p in pydicom_files() if p.name == name)


@dataclass
class CtFolder:
    root: Path
    personal: set[str] = field(default_factory=set)  # every identifying header value written (names, IDs, dates, UIDs)
    items: int = 0
    patients: int = 0


def ct_folder(root: Path, per_class: int = 16, side: int = 64, seed: int = 0) -> CtFolder:
    """root/<class>/<n>.dcm: two classes ("round", "square": a dense disc or square in a body
    ellipse, CT-like int16 with RescaleIntercept -1024), `per_class` slices each, two slices per
    patient, on the header of pydicom's real CT_small.dcm (its InstitutionName and other real
    values kept) with a new PatientName, PatientID, PatientBirthDate, StudyDate, AccessionNumber
    and UIDs per patient or slice. BurnedInAnnotation says NO: the burned-in cases are added by
    the tests that want them."""
    import pydicom
    from faker import Faker
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    fake = Faker()
    Faker.seed(seed)
    rng = np.random.default_rng(seed)
    base = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    out = CtFolder(root)
    yy, xx = np.mgrid[:side, :side]
    for label in ("round", "square"):
        (root / label).mkdir(parents=True)
        for n in range(per_class):
            if n % 2 == 0:
                patient = {"PatientName": f"{fake.last_name()}^{fake.first_name()}", "PatientID": f"MRN{rng.integers(10**6, 10**7)}",
                           "PatientBirthDate": fake.date_of_birth(minimum_age=20, maximum_age=90).strftime("%Y%m%d"),
                           "StudyDate": fake.date_between("-5y", "today").strftime("%Y%m%d"),
                           "AccessionNumber": f"ACC{rng.integers(10**5, 10**6)}", "StudyInstanceUID": generate_uid()}  # fmt: skip
                out.patients += 1
            ds = copy.deepcopy(base)
            for keyword, value in patient.items():
                setattr(ds, keyword, value)
            ds.SOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.BurnedInAnnotation = "NO"
            # Body, lesion place and size vary per slice: no two slices look alike to the perceptual hash.
            (by, bx), (ay, ax) = rng.uniform(0.35, 0.65, 2) * side, rng.uniform(0.25, 0.48, 2) * side
            body = ((yy - by) / ay) ** 2 + ((xx - bx) / ax) ** 2 <= 1
            hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, (side, side))
            cy, cx, r = rng.integers(side // 4, 3 * side // 4, 2).tolist() + [int(rng.integers(side // 8, side // 4))]
            mask = (np.hypot(yy - cy, xx - cx) <= r) if label == "round" else ((abs(yy - cy) <= r) & (abs(xx - cx) <= r))
            hu[mask] = 700.0 + rng.normal(0, 20, int(mask.sum()))
            ds.Rows = ds.Columns = side
            ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            for stale in ("WindowCenter", "WindowWidth", "LargestImagePixelValue", "SmallestImagePixelValue"):
                if stale in ds:
                    delattr(ds, stale)
            ds.PixelData = np.clip(hu + 1024, -32768, 32767).astype("<i2").tobytes()
            ds.save_as(root / label / f"{n:03d}.dcm", enforce_file_format=True)
            out.items += 1
            out.personal |= {v for k, v in patient.items()} | {ds.SOPInstanceUID, ds.SeriesInstanceUID}
    return out
