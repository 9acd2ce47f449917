"""Issue 20: a folder of DICOM files trains with `mlpipe run --set source.uri=DIR` alone; the
PS3.15 Basic Profile governs the header columns; an image whose header says it has burned-in
text is quarantined and counted; the de-identified DICOM written is what the standard records;
and no header value the profile removes reaches any output: MLflow's store, artifacts, work
files, logs or file names."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dicom_data import ct_folder, deid_data_file
from tests.privacy import files_under

pytestmark = pytest.mark.slow


def _removed_values(root: Path) -> set[str]:
    """Every identifying header value (4+ characters) the profile removes or replaces, over all
    source files, nested sequences included: names (PN), dates, UIDs, and IDs, numbers, addresses,
    institutions and stations by keyword (`mlpipe.dicom.identifier_columns`). Generic words the
    profile also removes from descriptions ("None", "TEXT") occur in any code or log and say
    nothing of a person. A value another attribute keeps is no leak of the removed one
    (`header_values_removed` leaves those out)."""
    import pydicom

    from mlpipe.deid import header_values_removed
    from mlpipe.dicom import identifier_columns

    out = set()
    for path in root.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        removed = header_values_removed(ds)
        identifying = set(identifier_columns(list({e.keyword for e in ds.iterall() if e.keyword})))
        values = {str(v) for e in ds.iterall() if e.keyword in identifying or e.VR == "PN"
                  for v in (e.value if e.VM > 1 and not isinstance(e.value, str) else [e.value])}  # fmt: skip
        out |= {v for v in removed & values if len(v) >= 4}
    return out


def test_a_dicom_folder_trains_and_no_removed_header_value_reaches_any_output(tmp_path):
    import pydicom
    from mlflow.tracking import MlflowClient

    data = ct_folder(tmp_path / "scans", per_class=16, side=64)
    shutil.copy(deid_data_file("ultrasounds/GREYSCALE_IMAGE.dcm"), data.root / "round" / "us_burned_in.dcm")
    removed = _removed_values(data.root)
    assert data.personal - {v for v in data.personal if len(v) < 4} <= removed  # the scan covers every planted value
    home = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(MLPIPE_HOME=str(home), CUDA_VISIBLE_DEVICES="", MLPIPE_PSEUDONYM_KEY="a key for this test only")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--set", f"source.uri={data.root}",
                           "--set", "train.epochs=2", "--set", "anonymize.write_dicom=true"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ingest.image_size 64" in done.stderr and "source.layout imagefolder" in done.stderr
    assert re.search(r"anonymize +33 in, 32 kept; quarantined 1 \(burned-in annotation \(header\)\)", done.stdout)

    run_id = re.search(r"MLflow run: +(\w+)", done.stdout).group(1)
    params = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(run_id).data.params
    assert params["split.group_column"] == "PatientID" and params["anonymize.write_dicom"] == "true"

    report = json.loads(next((home / "work" / "anonymize").glob("*/report.json")).read_text())
    assert report["policy"]["PatientName"]["action"] == "drop" and report["policy"]["StudyInstanceUID"]["action"] == "remap_uid"
    assert report["dicom"]["burned_in"]["quarantined"] == 1 and report["dicom"]["written"]["files"] == 32
    items = __import__("pandas").read_parquet(next((home / "work" / "anonymize").glob("*/items.parquet")))
    assert items["PatientID"].str.startswith("p_").all() and items["PatientID"].nunique() == data.patients

    written = sorted((home / "work" / "anonymize").glob("*/dicom/*.dcm"))
    assert len(written) == 32
    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in data.root.rglob("*.dcm")}
    for path in written:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.StudyInstanceUID.startswith("2.25.")
        codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
        assert {"113100", "113107"} <= codes
        assert not any(element.tag.is_private for element in ds)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID and ds.SOPInstanceUID not in originals
    # Dates shift per patient by one offset: the age at the study, in days, is kept exactly.
    def days(ds):
        from datetime import datetime

        return (datetime.strptime(ds.StudyDate, "%Y%m%d") - datetime.strptime(ds.PatientBirthDate, "%Y%m%d")).days

    after = [pydicom.dcmread(p) for p in written]
    assert all(d.StudyDate and d.PatientBirthDate for d in after)
    assert sorted({days(d) for d in after}) == sorted({days(o) for o in originals.values() if o.get("Modality") == "CT"})
    assert not {d.StudyDate for d in after} & {o.StudyDate for o in originals.values()}

    outputs = files_under(home)
    hits = [(str(p.relative_to(home)), v) for p in outputs for v in removed
            if v in p.name or v.encode() in p.read_bytes()]  # fmt: skip
    hits += [("stdout/stderr", v) for v in removed if v in done.stdout or v in done.stderr]
    assert not hits, hits[:10]
