"""DICOM ingest + anonymize against a bare pydicom loop, on CT-sized slices.

    .venv/bin/python benchmarks/dicom.py [--slices 2000] [--ocr 20]

Data (written once into a temp dir, not timed): `slices` CT slices, 512 x 512, 16-bit signed,
MONOCHROME2, Explicit VR Little Endian (uncompressed), each a copy of the header of a real test
file, pydicom's own CT_small.dcm (found in its wheel's data folder, no network), with Rows and
Columns 512, a new SOP Instance UID (and Media Storage SOP Instance UID) per slice, a patient per
20 slices (Patient's Name, Patient ID and Birth Date distinct per patient; one study, series and
frame of reference per patient; Study Date), Instance Number and Slice Location. Pixels: a
synthetic CT-like slice in Hounsfield units (air -1000, a body ellipse of soft tissue ~40 HU with
a fat rim, lungs ~-800 sized by the slice's place in the chest, spine and ribs ~700, a heart, at
times arms, the table, liver and stomach gas, a few lesions, noise of 12-25 HU), its geometry
drawn per slice so that no two slices are equal and hardly any are perceptual near-duplicates
(the count is reported), stored as HU + 1024 (Rescale Intercept -1024, Slope 1). An ImageFolder,
root/<class>/ct_NNNNN.dcm with two classes (by patient), so ingest needs no manifest.

Anchor (in the same command, after the same page-cache warm-up): the bare loop a user would
write, in one thread: for each file `ds = pydicom.dcmread(path); a = ds.pixel_array`. Each side
runs once untimed first (the loop on 20 of the slices; the stages on 20 slices of their own, a
separate folder, so nothing of it is reused): first-use costs (imports) are neither's.
Measured, from an empty state directory (no snapshot to reuse):
`ingest(SourceConfig(uri=root), IngestConfig(image_size=128, channels=1))` then
`anonymize(snapshot, AnonymizeConfig(policy={}, text_scan="never"), source)`: header columns
under the PS3.15 Basic Profile, residual scan, header-only burned-in check, PNG re-encoding.
Per stage: exclusive seconds of the main steps of each (listing and header reading, detect,
path checks, decoding on the worker pool, the snapshot; reading the rows again, the policy, the
residual scan, the burned-in check, the PNGs), timed by wrapping those library functions, each
under the stage that ran it (anonymize reads the listing and headers again, from a cache).
OCR (burned-in text, text_scan "always"; tesseract) is a separate cost: measured on `ocr`
slices of their own (anonymize with "always" minus anonymize with "never" on the same
snapshot), reported per image, after OCR's one-off start-up (Presidio's import, reported
apart); null when tesseract is not installed.

Also measured, for scale: `one_pass_floor`, the per-file work both stages must do with
nothing else around it (each file parsed once, header columns, window, resize, hashes, a PNG), on
the same number of processes; `floor_ratio` = anchor / floor is the most any implementation of
the two stages could reach on this machine.

Every slice must be kept by both stages (asserted). Ends with one JSON line;
ratio = anchor seconds / (ingest + anonymize seconds) (goal >= 0.7).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from _state import fresh_state

SIDE = 512
SLICES_PER_PATIENT = 20
CLASSES = ("normal", "abnormal")
FIRST = ["Anna", "Ben", "Clara", "David", "Eva", "Felix", "Greta", "Hugo", "Ida", "Jonas", "Karla", "Lukas"]
LAST = ["Meyer", "Novak", "Olsen", "Petrov", "Quinn", "Rossi", "Schmidt", "Tanaka", "Ulrich", "Varga", "Weber"]


def template_path() -> Path:
    """CT_small.dcm from pydicom's wheel (its data folder, globbed: get_testdata_file may go online)."""
    import pydicom

    found = sorted(Path(pydicom.__file__).parent.joinpath("data").glob("**/CT_small.dcm"))
    if not found:
        sys.exit("pydicom's data folder has no CT_small.dcm")
    return found[0]


def ct_slice(rng: np.random.Generator, z: float) -> np.ndarray:
    """A CT-like axial slice in HU (float32, SIDE x SIDE); `z` in 0..1 is the position in the chest."""
    hu = np.full((SIDE, SIDE), -1000.0, dtype=np.float32)

    def fill(cx, cy, a, b, value, angle=0.0):  # an ellipse, computed within its bounding box only
        r = max(a, b)
        y0, y1, x0, x1 = (max(int(v), 0) for v in (cy - r, cy + r + 2, cx - r, cx + r + 2))
        yy, xx = np.ogrid[y0 : min(y1, SIDE), x0 : min(x1, SIDE)]
        c, s = np.cos(angle), np.sin(angle)
        u, v = (xx - cx) * c + (yy - cy) * s, (yy - cy) * c - (xx - cx) * s
        hu[y0:y1, x0:x1][(u / a) ** 2 + (v / b) ** 2 < 1.0] = value

    cx, cy = SIDE / 2 + rng.uniform(-45, 45), SIDE / 2 + rng.uniform(-35, 35)
    a, b = rng.uniform(150, 235), rng.uniform(105, 180)
    tilt = rng.uniform(-0.45, 0.45)
    if rng.random() < 0.7:  # the table under the patient
        top = cy + b + rng.uniform(4, 30)
        hu[int(min(top, SIDE - 1)) : int(min(top + rng.uniform(6, 14), SIDE)), :] = rng.uniform(-200, 200)
    for side in (-1, 1):  # arms beside the body, or raised out of the field
        if rng.random() < 0.5:
            ax, ay = cx + side * (a + rng.uniform(15, 45)), cy + rng.uniform(-60, 60)
            fill(ax, ay, rng.uniform(28, 45), rng.uniform(35, 60), 40.0, rng.uniform(-0.5, 0.5))
            fill(ax, ay, rng.uniform(8, 14), rng.uniform(8, 14), 700.0)  # humerus
    fill(cx, cy, a, b, -100.0, tilt)  # fat rim
    fill(cx, cy, a - rng.uniform(8, 25), b - rng.uniform(8, 25), 40.0, tilt)  # soft tissue
    lung = 0.25 + 0.7 * np.sin(np.pi * z)  # lungs grow, then shrink, down the chest
    for side in (-1, 1):
        size = lung * rng.uniform(0.5, 1.15)
        fill(cx + side * a * rng.uniform(0.3, 0.55), cy - b * rng.uniform(-0.1, 0.25), a * 0.32 * size, b * 0.62 * size,
             -800.0, tilt + side * rng.uniform(-0.2, 0.5))  # fmt: skip
    fill(cx + rng.uniform(-50, 50), cy + rng.uniform(-20, 35), rng.uniform(30, 85), rng.uniform(25, 65), 45.0)  # heart
    if rng.random() < 0.5:  # liver, and gas in the stomach
        fill(cx - a * rng.uniform(0.2, 0.5), cy + rng.uniform(-20, 40), rng.uniform(50, 110), rng.uniform(40, 80), 60.0)
        fill(cx + a * rng.uniform(0.2, 0.5), cy + rng.uniform(-40, 20), rng.uniform(15, 45), rng.uniform(10, 35), -900.0)
    fill(cx, cy + b * 0.72, rng.uniform(18, 30), rng.uniform(16, 26), 700.0)  # vertebra
    fill(cx, cy + b * 0.72, rng.uniform(6, 10), rng.uniform(6, 10), 30.0)  # spinal canal
    for angle in rng.uniform(0, 2 * np.pi, rng.integers(6, 14)):  # ribs on the rim
        fill(cx + np.cos(angle) * (a - 22), cy + np.sin(angle) * (b - 20), rng.uniform(6, 12), rng.uniform(4, 8),
             700.0, angle)  # fmt: skip
    for _ in range(rng.integers(1, 5)):  # lesions anywhere in the body
        fill(cx + rng.uniform(-0.6, 0.6) * a, cy + rng.uniform(-0.6, 0.6) * b, rng.uniform(5, 25), rng.uniform(5, 25),
             rng.uniform(-50, 200))  # fmt: skip
    hu += rng.standard_normal((SIDE, SIDE), dtype=np.float32) * np.float32(rng.uniform(12, 25))
    return hu


def make_dataset(root: Path, slices: int, seed: int) -> list[Path]:
    """`slices` DICOM files (see the module docstring) under root/<class>/; their paths, sorted."""
    import pydicom
    from pydicom.uid import generate_uid

    template = template_path().read_bytes()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(slices):
        patient, number = divmod(i, SLICES_PER_PATIENT)
        if number == 0:
            p = np.random.default_rng([seed, patient])
            person = {
                "PatientName": f"{LAST[patient % len(LAST)]}^{FIRST[(patient // len(LAST)) % len(FIRST)]}^{patient:04d}",
                "PatientID": f"PID{seed:02d}{patient:05d}",
                "PatientBirthDate": f"{p.integers(1935, 2005)}{p.integers(1, 13):02d}{p.integers(1, 29):02d}",
                "StudyDate": f"{p.integers(2015, 2025)}{p.integers(1, 13):02d}{p.integers(1, 29):02d}",
                "StudyInstanceUID": generate_uid(entropy_srcs=[f"study {seed} {patient}"]),
                "SeriesInstanceUID": generate_uid(entropy_srcs=[f"series {seed} {patient}"]),
                "FrameOfReferenceUID": generate_uid(entropy_srcs=[f"frame {seed} {patient}"]),
            }
        ds = pydicom.dcmread(io.BytesIO(template))  # a fresh copy of the real header
        for keyword, value in person.items():
            setattr(ds, keyword, value)
        ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = person["StudyDate"]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"sop {seed} {i}"])
        ds.InstanceNumber = number + 1
        ds.SliceLocation = f"{-5.0 * number:.1f}"
        ds.Rows = ds.Columns = SIDE
        hu = ct_slice(rng, number / (SLICES_PER_PATIENT - 1))
        ds.PixelData = np.clip(np.rint(hu + 1024.0), -2000, 3071).astype("<i2").tobytes()  # stored = HU - intercept
        path = root / CLASSES[patient % 2] / f"ct_{i:05d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)


def bare_loop(paths: list[Path]) -> float:
    import pydicom

    started = time.perf_counter()
    for path in paths:
        ds = pydicom.dcmread(path)
        a = ds.pixel_array  # noqa: F841 - decoding is the point
    return time.perf_counter() - started


def _floor_chunk(paths: list[Path]) -> int:
    """`one_pass_floor`'s work on some files, in a worker process."""
    from PIL import Image

    from mlpipe import dicom, images

    pydicom = dicom._pydicom()
    for path in paths:
        data = path.read_bytes()
        fp = io.BytesIO(data)
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        dicom.header_of(ds)
        array, mode = dicom.decode_dicom(data, 0, "header", 1 << 40, dicom._pixel_module(ds, fp))
        small = images._to_training_size(Image.fromarray(array, "L"), 128, mode)
        Image.fromarray(small.pixels[:, :, 0]).save(io.BytesIO(), "PNG", compress_level=1)
    return len(paths)


def one_pass_floor(paths: list[Path]) -> float:
    """Seconds for the per-file work both stages must do, with nothing else: each file read and
    parsed once, its header columns, its pixels through the window to 128 px with the content hash
    and thumbnail, a PNG encoded; on as many forked processes as ingest uses, in chunks of 64. No
    manifest, validation, snapshot, policy or files written: what this machine allows at best."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from mlpipe import dicom

    dicom.preload()
    started = time.perf_counter()
    with ProcessPoolExecutor(min(8, os.cpu_count() or 1), mp_context=multiprocessing.get_context("fork")) as pool:
        assert sum(pool.map(_floor_chunk, [paths[i : i + 64] for i in range(0, len(paths), 64)])) == len(paths)
    return time.perf_counter() - started


class StageClock:
    """Exclusive seconds per wrapped library function (time in a wrapped callee is the callee's)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []

    def wrap(self, module, attribute: str, name: str) -> None:
        original = getattr(module, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self._stack.append([0.0])
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                took = time.perf_counter() - started
                children = self._stack.pop()[0]
                self.seconds[name] += took - children
                if self._stack:
                    self._stack[-1][0] += took

        setattr(module, attribute, timed)

    def take(self) -> dict[str, float]:
        """The seconds per stage since the last take; then reset."""
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        self.seconds.clear()
        return out


def instrument() -> StageClock:
    import mlpipe.anonymize as anonymize_module
    import mlpipe.ingest as ingest_module

    clock = StageClock()
    for module, attribute, name in (
        (ingest_module, "read_manifest", "listing_and_headers"),
        (ingest_module, "detect", "detect"),
        (ingest_module, "validate_manifest", "validate"),
        (ingest_module, "_check_paths", "check_paths"),
        (ingest_module, "_decode_all", "decode"),
        (ingest_module, "_snapshot", "snapshot"),
        (anonymize_module, "snapshot_rows", "rows_again"),
        (anonymize_module, "apply_policy", "policy"),
        (anonymize_module, "residual_scan", "residual_scan"),
        (anonymize_module, "burned_in", "burned_in"),
        (anonymize_module, "write_clean_images", "write_pngs"),
    ):  # fmt: skip
        clock.wrap(module, attribute, name)
    return clock


def run_stages(root: Path, text_scan: str, snapshot=None, max_drop_fraction: float = 0.2,
               clock: StageClock | None = None):  # fmt: skip
    """(ingest seconds, anonymize seconds, ingest result, anonymize result, {stage: its steps' seconds} from
    `clock`); ingest skipped when `snapshot` is given."""
    from mlpipe.anonymize import anonymize
    from mlpipe.config import AnonymizeConfig, IngestConfig, SourceConfig
    from mlpipe.ingest import ingest

    source = SourceConfig(uri=str(root))
    ingest_s = 0.0
    if snapshot is None:
        started = time.perf_counter()
        snapshot = ingest(source, IngestConfig(image_size=128, channels=1))
        ingest_s = time.perf_counter() - started
    steps = {"ingest": clock.take() if clock else {}}
    config = AnonymizeConfig(policy={}, text_scan=text_scan, max_drop_fraction=max_drop_fraction)
    started = time.perf_counter()
    anonymized = anonymize(snapshot, config, source)
    anonymize_s = time.perf_counter() - started
    steps["anonymize"] = clock.take() if clock else {}
    return ingest_s, anonymize_s, snapshot, anonymized, steps


def ocr_cost(tmp: Path, count: int) -> dict:
    """Seconds per image of the OCR scan (text_scan always - never, same snapshot of `count` slices)."""
    if not shutil.which("tesseract"):
        return {"ocr_s_per_image": None, "ocr_note": "tesseract is not installed: OCR not measured"}
    from mlpipe import burned_in

    started = time.perf_counter()
    assert burned_in.ocr_available(), burned_in._ocr_problem()  # the one-off start-up (Presidio's import)
    startup_s = time.perf_counter() - started
    make_dataset(tmp / "ocr", count, seed=2)
    _, never_s, snapshot, _, _ = run_stages(tmp / "ocr", "never")
    _, always_s, _, scanned, _ = run_stages(tmp / "ocr", "always", snapshot, max_drop_fraction=1.0)
    burned = scanned.report["dicom"]["burned_in"]
    return {"ocr_s_per_image": round((always_s - never_s) / count, 3), "ocr_slices": count,
            "ocr_anonymize_s": round(always_s, 3), "ocr_anonymize_never_s": round(never_s, 3),
            "ocr_startup_s": round(startup_s, 3),
            "ocr_scanned": burned.get("scanned by OCR", 0), "ocr_text_found": burned.get("text found by OCR", 0)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--ocr", type=int, default=20, help="slices for the OCR measurement (0: skip)")
    args = parser.parse_args()
    home = fresh_state("dicom")
    os.environ["MLPIPE_PSEUDONYM_KEY"] = "benchmark-key"  # no key file, no warning
    import mlpipe.anonymize  # noqa: F401 - imports are not the stages' work
    import mlpipe.ingest  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-dicom-data-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        paths = make_dataset(tmp / "ct", args.slices, seed=1)
        files_mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"wrote {len(paths)} slices ({files_mb:.0f} MB) in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        os.sync()  # the written gigabyte reaches the disk now, not through writeback during the timed runs
        for path in paths:  # the page cache, warm for both contenders alike
            path.read_bytes()
        bare_loop(paths[:20])  # pydicom's first-use costs (its decoder plugins) are not the loop's
        anchor = bare_loop(paths)
        print(f"bare pydicom loop: {anchor:.2f}s", file=sys.stderr)
        # Nor are the stages' first-use costs (the imports they make lazily: the profile table, pandera,
        # pyarrow's parquet writer, ~0.5 s): both stages once on 20 slices of their own, untimed.
        make_dataset(tmp / "warm-up", 20, seed=3)
        run_stages(tmp / "warm-up", "never")
        clock = instrument()
        ingest_s, anonymize_s, snapshot, anonymized, per_stage = run_stages(tmp / "ct", "never", clock=clock)
        ingest_report, anonymize_report = snapshot.report, anonymized.report
        assert ingest_report["kept"] == args.slices, {k: ingest_report[k] for k in ("quarantined", "duplicates")}
        assert anonymize_report["rows"] == args.slices, anonymize_report["removed"]
        print(f"ingest {ingest_s:.2f}s, anonymize {anonymize_s:.2f}s", file=sys.stderr)
        _floor_chunk(paths[:20])  # its first-use costs, as for the others
        floor = one_pass_floor(paths)
        print(f"one-pass floor: {floor:.2f}s", file=sys.stderr)
        ocr = ocr_cost(tmp, args.ocr) if args.ocr else {"ocr_s_per_image": None, "ocr_note": "skipped (--ocr 0)"}
    shutil.rmtree(home, ignore_errors=True)
    per_stage["ingest"]["other"] = round(ingest_s - sum(per_stage["ingest"].values()), 3)
    per_stage["anonymize"]["other"] = round(anonymize_s - sum(per_stage["anonymize"].values()), 3)
    ratio = anchor / (ingest_s + anonymize_s)
    print(json.dumps({
        "name": "dicom", "ratio": round(ratio, 3), "goal": ">= 0.7", "slices": args.slices, "side": SIDE,
        "files_mb": round(files_mb, 1), "anchor_s": round(anchor, 3), "ingest_s": round(ingest_s, 3),
        "anonymize_s": round(anonymize_s, 3), "total_s": round(ingest_s + anonymize_s, 3),
        "anchor_slices_per_s": round(args.slices / anchor, 1),
        "pipeline_slices_per_s": round(args.slices / (ingest_s + anonymize_s), 1), "per_stage": per_stage,
        "one_pass_floor_s": round(floor, 3), "floor_ratio": round(anchor / floor, 3),
        "cores": os.cpu_count(), **ocr,
        "kept": ingest_report["kept"], "quarantined": ingest_report["quarantined"],
        "duplicates": ingest_report["duplicates"], "near_duplicate_items": ingest_report["near_duplicate_items"],
        "anonymize_rows": anonymize_report["rows"],
        "anonymize_removed": {k: v for k, v in anonymize_report["removed"].items() if v},
        "header_columns": len(ingest_report["dicom"]["columns"]),
        "policy_sources": anonymize_report["dicom"]["policy_sources"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
