"""The review round trip through a real Label Studio (the version `make test` installs into
.venv-labelstudio, apart from mlpipe's own dependencies): a project made from the label stage's
labeling_config.xml, its review_tasks.json imported as the README says, images and
pre-annotations checked as Label Studio holds them, reviews submitted through the API, the JSON
and JSON-MIN exports read back, and a label-stage rerun with `label.reviewed` taking the reviews."""

from __future__ import annotations

import json
import os
import secrets

import pandas as pd
import pytest
import requests

from mlpipe.anonymize import anonymize
from mlpipe.config import AnonymizeConfig, IngestConfig, LabelConfig, SourceConfig
from mlpipe.ingest import ingest
from mlpipe.label import label, read_label_studio
from tests.servers import ROOT, free_port, start, stop, wait_for

pytestmark = pytest.mark.slow
LABEL_STUDIO = ROOT / ".venv-labelstudio" / "bin" / "label-studio"


@pytest.fixture
def label_studio(tmp_path):
    """(base URL, a requests session holding the admin's API token) of a fresh Label Studio on 127.0.0.1."""
    if not LABEL_STUDIO.is_file():
        missing = f"Label Studio is not installed at {LABEL_STUDIO.relative_to(ROOT)} (`make test` installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    base, port, token = tmp_path / "label-studio", free_port(), secrets.token_hex(20)
    base.mkdir()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(base), "COLLECT_ANALYTICS": "false",
           "LATEST_VERSION_CHECK": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}  # nothing leaves the machine
    log = base / "server.log"
    proc = start([str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                  "--username", "reviewer@example.invalid", "--password", secrets.token_hex(12),
                  "--user-token", token, "--enable-legacy-api-token"], log, env, cwd=base)  # fmt: skip
    session = requests.Session()
    session.headers["Authorization"] = f"Token {token}"
    url = f"http://127.0.0.1:{port}"
    yield url, session, lambda: wait_for(f"{url}/health", "label-studio", proc, log, timeout_s=240)
    stop(proc)


def test_review_tasks_round_trip_through_label_studio(label_studio, state, sample_root, tmp_path):
    url, api, ready = label_studio  # the server starts (migrations, ~40 s) while the label stage runs
    source = SourceConfig(uri=str(sample_root), layout="manifest")
    dataset = anonymize(ingest(source, IngestConfig(image_size=16, channels=1)), AnonymizeConfig(), source)
    first = label(dataset, LabelConfig())
    ours = {t["data"]["item_id"]: t for t in json.loads(first.file("review_tasks.json").read_text())}
    classes = list(json.loads(first.file("label_map.json").read_text()))
    assert len(ours) > 8 and first.report["review_predictions"]["items"] == len(ours)
    ready()

    # Project settings -> Labeling Interface: mlpipe's config, parsed by Label Studio into its classes.
    made = api.post(f"{url}/api/projects", json={"title": "mlpipe review",
                                                 "label_config": first.file("labeling_config.xml").read_text()})
    assert made.status_code == 201, made.text[:500]
    project = made.json()
    control = project["parsed_label_config"]["label"]
    assert (control["type"], control["to_name"], control["labels"]) == ("Choices", ["image"], classes)

    # Import: review_tasks.json uploaded as a file, as in the UI.
    with first.file("review_tasks.json").open("rb") as upload:
        imported = api.post(f"{url}/api/projects/{project['id']}/import", files={"file": upload})
    assert imported.status_code == 201, imported.text[:500]
    assert (imported.json()["task_count"], imported.json()["prediction_count"]) == (len(ours), len(ours))
    held = api.get(f"{url}/api/tasks", params={"project": project["id"], "page_size": 1000}).json()["tasks"]
    assert sorted(t["data"]["item_id"] for t in held) == sorted(ours)
    predictions = {p["task"]: p for p in api.get(f"{url}/api/predictions", params={"project": project["id"]}).json()}
    for task in held:
        mine = ours[task["data"]["item_id"]]
        assert task["data"]["image"].startswith("data:image/png;base64,")
        assert task["data"]["image"] == mine["data"]["image"]  # stored as sent: no file server, no storage needed
        assert predictions[task["id"]]["result"] == mine["predictions"][0]["result"]
        assert predictions[task["id"]]["model_version"] == first.report["review_predictions"]["model_version"]

    # Reviews: most tasks get a label (the suggestion on some, another class on others), one is
    # skipped (a cancelled annotation), one is left alone. Predictions alone are not reviews.
    answers, skipped, untouched = {}, held[0], held[1]
    for i, task in enumerate(held[2:]):
        suggested = ours[task["data"]["item_id"]]["predictions"][0]["result"][0]["value"]["choices"][0]
        other = classes[(classes.index(suggested) + 1) % len(classes)]
        answers[task["data"]["item_id"]] = suggested if i % 2 else other
    for task in held[2:]:
        result = [{"from_name": "label", "to_name": "image", "type": "choices",
                   "value": {"choices": [answers[task["data"]["item_id"]]]}}]  # fmt: skip
        assert api.post(f"{url}/api/tasks/{task['id']}/annotations", json={"result": result}).status_code == 201
    cancelled = api.post(f"{url}/api/tasks/{skipped['id']}/annotations", json={"result": [], "was_cancelled": True})
    assert cancelled.status_code == 201, cancelled.text[:300]

    exports = {}
    for kind in ("JSON", "JSON_MIN"):
        response = api.get(f"{url}/api/projects/{project['id']}/export", params={"exportType": kind,
                                                                                  "download_all_tasks": "true"})
        assert response.status_code == 200, response.text[:300]
        exports[kind] = tmp_path / f"export-{kind}.json"
        exports[kind].write_bytes(response.content)
        back = read_label_studio(exports[kind])
        back = dict(zip(back["item_id"], back["label"], strict=True))
        assert {item: lab for item, lab in back.items() if lab} == answers, kind
        assert not back.get(skipped["data"]["item_id"]) and not back.get(untouched["data"]["item_id"])

    # The export goes back in through label.reviewed: the reviewed items leave the queue with their labels.
    second = label(dataset, LabelConfig(find_label_issues=False, reviewed=str(exports["JSON"])))
    assert second.report["reviewed"] == len(answers)
    assert second.report["labelled"] == first.report["labelled"] + len(answers)
    items = pd.read_parquet(second.file("items.parquet")).set_index("item_id")
    assert {item: items.at[item, "label"] for item in answers} == answers
    queue = set(pd.read_csv(second.file("review_queue.csv"))["item_id"])
    assert queue == set(ours) - set(answers)
