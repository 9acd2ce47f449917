"""The privacy canary scan (anonymization issue), shared by every test that checks outputs for
personal data: canary values planted in every field kind of the embedded sample, and a scanner
for the files, records and objects a run writes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

CANARIES = {
    "exif": "CANARYARTISTQZ",
    "gps": "CANARYGPSAREAQZ",
    "png_text": "CANARYPNGTEXTQZ",
    "file_name": "CANARYFILEQZ",
    "name": "Canary Qzname",
    "email": "canary.qz@example.org",
    "phone": "+1-555-867-5309",
    "note_ssn": "219-09-9999",
}


def plant_canaries(root: Path) -> Path:
    """Canary values in every field kind of the sample at `root`: EXIF Artist and GPS, a PNG text
    chunk, a file name, the personal columns and the free-text note."""
    from PIL import Image, PngImagePlugin

    manifest = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    for i in range(10, 16):
        source = root / manifest.at[i, "image"]
        target = source.with_name(f"{CANARIES['file_name']}_{i}.png")
        img = Image.open(source)
        exif = Image.Exif()
        exif[0x013B] = CANARIES["exif"]  # Artist
        exif.get_ifd(0x8825)[0x001C] = CANARIES["gps"]  # GPSAreaInformation
        text = PngImagePlugin.PngInfo()
        text.add_text("Comment", CANARIES["png_text"])
        img.save(target, exif=exif, pnginfo=text)
        source.unlink()
        manifest.loc[i, ["image", "name", "email", "phone"]] = [
            target.relative_to(root).as_posix(),
            CANARIES["name"],
            CANARIES["email"],
            CANARIES["phone"],
        ]
        manifest.at[i, "note"] = (
            f"{CANARIES['name']} ({CANARIES['email']}), SSN {CANARIES['note_ssn']}, call {CANARIES['phone']}"
        )
    manifest.to_csv(root / "manifest.csv", index=False)
    return root


def canaries_in(text: str) -> set[str]:
    return {kind for kind, value in CANARIES.items() if value in text}


def scan(files: Iterable[Path]) -> list[tuple[str, str]]:
    """(file, canary kind) for every canary in a file's bytes or its name."""
    return [(str(p), kind) for p in files for kind in canaries_in(p.read_bytes().decode("latin-1") + "\n" + p.name)]


def files_under(*places: Path, besides: Iterable[Path] = ()) -> list[Path]:
    """Every file under `places` (a place may be a file), except under the folders `besides`
    (the planted data itself)."""
    skip = [Path(b) for b in besides]
    return [f for place in places for f in ([place] if place.is_file() else place.rglob("*"))
            if f.is_file() and not any(b == f or b in f.parents for b in skip)]  # fmt: skip
