"""burned_in: text burned into image pixels (names, dates, IDs on ultrasound, secondary captures,
some CTs), found by OCR and blacked out.

Pure library: numpy arrays in, boxes or a redacted copy out. The OCR is Presidio's image
redactor 0.0.62 (`presidio_image_redactor.TesseractOCR`: pytesseract driving the `tesseract`
executable, Debian's `tesseract-ocr` with its English data), imported on first use so that
`import mlpipe.burned_in` stays cheap.

What the recognized text says is personal data: it never leaves `_ocr_pass` (a box keeps only
its place, the OCR confidence and a character count) and is never logged. pytesseract hands
the pixels to tesseract through a temporary PNG in the system temporary folder and removes it
after each call.

How text is found. Tesseract reads dark text on a light background; burned-in annotations are
light (white, yellow, cyan) on a dark image. An image whose most common gray value is >= 128 is
taken as dark text on light instead (Presidio's DicomImageRedactorEngine also takes the most
common value as the background). Three renderings go through tesseract's automatic page
segmentation (`--psm 3`), whose layout analysis skips picture texture:

- "bright": pixels whose brightest channel is >= BRIGHT_LEVEL (after the polarity above) as
  black on white: overlay text is drawn near full intensity, most anatomy is not;
- "contrast": Presidio's `ContrastSegmentedImageEnhancer` (bilateral filter, adaptive threshold
  with its polarity from the background, Otsu, and 2x for images under 1 MP): text over image
  content;
- "gray": the grayscale image, inverted to dark on light, upscaled UPSCALE x (bicubic, at most
  to UPSCALE_MAX_SIDE px): the 12-15 px fonts of ultrasound annotations read far better
  upscaled (the name on GREYSCALE_IMAGE.dcm: confidence 11 at 1x, 86-93 at 2x).

Only when one of them found text (the image will be quarantined or redacted anyway) does a
fourth pass look for every remaining word: "gray" again with sparse-text segmentation
(`--psm 11`), which reads annotation columns that the layout analysis took for part of the
picture (GREYSCALE_IMAGE.dcm's "L12-5 36Hz 2D 60% Dyn R 58 ...") but also finds "words" at
confidences up to 77 in the texture of photographs, so it never decides alone whether there is
text. A word counts when tesseract's confidence is >= MIN_CONFIDENCE, it has >= MIN_ALNUM
letters or digits and its box is not wider than MAX_WIDTH_PER_CHAR heights per character. Boxes
of the same word from several passes merge (one covers >= half of the other: the union
rectangle, the highest confidence).

Measured on deid-data 0.0.20 (the three ultrasounds with burned-in text, 14 images without text:
the seven dicom-cookies photographs, the CT drawing, the cat radiograph, synthetic phantom,
gradient, noise, CT-like and ultrasound speckle) plus 28 synthetic cases (text of 11-24 px in
white, gray, yellow, cyan or green drawn on those backgrounds): every personal-data word of the
two still ultrasounds (name, patient ID, birth date, study date and time, institution) is found
by the first three passes, 23 of 28 synthetic cases are, and none of the 14 text-free images
gives those passes a word with >= 2 letters or digits at any confidence. Misses: small or low-contrast text over
bright bone or a photograph's texture, and text touching drawn lines (tesseract's line finding).
Recall is high, not complete: an image where no text is found is not proof of none.

Tried and dropped: the plain image at 1x (lost the name above), Presidio's enhancer alone (lost
the names ZZZ and ZZZDOWNTIME,MARY), `--psm 11` as a detector (false words on textures),
cv2's adaptive threshold (upscaled: false words on three of the photographs even with `--psm 3`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
from dataclasses import dataclass

import numpy as np

from mlpipe.errors import MlpipeError

MIN_CONFIDENCE = 40.0
"""Tesseract word confidence (0-100) at or above which a word counts. Chosen on the files above:
the personal-data words of the ultrasounds read at 73-96 (the best pass for each), the text-free
images give no word at all in the detecting passes, and the synthetic recall is the same from
30 to 50 (24/28 at 20, 25/28 at 0) and falls above (22/28 at 60, 18/28 at 80, 17/28 at 90). 40
keeps 30 points below the weakest name or date read. No threshold separates the sparse-text
pass's false words (up to 77 on the photographs), which is why that pass never decides."""
MIN_ALNUM = 2
"""Letters or digits a word needs to count as text: a lone "R"/"L" laterality marker, the "M" of a
sex field (read at 85 on GREYSCALE_IMAGE.dcm) or a depth-scale tick read as "=" or "-" (at 90)
does not."""
MAX_WIDTH_PER_CHAR = 2.0
"""A box wider than this many box heights per character read is not a word: tesseract stretched
3 characters over 392 x 26 px of the probe's bright bar on GREYSCALE_IMAGE.dcm (5.7 heights per
character); real words on the files above are at most 1.4 (mostly 0.5-1.0)."""
BRIGHT_LEVEL = 200
UPSCALE = 2.0
UPSCALE_MAX_SIDE = 2048
"""The "gray" rendering is upscaled by UPSCALE, capped at this many pixels on the longer side
(images longer than 1365 px get less than 1.5x and are read at their own size)."""
MERGE_COVER = 0.5
OCR_TIMEOUT_S = 300
"""One tesseract call's limit; about 6 s for a 3072 x 2614 radiograph on one core."""
DETECT = "--psm 3"
SPARSE = "--psm 11"
NOT_INSTALLED = "tesseract is not installed: apt-get install tesseract-ocr"


@dataclass(frozen=True)
class TextBox:
    """One word of burned-in text: its rectangle in the pixels of the image given to `find_text`
    (left, top: the top-left corner, x to the right and y down; width, height; all in pixels),
    tesseract's confidence (0-100) and how many characters were read. Never the text itself."""

    left: int
    top: int
    width: int
    height: int
    confidence: float
    n_chars: int

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def bottom(self) -> int:
        return self.top + self.height

    def overlap(self, other: TextBox) -> int:
        """Pixels the two rectangles share (0 when apart)."""
        w = min(self.right, other.right) - max(self.left, other.left)
        h = min(self.bottom, other.bottom) - max(self.top, other.top)
        return w * h if w > 0 and h > 0 else 0


@dataclass(frozen=True)
class TextScan:
    """`scan`'s answer: the boxes found on an image of `shape` (H, W or H, W, C)."""

    shape: tuple[int, ...]
    boxes: tuple[TextBox, ...]

    @property
    def has_text(self) -> bool:
        return bool(self.boxes)

    @property
    def n_boxes(self) -> int:
        return len(self.boxes)

    def summary(self) -> dict:
        """What is safe to log or record: counts and places, no text."""
        return {"has_text": self.has_text, "n_boxes": self.n_boxes, "shape": list(self.shape),
                "boxes": [[b.left, b.top, b.width, b.height] for b in self.boxes]}


def _ocr_problem() -> str | None:
    """Why OCR cannot run here, or None."""
    if shutil.which("tesseract") is None:
        return NOT_INSTALLED
    try:
        import presidio_image_redactor  # noqa: F401
    except ImportError as err:
        return (f"presidio-image-redactor cannot be imported ({err}): pip install --no-deps "
                "presidio-image-redactor==0.0.62 and requirements.lock (make install)")
    return None


@functools.cache
def ocr_available() -> bool:
    """True when the `tesseract` executable is on PATH and `presidio_image_redactor` imports.
    Cached for the process (the first call pays Presidio's import, a few seconds);
    `ocr_available.cache_clear()` forgets the answer."""
    return _ocr_problem() is None


def _require_ocr() -> None:
    if not ocr_available():
        raise MlpipeError(_ocr_problem() or NOT_INSTALLED)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    ):
        raise MlpipeError(f"the burned-in text check needs an H x W or H x W x 3 uint8 array, got "
                          f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise MlpipeError(f"the burned-in text check got an empty image {image.shape}")


def _renderings(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(luma, light luma, light channel), each H x W uint8: the image in gray (PIL's ITU-R 601-2
    luma for RGB); the same with text bright (inverted when the most common gray value is >= 128,
    dark text on light); and the brightest channel (the darkest, inverted, on a light image), in
    which colored overlay text is as bright as white."""
    from PIL import Image

    image = np.ascontiguousarray(image)
    luma = image if image.ndim == 2 else np.asarray(Image.fromarray(image).convert("L"))
    if int(np.bincount(luma.ravel(), minlength=256).argmax()) >= 128:
        return luma, 255 - luma, 255 - (image if image.ndim == 2 else image.min(axis=2))
    return luma, luma, image if image.ndim == 2 else image.max(axis=2)


_omp_lock = threading.Lock()
_omp_users = 0
_omp_set = False


@contextlib.contextmanager
def _one_openmp_thread():
    """OMP_THREAD_LIMIT=1 for the tesseract processes started inside (unless the caller set it).

    Debian's tesseract is built with OpenMP, and on a busy two-core machine its threads made a
    1024 x 768 pass 4x slower (1.6 s against 0.4 s). pytesseract passes this process's
    environment on and takes no other, so the variable is set only while OCR runs and removed
    when the last concurrent OCR call ends."""
    global _omp_users, _omp_set
    with _omp_lock:
        if _omp_users == 0 and "OMP_THREAD_LIMIT" not in os.environ:
            os.environ["OMP_THREAD_LIMIT"] = "1"
            _omp_set = True
        _omp_users += 1
    try:
        yield
    finally:
        with _omp_lock:
            _omp_users -= 1
            if _omp_users == 0 and _omp_set:
                os.environ.pop("OMP_THREAD_LIMIT", None)
                _omp_set = False


def _ocr_pass(picture, scale: float, config: str, min_confidence: float) -> list[TextBox]:
    """Tesseract on `picture` (a PIL image, `scale` times the size of the caller's image); boxes
    in the caller's pixels."""
    import pytesseract
    from presidio_image_redactor import BboxProcessor, ImageAnalyzerEngine, TesseractOCR

    try:
        with _one_openmp_thread():
            ocr = TesseractOCR().perform_ocr(picture, lang="eng", config=config, timeout=OCR_TIMEOUT_S)
    except pytesseract.TesseractNotFoundError:
        raise MlpipeError(NOT_INSTALLED) from None
    except pytesseract.TesseractError as err:
        raise MlpipeError(f"tesseract failed (exit {err.status}): {err.message}") from None
    except RuntimeError as err:
        if "timeout" in str(err).lower():
            raise MlpipeError(f"tesseract took over {OCR_TIMEOUT_S} s on a {picture.height} x {picture.width} "
                              "image") from None
        raise
    ocr = ImageAnalyzerEngine.remove_space_boxes(ocr)
    ocr = ImageAnalyzerEngine.threshold_ocr_result(ocr, min_confidence)
    boxes = []
    for word in BboxProcessor.get_bboxes_from_ocr_results(ocr):
        label = str(word.pop("label"))
        n_alnum, n_chars = sum(ch.isalnum() for ch in label), len(label.strip())
        del label  # the text itself goes no further
        if n_alnum < MIN_ALNUM or int(word["width"]) > MAX_WIDTH_PER_CHAR * int(word["height"]) * n_chars:
            continue
        left, top = int(word["left"]) / scale, int(word["top"]) / scale
        right, bottom = left + int(word["width"]) / scale, top + int(word["height"]) / scale
        x0, y0 = int(np.floor(left)), int(np.floor(top))
        boxes.append(TextBox(x0, y0, int(np.ceil(right)) - x0, int(np.ceil(bottom)) - y0, float(word["conf"]), n_chars))
    return boxes


def _upscale(shape: tuple[int, ...]) -> float:
    up = min(UPSCALE, UPSCALE_MAX_SIDE / max(shape[:2]))
    return up if up >= 1.5 else 1.0


def _merge(boxes: list[TextBox]) -> list[TextBox]:
    """One box per word read by several passes: two boxes of which one covers >= MERGE_COVER of the
    other become their union rectangle with the higher confidence, until no two do. Top to bottom."""
    boxes = sorted(boxes, key=lambda b: (-b.confidence, b.top, b.left))
    merged = True
    while merged:
        merged, kept = False, []
        for box in boxes:
            for i, other in enumerate(kept):
                if box.overlap(other) >= MERGE_COVER * min(box.width * box.height, other.width * other.height):
                    left, top = min(box.left, other.left), min(box.top, other.top)
                    right, bottom = max(box.right, other.right), max(box.bottom, other.bottom)
                    kept[i] = TextBox(left, top, right - left, bottom - top, max(box.confidence, other.confidence),
                                      max(box.n_chars, other.n_chars))
                    merged = True
                    break
            else:
                kept.append(box)
        boxes = kept
    return sorted(boxes, key=lambda b: (b.top, b.left))


def find_text(image: np.ndarray, *, min_confidence: float = MIN_CONFIDENCE) -> list[TextBox]:
    """The words of text burned into `image`, top to bottom.

    image: H x W (grayscale) or H x W x 3 (RGB) uint8 at its native resolution (display values: a
    16-bit DICOM frame is windowed to uint8 before it comes here).
    Returns TextBoxes in `image`'s pixel coordinates, [] when no word reaches `min_confidence`
    (0-100, default MIN_CONFIDENCE) with at least MIN_ALNUM letters or digits. The method, what it
    was measured on and what it misses: the module docstring.
    Raises MlpipeError when tesseract or presidio-image-redactor is not installed, the array is not
    such an image, or tesseract fails or runs over OCR_TIMEOUT_S.
    Time: 3 tesseract passes (one core each), 4 when text is found; on two busy cores 0.7-1.4 s for
    512 x 512 and 1.7-1.9 s for 1024 x 768 (tests/unit/test_burned_in.py's docstring).
    Source: Presidio image redactor 0.0.62's TesseractOCR, ContrastSegmentedImageEnhancer,
    ImageAnalyzerEngine.remove_space_boxes / threshold_ocr_result and
    BboxProcessor.get_bboxes_from_ocr_results.
    """
    _check_image(image)
    if not 0 <= min_confidence <= 100:
        raise MlpipeError(f"min_confidence must be within 0-100, got {min_confidence}")
    _require_ocr()
    from PIL import Image
    from presidio_image_redactor import ContrastSegmentedImageEnhancer

    luma, light_luma, light_channel = _renderings(image)
    h, w = luma.shape
    bright = Image.fromarray(np.where(light_channel >= BRIGHT_LEVEL, 0, 255).astype(np.uint8))
    contrast, meta = ContrastSegmentedImageEnhancer().preprocess_image(Image.fromarray(luma))
    up = _upscale(luma.shape)
    gray = Image.fromarray(255 - light_luma)
    if up != 1.0:
        gray = gray.resize((round(w * up), round(h * up)), Image.Resampling.BICUBIC)
    boxes = _ocr_pass(bright, 1.0, DETECT, min_confidence)
    boxes += _ocr_pass(contrast, float(meta.get("scale_factor", 1.0)), DETECT, min_confidence)
    boxes += _ocr_pass(gray, up, DETECT, min_confidence)
    if boxes:
        boxes += _ocr_pass(gray, up, SPARSE, min_confidence)
    return _merge(boxes)


def scan(image: np.ndarray, *, min_confidence: float = MIN_CONFIDENCE) -> TextScan:
    """`find_text` with the image's shape: `.has_text`, `.n_boxes`, `.summary()` (safe to log).
    Same input, errors and time as `find_text`."""
    return TextScan(tuple(image.shape), tuple(find_text(image, min_confidence=min_confidence)))


def redact(image: np.ndarray, boxes: list[TextBox] | tuple[TextBox, ...], pad: int = 2) -> np.ndarray:
    """A copy of `image` with every box, widened by `pad` pixels on each side and clipped to the
    image, filled with 0 (black) in every channel. Same shape and dtype as `image` (any H x W or
    H x W x C array, boxes in its pixels as `find_text` gives them); `image` itself is unchanged.
    Raises MlpipeError for a negative pad or an array with fewer than 2 dimensions."""
    if pad < 0:
        raise MlpipeError(f"redact pad must be >= 0 pixels, got {pad}")
    if image.ndim < 2:
        raise MlpipeError(f"redact needs an H x W or H x W x C image, got shape {image.shape}")
    out = image.copy()
    h, w = image.shape[:2]
    for box in boxes:
        top, bottom = max(0, box.top - pad), min(h, box.bottom + pad)
        left, right = max(0, box.left - pad), min(w, box.right + pad)
        if top < bottom and left < right:
            out[top:bottom, left:right, ...] = 0
    return out
