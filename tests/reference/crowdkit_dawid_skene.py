"""Regenerates tests/unit/data/dawid_skene_crowdkit.json: crowd-kit's Dawid-Skene answers on a
seeded random case, which `mlpipe.label.dawid_skene` is held to.

crowd-kit is not a dependency (it pulls in transformers and nltk); run this in a scratch venv:
    python3.11 -m venv /tmp/ck && /tmp/ck/bin/pip install crowd-kit==1.4.2
    /tmp/ck/bin/python tests/reference/crowdkit_dawid_skene.py > tests/unit/data/dawid_skene_crowdkit.json
"""

import json

import numpy as np
import pandas as pd
from crowdkit.aggregation import DawidSkene

rng = np.random.default_rng(1)
n_items, n_annotators, n_classes = 40, 5, 3
truth = rng.integers(0, n_classes, n_items)
accuracy = rng.uniform(0.3, 0.95, n_annotators)
votes = np.full((n_items, n_annotators), -1)
for i in range(n_items):
    for a in range(n_annotators):
        if rng.random() < 0.8:
            votes[i, a] = truth[i] if rng.random() < accuracy[a] else rng.integers(0, n_classes)
rows = [(i, a, int(votes[i, a])) for i in range(n_items) for a in range(n_annotators) if votes[i, a] >= 0]
model = DawidSkene(n_iter=100, tol=1e-5).fit(pd.DataFrame(rows, columns=["task", "worker", "label"]))
probas = model.probas_.sort_index()[sorted(model.probas_.columns)]
assert probas.index.tolist() == list(range(n_items)) and probas.columns.tolist() == list(range(n_classes))
print(json.dumps({"crowd_kit": "1.4.2", "votes": votes.tolist(), "probas": probas.round(12).values.tolist(),
                  "labels": model.labels_.sort_index().tolist()}))
