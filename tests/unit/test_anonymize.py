import os
import stat

import numpy as np
import pandas as pd
import pytest
from PIL import Image, PngImagePlugin

from mlpipe.anonymize import anonymize, pseudonym, redact_text
from mlpipe.config import AnonymizeConfig, IngestConfig, SourceConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ingest

PERSONAL = ("name", "email", "phone")


@pytest.fixture
def snapshot(state, sample_root):
    return ingest(SourceConfig(uri=str(sample_root)), IngestConfig())


def _raw(sample_root):
    return pd.read_csv(sample_root / "manifest.csv", dtype=str, keep_default_na=False)


def test_no_raw_personal_value_survives(snapshot, sample_root):
    result = anonymize(snapshot, AnonymizeConfig(), SourceConfig(uri=str(sample_root)))
    out = pd.read_parquet(result.file("items.parquet"))
    blob = out.to_csv()
    raw = _raw(sample_root)
    for column in PERSONAL:
        assert not any(v in blob for v in raw[column]), column
    assert not any(v in blob for v in raw["subject_id"])
    assert not any(v in blob for v in raw["date_of_birth"])  # generalized to the year
    assert set(out.columns) >= {"item_id", "subject_id", "date_of_birth", "note"}
    assert not set(PERSONAL) & set(out.columns)
    assert out["note"].str.contains(r"\[REDACTED\]|<PHONE_NUMBER>|<EMAIL_ADDRESS>").sum() > 50
    assert result.report["residual_scan"]["hits"] == 0 and result.report["residual_scan"]["raw_values_checked"] > 1000


def test_fails_closed_on_a_column_without_policy(snapshot, sample_root):
    policy = AnonymizeConfig().policy
    del policy["email"], policy["note"]
    with pytest.raises(MlpipeError, match="no anonymization policy for column") as err:
        anonymize(snapshot, AnonymizeConfig(policy=policy), SourceConfig(uri=str(sample_root)))
    message = str(err.value)
    assert "email (suggest drop (e-mail-like))" in message and "note (suggest redact_text (free text))" in message
    assert "\n" not in message and "@" not in message  # suggestions come from a scan; no value is shown


def test_residual_scan_stops_a_policy_that_keeps_personal_data(snapshot, sample_root):
    policy = AnonymizeConfig().policy
    policy["note"] = policy["annotator_1"]  # "keep" the free text: the names in it must stop the run
    with pytest.raises(MlpipeError, match=r"note \(raw identifier value of (name|email|phone|subject_id) in some row\)"):
        anonymize(snapshot, AnonymizeConfig(policy=policy), SourceConfig(uri=str(sample_root)))


def test_pseudonyms_are_keyed_and_deterministic():
    from mlpipe.anonymize import pseudonyms

    assert pseudonyms(pd.Series(["MRN-1", "", "MRN-2", "MRN-1"]), b"k1") == [
        pseudonym("MRN-1", b"k1"), "", pseudonym("MRN-2", b"k1"), pseudonym("MRN-1", b"k1"),
    ]
    assert pseudonym("MRN-1", b"k1") == pseudonym("MRN-1", b"k1")
    assert pseudonym("MRN-1", b"k1") != pseudonym("MRN-1", b"k2")
    assert pseudonym("MRN-1", b"k1") != pseudonym("MRN-2", b"k1")
    assert pseudonym("", b"k1") == ""


def test_env_key_wins_and_rotation_changes_every_pseudonym(snapshot, sample_root, monkeypatch):
    source = SourceConfig(uri=str(sample_root))
    monkeypatch.setenv("MLPIPE_PSEUDONYM_KEY", "first-secret")
    a = pd.read_parquet(anonymize(snapshot, AnonymizeConfig(), source).file("items.parquet"))
    again = pd.read_parquet(anonymize(snapshot, AnonymizeConfig(), source).file("items.parquet"))
    monkeypatch.setenv("MLPIPE_PSEUDONYM_KEY", "second-secret")
    b = anonymize(snapshot, AnonymizeConfig(), source)
    assert a["subject_id"].tolist() == again["subject_id"].tolist()
    assert not set(a["subject_id"]) & set(pd.read_parquet(b.file("items.parquet"))["subject_id"])
    assert b.report["key_source"] == "env:MLPIPE_PSEUDONYM_KEY"
    assert "second-secret" not in str(b.report)


def test_local_key_file_is_private_and_reused(snapshot, sample_root, state):
    source = SourceConfig(uri=str(sample_root))
    first = anonymize(snapshot, AnonymizeConfig(), source).report["key_id"]
    key_file = state / "secrets" / "pseudonym.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert anonymize(snapshot, AnonymizeConfig(), source).report["key_id"] == first


def test_images_are_reencoded_under_content_names_without_metadata(state, dataset_copy):
    frame = pd.read_csv(dataset_copy / "manifest.csv", dtype=str, keep_default_na=False)
    target = dataset_copy / frame["image"].iloc[5]
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", frame["name"].iloc[5])
    Image.open(target).save(target, pnginfo=info)
    snapshot = ingest(SourceConfig(uri=str(dataset_copy)), IngestConfig())
    result = anonymize(snapshot, AnonymizeConfig(), SourceConfig(uri=str(dataset_copy)))
    files = sorted((result.file("images")).iterdir())
    assert len(files) == snapshot.report["kept"]
    assert all(len(f.stem) == 16 and all(c in "0123456789abcdef" for c in f.stem) for f in files)
    for path in files:
        with Image.open(path) as img:
            assert not img.text and "exif" not in img.info and "icc_profile" not in img.info
    assert frame["name"].iloc[5].encode() not in b"".join(f.read_bytes() for f in files)


def test_redact_text_catches_row_values_and_patterns():
    text, found = redact_text(
        "Ann Lee (ann@x.org, +1-555-123-4567) born 1980-01-02, card 4111 1111 1111 1111, ip 10.1.2.3, "
        "IBAN DE89370400440532013000, see https://x.org/a",
        ["Ann Lee"],
    )
    for secret in ("Ann Lee", "ann@x.org", "555-123-4567", "1980-01-02", "4111", "10.1.2.3", "DE89", "x.org/a"):
        assert secret not in text, secret
    assert text.startswith("[REDACTED] (<EMAIL_ADDRESS>, <PHONE_NUMBER>)")
    assert found["IDENTIFIER"] == 1 and found["CREDIT_CARD"] == 1 and found["IBAN_CODE"] == 1
    assert redact_text("No remarks.", []) == ("No remarks.", {})  # nothing to find: Presidio is skipped


def test_generalize_date_and_counts_unparseable(state, tmp_path):
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8), i * 50, np.uint8)).save(root / "img" / f"{i}.png")
    pd.DataFrame({"image": ["img/0.png", "img/1.png"], "dob": ["1984-05-12", "not a date"]}).to_csv(
        root / "manifest.csv", index=False
    )
    snapshot = ingest(SourceConfig(uri=str(root)), IngestConfig())
    policy = {"dob": {"action": "generalize_date", "granularity": "month"}}
    result = anonymize(snapshot, AnonymizeConfig(policy=policy), SourceConfig(uri=str(root)))
    assert pd.read_parquet(result.file("items.parquet"))["dob"].tolist() == ["1984-05", ""]
    assert result.report["counts"]["dob.unparseable"] == 1


@pytest.mark.parametrize(
    ("values", "suggestion"),
    [
        (["ann@x.org", "bob@y.com"], "drop (e-mail-like)"),
        (["+1-555-123-4567", "+1 (555) 987-6543"], "drop (phone-like)"),
        (["1980-01-02", "1975-12-31"], "generalize_date (date-like)"),
        (["34", "71.5"], "generalize_number (numeric)"),
        (["Ann Lee", "Bob Stone"], "drop (name-like)"),
        (["called back about the scan today", "no answer from the ward yet"], "redact_text (free text)"),
    ],
)
def test_undeclared_columns_get_a_suggested_policy(values, suggestion):
    from mlpipe.anonymize import suggest_policy

    assert suggest_policy(pd.Series(values)) == suggestion


def test_a_policy_for_a_missing_column_is_an_error(snapshot, sample_root):
    policy = {**AnonymizeConfig().policy, "emial": AnonymizeConfig().policy["email"]}
    with pytest.raises(MlpipeError, match="anonymize.policy names column\\(s\\) not in the manifest: emial"):
        anonymize(snapshot, AnonymizeConfig(policy=policy), SourceConfig(uri=str(sample_root)))


def test_generalize_number_truncate_and_k_anonymity(state, tmp_path):
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    rows = []
    ages = [23, 25, 27, 29, 31, 45, 47, 46, 44, 41, 88]
    for i, age in enumerate(ages):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "age": str(age), "zip": f"9021{i % 10}", "grade": "a"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    source = SourceConfig(uri=str(root))
    policy = {
        "age": {"action": "generalize_number", "bins": [0, 40, 60, 120], "quasi_identifier": True},
        "zip": {"action": "truncate", "keep_chars": 3, "quasi_identifier": True},
        "grade": "keep",
    }
    snapshot = ingest(source, IngestConfig())
    result = anonymize(snapshot, AnonymizeConfig(policy=policy, k=5, suppression="records"), source)
    out = pd.read_parquet(result.file("items.parquet"))
    assert sorted(set(out["age"])) == ["[0, 40)", "[40, 60)"]  # the lone 88 is suppressed, with its row
    assert set(out["zip"]) == {"902"}
    assert result.report["rows_suppressed"] == 1 and result.report["k_achieved"] == 5
    assert result.report["rows"] == 10 and result.report["quasi_identifiers"] == ["age", "zip"]

    # The default, cell suppression: every row (image, label) stays; only rare quasi-identifier cells become "*".
    result = anonymize(snapshot, AnonymizeConfig(policy=policy, k=5), source)
    out = pd.read_parquet(result.file("items.parquet"))
    assert result.report["rows"] == 11 and result.report["rows_suppressed"] == 0 and result.report["k_achieved"] >= 5
    assert (out["age"] == "*").any() and "[60, 120)" not in set(out["age"])
    assert out.groupby(["age", "zip"]).size().min() >= 5
    assert result.report["suppression"]["cells_suppressed_total"] == int((out[["age", "zip"]] == "*").sum().sum())


def test_identifier_values_of_any_row_are_redacted_from_free_text():
    from mlpipe.anonymize import identifier_index

    index = identifier_index(["Ann Lee", "Bob Stone", "MRN-0012345"])
    text, found = redact_text("Bob Stone asked about Ann Lee (MRN-0012345).", index)
    assert text == "[REDACTED] asked about [REDACTED] ([REDACTED])." and found["IDENTIFIER"] == 3


def test_a_typo_in_a_policy_kind_is_a_config_error():
    from mlpipe.config import load_config

    with pytest.raises(MlpipeError, match="anonymize.policy.zip.action"):
        load_config(None, ["anonymize.policy.zip={action: trunc}"])
