"""Issue 19, item 4: `mlpipe check` validates a config and its data without a run, one line per
problem; `mlpipe config` prints the config, `--schema` its JSON schema."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from flows.cli import main
from mlpipe.check import suggest_for
from mlpipe.config import PipelineConfig, load_config

RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def _folder(root, classes: dict, size=(24, 20)):
    """root/<class>/<i>.png: `classes` maps a name to (count, tint); coloured noise, all distinct."""
    rng = np.random.default_rng(1)
    for name, (count, tint) in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            noise = rng.integers(0, 60, (size[1], size[0], 3))
            Image.fromarray((noise + np.array(tint)).clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _manifest(root, extra_columns: dict, rows=30):
    """root/manifest.csv (image, label and `extra_columns`: name -> value for row i) with gray images."""
    (root / "images").mkdir(parents=True)
    lines = [",".join(["image", "label", *extra_columns])]
    for i in range(rows):
        Image.fromarray(np.full((16, 16), 8 * i, np.uint8), "L").save(root / "images" / f"{i}.png")
        lines.append(",".join([f"images/{i}.png", str(i % 2), *(f(i) for f in extra_columns.values())]))
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def _check(capsys, *args):
    code = main(["check", *args])
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line]


def test_check_of_a_folder_takes_seconds_and_starts_no_run(tmp_path):
    """In a fresh interpreter, as a user runs it: a few hundred images, no MLflow store, no Prefect database."""
    root = _folder(tmp_path / "data", {"red": (100, RED), "green": (100, GREEN), "blue": (100, BLUE)})
    env = {**os.environ, "MLPIPE_HOME": str(tmp_path / "state"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(name, None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "check", "--set", f"source.uri={root}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "layout imagefolder (auto); 300 rows" in done.stdout
    assert "ingest.channels 3" in done.stdout and "ingest.image_size 24 (median longer side 24 px)" in done.stdout
    assert "3 classes: blue 100, green 100, red 100" in done.stdout and done.stderr == ""
    assert seconds < 60  # seconds on an idle machine (imports included); generous for a busy CI runner
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "data" not in p.parts}
    assert not any(name.endswith(".db") or "mlruns" in name or "work" in name for name in written), written


def test_check_passes_on_the_sample_and_writes_only_the_sample(state, capsys):
    code, out, err = _check(capsys)
    assert code == 0 and err == [], err
    assert "layout manifest (auto); 1103 rows" in out and "ingest.image_size 16 (median longer side 8 px)" in out
    assert "labels from annotator_1, annotator_2, annotator_3; groups by subject_id" in out
    assert "sample: 32 of 1103 rows read, 32 decoded, 0 unreadable; sizes 8x8 (32); modes L (32); 0 in colour" in out
    assert {p.name for p in state.iterdir()} == {"sample"}  # no mlflow.db, no work/, no prefect-results


def test_a_missing_source_is_one_line(state, capsys, tmp_path):
    code, _, err = _check(capsys, "--set", f"source.uri={tmp_path / 'nowhere'}")
    assert code == 1 and len(err) == 1
    assert err[0] == f"mlpipe: error: source: source directory not found: {tmp_path / 'nowhere'}"


def test_each_manifest_column_without_a_policy_gets_a_line_with_a_suggestion_and_no_value(state, capsys, tmp_path):
    columns = {
        "email": lambda i: f"jane{i}@example.org",
        "patient_id": lambda i: f"P{i:04d}",
        "visit_date": lambda i: f"2020-01-{i + 1:02d}",
        "remarks": lambda i: f"Jane Roe{i} called about the scan again today",
        "zz": lambda i: f"jane{i}@example.org",  # a name that says nothing: its values decide
    }
    root = _manifest(tmp_path / "data", columns)
    sets = ["--set", f"source.uri={root}", "--set", "anonymize.policy={label: keep}", "--set", "label.columns=[label]",
            "--set", "split.group_column=null"]  # fmt: skip
    code, out, err = _check(capsys, *sets)
    assert code == 1
    expected = {
        "email": "suggest drop (its name says an e-mail address); set anonymize.policy.email",
        "patient_id": "suggest pseudonymize (its name says an identifier)",
        "visit_date": "suggest generalize_date (its name says a date)",
        "remarks": "suggest redact_text (its name says free text)",
        "zz": "suggest drop (e-mail-like)",
    }
    for column, needle in expected.items():
        lines = [line for line in err if f"manifest column '{column}' has no anonymize.policy entry" in line]
        assert len(lines) == 1 and needle in lines[0], (column, err)
    assert all(line.startswith("mlpipe: error: ") for line in err) and len(err) == len(expected)
    assert "jane" not in (out + "\n".join(err)).lower() and "P0001" not in out + "\n".join(err)


def test_a_class_with_too_few_items_is_one_line(state, capsys, tmp_path):
    root = _folder(tmp_path / "data", {"red": (10, RED), "green": (10, GREEN), "rare": (2, BLUE)})
    code, out, err = _check(capsys, "--set", f"source.uri={root}")
    assert code == 1 and len(err) == 1, err
    assert err[0] == ("mlpipe: error: class 'rare': 2 item(s) in 2 group(s); the split needs at least 3 groups per "
                      "class (one each for train, val and test)")  # fmt: skip
    assert "3 classes: green 10, rare 2, red 10" in out


def test_dicom_items_whose_header_says_burned_in_text_are_predicted(state, capsys, tmp_path):
    """BurnedInAnnotation YES is in every header: check counts what anonymize will quarantine (a
    warning; a problem past anonymize.max_drop_fraction), and with burned_in redact, those OCR will
    not read (quarantined all the same)."""
    import pydicom

    from mlpipe.burned_in import ocr_available
    from tests.dicom_data import ct_folder

    root = ct_folder(tmp_path / "ct", per_class=8, side=32).root
    files = sorted(root.rglob("*.dcm"))

    def say_yes(count: int) -> None:
        for n, path in enumerate(files):
            ds = pydicom.dcmread(path)
            ds.BurnedInAnnotation = "YES" if n < count else "NO"
            ds.save_as(path)

    say_yes(1)
    _, _, err = _check(capsys, "--set", f"source.uri={root}")
    assert "mlpipe: warning: 1 of 16 DICOM item(s) say BurnedInAnnotation YES: anonymize quarantines them" in err, err
    say_yes(5)
    code, _, err = _check(capsys, "--set", f"source.uri={root}")
    assert code == 1 and ("mlpipe: error: 5 of 16 DICOM item(s) say BurnedInAnnotation YES: anonymize quarantines them, "
                          "more than anonymize.max_drop_fraction 0.2: anonymize would stop; anonymize.burned_in: "
                          "redact with anonymize.text_scan: always blacks the text out instead") in err, err  # fmt: skip
    # redact: CT is not read by OCR under text_scan auto, so every YES item is quarantined all the same
    code, out, err = _check(capsys, "--set", f"source.uri={root}", "--set", "anonymize.burned_in=redact")
    assert code == 1 and ("mlpipe: error: 5 of 16 DICOM item(s) say BurnedInAnnotation YES and OCR will not read them "
                          "(modality CT under text_scan auto): anonymize quarantines them, more than "
                          "anonymize.max_drop_fraction 0.2: anonymize would stop; with anonymize.text_scan: always OCR "
                          "reads them") in err, err  # fmt: skip
    redact_all = ["--set", "anonymize.burned_in=redact", "--set", "anonymize.text_scan=always"]
    if ocr_available():  # tesseract installed (make test installs it): OCR reads the CT slices, nothing is certain
        code, out, err = _check(capsys, "--set", f"source.uri={root}", *redact_all)
        assert "burned-in text: 5 DICOM item(s) say BurnedInAnnotation YES; anonymize blacks out" in out
        assert not [line for line in err if "BurnedInAnnotation" in line], err
    say_yes(1)
    _, out, err = _check(capsys, "--set", f"source.uri={root}", "--set", "anonymize.burned_in=redact",
                         "--set", "anonymize.text_scan=never")  # fmt: skip
    assert ("mlpipe: warning: burned-in text: 1 DICOM item(s) say BurnedInAnnotation YES; anonymize blacks out the text "
            "OCR locates in them and quarantines those where it locates none; 1 of them OCR will not read "
            "(anonymize.text_scan never): quarantined") in err, err  # fmt: skip

    # A study export's non-image objects and a stray text file: read, named, not decoded.
    report = Path(pydicom.__file__).parent / "data" / "test_files" / "reportsi.dcm"
    (files[0].parent / "report.dcm").write_bytes(report.read_bytes())
    (files[0].parent / "notes.dcm").write_text("patient list, not an image\n")
    say_yes(0)
    _, out, err = _check(capsys, "--set", f"source.uri={root}")
    assert "sample: 18 of 18 rows read, 16 decoded, 2 unreadable; sizes 32x32 (16)" in out, out
    quarantined = sorted(line.split(": ", 3)[3] for line in err if "ingest quarantines it" in line)  # after "row N: "
    assert quarantined == ["DICOM without pixel data (Basic Text SR Storage) (ingest quarantines it)",
                           "not an image (ingest quarantines it)"], err  # fmt: skip


def test_a_colour_only_transform_on_gray_data_is_refused_by_the_decided_channels(state, capsys, tmp_path):
    root = _manifest(tmp_path / "data", {})
    flare = "{transform: {__class_fullname__: Compose, p: 1.0, transforms: [{__class_fullname__: RandomSunFlare, p: 0.3}]}}"
    sets = ["--set", f"source.uri={root}", "--set", "anonymize.policy={label: keep}", "--set", "label.columns=[label]",
            "--set", "split.group_column=null", "--set", f"train.augment={flare}"]  # fmt: skip
    code, _, err = _check(capsys, *sets)
    assert code == 1 and len(err) == 1
    assert err[0].startswith("mlpipe: error: config error: train.augment: RandomSunFlare needs 3 channels; ingest.channels is 1")


def test_a_bad_set_is_one_line_and_exit_2(state, capsys):
    code, out, err = _check(capsys, "--set", "ingest.image_size=2")
    assert code == 2 and out == "" and len(err) == 1
    assert err[0].startswith("mlpipe: error: config error: ingest.image_size: ") and "4 to 1024" in err[0]


def test_config_prints_yaml_that_loads_back_to_the_same_config(capsys, tmp_path):
    assert main(["config", "--set", "train.lr=0.01", "--set", "source.uri=/data/x"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert load_config(path) == load_config(None, ["train.lr=0.01", "source.uri=/data/x"])
    printed = yaml.safe_load(text)
    assert printed["train"]["lr"] == 0.01 and printed["ingest"]["channels"] == "auto"  # auto until the data decides


def test_config_schema_is_the_pipeline_configs(capsys):
    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == json.loads(json.dumps(PipelineConfig.model_json_schema()))
    ingest = schema["$defs"]["IngestConfig"]["properties"]
    assert ingest["image_size"]["default"] == "auto" and "median longer side" in ingest["image_size"]["description"]


@pytest.mark.parametrize(
    ("column", "suggestion"),
    [("e_mail", "drop"), ("PatientName", "drop"), ("date_of_birth", "generalize_date"), ("subject_id", "pseudonymize"),
     ("annotator_2", "keep"), ("comment", "redact_text"), ("age", "generalize_number"), ("zip_code", "truncate"),
     ("annotator_email", "drop"), ("labeller_name", "drop"), ("class_label", "keep")],
)  # fmt: skip
def test_names_suggest_policies(column, suggestion):
    import pandas as pd

    assert suggest_for(column, pd.Series(["x"] * 3)).split()[0] == suggestion


@pytest.mark.parametrize("text_scan,tesseract,expected", [
    ("never", True, (2, "anonymize.text_scan never", "anonymize.text_scan: always")),
    ("auto", True, (1, "modality CT under text_scan auto", "anonymize.text_scan: always")),  # US is read, CT is not
    ("auto", False, (2, "tesseract is not installed", "tesseract-ocr installed and anonymize.text_scan: always")),
    ("always", True, (0, "", "")),
    ("always", False, (2, "tesseract is not installed", "tesseract-ocr installed")),
])  # fmt: skip
def test_which_burned_in_items_ocr_will_not_read_and_what_would_make_it(monkeypatch, text_scan, tesseract, expected):
    from mlpipe import burned_in
    from mlpipe.check import _not_read_by_ocr

    monkeypatch.setattr(burned_in, "ocr_available", lambda: tesseract)
    assert _not_read_by_ocr(pd.DataFrame({"Modality": ["CT", " us"]}), text_scan) == expected
