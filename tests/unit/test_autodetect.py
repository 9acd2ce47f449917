"""Issue 19, item 5: auto values decided from the data (layout, channels, image size, the grid and
the imagefolder defaults), once, by `mlpipe.ingest.resolve_config` / `mlpipe.config.resolve_auto`."""

import numpy as np
import pytest
from PIL import Image

from mlpipe.config import (
    SAMPLE_GRID,
    USER_GRID,
    DataFacts,
    PipelineConfig,
    SourceConfig,
    auto_image_size,
    load_config,
    resolve_auto,
)  # fmt: skip
from mlpipe.errors import MlpipeError
from mlpipe.ingest import detect, ingest, resolve_config, sample_rows


def _folder(root, sizes, mode="RGB", per_class=4, classes=("cat", "dog")):
    """root/<class>/<i>.png, image i of a class at sizes[i % len(sizes)] (width, height); RGB images
    are coloured noise, L images gray noise."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")
    return root


def _config(root, *sets):
    return load_config(None, [f"source.uri={root}", *sets])


def test_rgb_folder_of_differing_sizes_decides_imagefolder_3_channels_and_the_median_side(state, tmp_path):
    root = _folder(tmp_path / "rgb", [(24, 20), (40, 30), (30, 60)], per_class=5)  # longer sides 24, 40, 60
    resolved, decided, detection = resolve_config(_config(root))
    # sides per class: 24 40 60 24 40 -> over both classes the median of [24,24,24,24,40,40,40,40,60,60] is 40
    assert detection.facts() == DataFacts(layout="imagefolder", channels=3, median_side=40)
    assert decided == {
        "source.layout": "imagefolder", "ingest.channels": 3, "ingest.image_size": 40, "search.grid": USER_GRID,
        "label.columns": ["class"], "anonymize.policy": {}, "split.group_column": None,
    }  # fmt: skip
    assert (resolved.source.layout, resolved.ingest.channels, resolved.ingest.image_size) == ("imagefolder", 3, 40)
    assert resolved.label.columns == ["class"] and resolved.anonymize.policy == {} and resolved.split.group_column is None
    assert resolve_config(resolved)[1] == {}  # decided once: nothing auto is left


def test_grayscale_folder_decides_1_channel_and_a_small_image_is_raised_to_16(state, tmp_path):
    root = _folder(tmp_path / "gray", [(10, 8), (12, 6)], mode="L")
    facts = resolve_config(_config(root))[2].facts()
    assert (facts.channels, facts.median_side) == (1, 11)  # median of 10, 10, 12, 12, ... is 11
    assert resolve_config(_config(root))[0].ingest.image_size == 16  # AUTO_SIZE_RANGE's floor


def test_gray_pixels_in_an_rgb_file_count_as_grayscale_and_one_colour_image_makes_it_rgb(state, tmp_path):
    root = _folder(tmp_path / "g", [(20, 20)], mode="L")
    for path in root.rglob("*.png"):  # the same gray content, saved as RGB (as many exports do)
        Image.open(path).convert("RGB").save(path)
    assert resolve_config(_config(root))[0].ingest.channels == 1
    Image.fromarray(np.dstack([np.full((20, 20), 200, np.uint8), np.zeros((20, 20, 2), np.uint8)])).save(root / "cat" / "0.png")
    assert resolve_config(_config(root))[0].ingest.channels == 3


def test_a_large_image_is_clamped_and_an_architecture_raises_the_size(state, tmp_path):
    root = _folder(tmp_path / "big", [(600, 400)], per_class=2)
    assert resolve_config(_config(root))[0].ingest.image_size == 128  # AUTO_SIZE_RANGE's ceiling
    assert auto_image_size(8, ["small_cnn"], 3) == 16
    assert auto_image_size(16, ["convnext_tiny"], 3) == 32  # convnext_tiny needs 32 (tests/unit/test_config_compat.py)


def test_explicit_values_are_kept_and_the_sample_decides_as_before(state, tmp_path):
    root = _folder(tmp_path / "rgb", [(24, 20)])
    sets = ["source.layout=imagefolder", "ingest.channels=1", "ingest.image_size=20", "search.grid={}",
            "label.columns=[class]", "split.group_column=null", "anonymize.policy={}"]  # fmt: skip
    resolved, decided, detection = resolve_config(_config(root, *sets))
    assert decided == {} and detection is None  # nothing auto: the data is not even read
    assert (resolved.ingest.channels, resolved.ingest.image_size) == (1, 20)
    sample, decided, _ = resolve_config(PipelineConfig())
    assert decided == {"source.layout": "manifest", "ingest.channels": 1, "ingest.image_size": 16, "search.grid": SAMPLE_GRID}
    assert sample.label.columns == ["annotator_1", "annotator_2", "annotator_3"] and sample.split.group_column == "subject_id"


def test_auto_is_probed_once_decided_a_colour_only_transform_on_gray_data_is_refused(state, tmp_path):
    root = _folder(tmp_path / "gray", [(20, 20)], mode="L")
    flare = {"transform": {"__class_fullname__": "Compose", "p": 1.0,
                           "transforms": [{"__class_fullname__": "RandomSunFlare", "p": 0.3}]}}  # fmt: skip
    config = _config(root).with_overrides({"train.augment": flare})  # channels auto: accepted until decided
    with pytest.raises(MlpipeError, match="RandomSunFlare needs 3 channels; ingest.channels is 1"):
        resolve_config(config)
    with pytest.raises(ValueError, match="needs the data's facts"):
        resolve_auto(config, None)


def test_a_folder_that_is_neither_layout_is_one_line(state, tmp_path):
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat" / "a.png")  # no class folder, no manifest
    (tmp_path / "flat" / "labels.parquet").write_bytes(b"")
    with pytest.raises(MlpipeError) as err:
        resolve_config(_config(tmp_path / "flat"))
    assert "manifest not found: manifest.csv" in str(err.value) and "labels.parquet: set source.manifest" in str(err.value)


def test_the_sample_is_the_same_rows_every_time_and_spread_over_the_source():
    assert sample_rows(1000, 32) == sample_rows(1000, 32) and sample_rows(1000, 32)[0] == 0 and sample_rows(1000, 32)[-1] == 999
    assert len(sample_rows(1000, 32)) == 32 and sample_rows(5, 32) == [0, 1, 2, 3, 4] and sample_rows(0) == []


def test_unreadable_sampled_images_are_named_by_row_not_path_and_left_out_of_the_facts(state, tmp_path):
    root = _folder(tmp_path / "rgb", [(24, 20)])
    (root / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a PNG signature, no image
    detection = detect(SourceConfig(uri=str(root)), decode_all=True)
    summary = detection.summary()
    assert summary["unreadable"] == {"row 0": "not an image"}  # ingest's reason for the same bytes
    assert "0.png" not in str(summary) and detection.facts().median_side == 24


def test_ingest_reports_what_it_detected_and_decides_auto_left_to_it(state, tmp_path):
    root = _folder(tmp_path / "rgb", [(24, 20)])
    result = ingest(SourceConfig(uri=str(root)), PipelineConfig().ingest)  # library use: auto decided here
    assert result.report["image_shape"] == [24, 24, 3]
    assert result.report["detected"]["layout"] == "imagefolder" and result.report["detected"]["channels"] == 3
    assert result.report["detected"]["sizes"] == {"24x20": 8}


def test_anonymize_keeps_the_class_folder_without_a_policy_and_a_manifest_class_column_still_needs_one(state, tmp_path):
    from mlpipe.anonymize import anonymize
    from mlpipe.config import AnonymizeConfig

    root = _folder(tmp_path / "rgb", [(24, 20)])
    source = SourceConfig(uri=str(root))  # layout auto: imagefolder
    result = anonymize(ingest(source, PipelineConfig().ingest), AnonymizeConfig(policy={}), source)
    assert result.report["policy"] == {"class": {"action": "keep", "granularity": "year", "bins": None,
                                                 "keep_chars": None, "quasi_identifier": False}}  # fmt: skip
    (tmp_path / "m" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m" / "images" / "a.png")
    (tmp_path / "m" / "manifest.csv").write_text("image,class\nimages/a.png,x\n")
    manifest = SourceConfig(uri=str(tmp_path / "m"))  # layout auto: manifest, whose columns all need a policy
    with pytest.raises(MlpipeError, match="no anonymization policy for column"):
        anonymize(ingest(manifest, PipelineConfig().ingest), AnonymizeConfig(policy={}), manifest)


def test_scoring_reads_a_manifest_unless_told_otherwise():
    from mlpipe.config import ScoringConfig

    assert ScoringConfig().source.layout == "manifest" and ScoringConfig(source={"uri": "x"}).source.layout == "manifest"
    assert ScoringConfig(source={"uri": "x", "layout": "imagefolder"}).source.layout == "imagefolder"
