"""Pixel decoding with permissively licensed codecs, and server-side rendering.

pydicom picks *some* installed plugin unless told which; we always name one, so the GPL
``pylibjpeg-libjpeg`` is never used even when it is installed:

=====================  ==============================================================
JPEG baseline          Pillow (HPND), then GDCM (BSD)
JPEG extended 12-bit   GDCM through our own pydicom plugin (pydicom's GDCM plugin
                       refuses 12-bit precision; GDCM itself decodes it correctly)
JPEG lossless          GDCM
JPEG-LS                pyjpegls (MIT), then GDCM
JPEG 2000              pylibjpeg-openjpeg (MIT); GDCM only if it is not installed
                       (GDCM aborts the process on data openjpeg refuses)
RLE                    pydicom's own decoder
=====================  ==============================================================

Rendering (``/rendered``, ``/thumbnail``) applies the Modality LUT, the VOI window (the
request's ``window=center,width[,linear|linear-exact|sigmoid]``, else the object's first
window, else its VOI LUT, else the frame's range), inverts MONOCHROME1, and encodes JPEG or
PNG with Pillow. Nothing is written to disk.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import (
    DecodeRunner,
    JPEG2000Decoder,
    JPEGExtended12BitDecoder,
)
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pack_bits, pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

GDCM12 = "pacsvault-gdcm12"
MAX_DECODED_BYTES = 1 << 30  # per decoded frame or decompressed object

PLUGINS: dict[str, tuple[str, ...]] = {
    JPEGBaseline8Bit: ("pillow", "gdcm"),
    JPEGExtended12Bit: ("pillow", GDCM12),
    JPEGLossless: ("gdcm",),
    JPEGLosslessSV1: ("gdcm",),
    JPEGLSLossless: ("pyjpegls", "gdcm"),
    JPEGLSNearLossless: ("pyjpegls", "gdcm"),
    JPEG2000Lossless: ("pylibjpeg", "gdcm"),
    JPEG2000: ("pylibjpeg", "gdcm"),
    RLELossless: ("pydicom",),
}

_registered = False
_register_lock = threading.Lock()


class DecodeError(Exception):
    """No permitted decoder could decode the pixel data (or it has none)."""


class RenderError(Exception):
    """A rendering parameter is invalid (answered 400)."""


# --- a GDCM plugin for 12-bit JPEG extended ------------------------------------------------


def is_available(uid: str) -> bool:  # pydicom plugin protocol
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return str(uid) == JPEGExtended12Bit


def decode_gdcm12(src: bytes, runner: DecodeRunner) -> bytes:  # pydicom plugin protocol
    import gdcm

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())
    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((runner.columns, runner.rows, 1))
    img.SetDataElement(elem)
    pi_type = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    if runner.samples_per_pixel > 1:
        img.SetPlanarConfiguration(runner.planar_configuration)
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(
        str.__str__(runner.transfer_syntax))))
    bits = runner.bits_stored
    img.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, runner.bits_allocated,
                                        bits, bits - 1, runner.pixel_representation))
    return cast(bytes, img.GetBuffer().encode("utf-8", "surrogateescape"))


def register_plugins() -> None:
    global _registered
    with _register_lock:
        if _registered:
            return
        try:
            import gdcm

            # GDCM reports its 8-bit-then-12-bit retry on stderr; nothing useful there.
            gdcm.Trace.WarningOff()
            gdcm.Trace.ErrorOff()
        except ImportError:
            pass
        if GDCM12 not in JPEGExtended12BitDecoder.available_plugins:
            JPEGExtended12BitDecoder.add_plugin(GDCM12, (__name__, "decode_gdcm12"))
        _registered = True


def plugins_for(transfer_syntax: str) -> tuple[str, ...]:
    """Decoders we allow for a syntax; ``("",)`` (pydicom's native path) if uncompressed."""
    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return ("",)
    return PLUGINS.get(uid, ())


def _openjpeg_available() -> bool:
    return "pylibjpeg" in JPEG2000Decoder.available_plugins


def _with_plugins(ds: Dataset, decode: Callable[[str], Any]) -> Any:
    register_plugins()
    transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    plugins = plugins_for(transfer_syntax)
    if transfer_syntax == JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8:
        plugins = (GDCM12,)  # Pillow only decodes 8-bit precision (and logs the refusal)
    if transfer_syntax in (JPEG2000, JPEG2000Lossless) and _openjpeg_available():
        # GDCM aborts the whole process (an uncaught C++ exception) on JPEG 2000 data that
        # openjpeg refuses (issue 13, defect 6: a corrupt object would take the server
        # down); it is a fallback only where pylibjpeg-openjpeg is not installed.
        plugins = ("pylibjpeg",)
    errors: list[str] = []
    for plugin in plugins:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return decode(plugin)
        except Exception as exc:  # each plugin raises its own types; try the next
            errors.append(f"{plugin or 'native'}: {type(exc).__name__}")
    raise DecodeError("no permitted decoder: " + (", ".join(errors) or "unsupported syntax"))


def _check_size(ds: Dataset, frames: int) -> None:
    """Refuse to decode what would not fit comfortably in memory (a crafted header can
    announce 65535 x 65535 pixels)."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (AttributeError, TypeError, ValueError):
        raise DecodeError("the pixel description is incomplete") from None
    if rows * columns * samples * max(1, bits // 8) * max(1, frames) > MAX_DECODED_BYTES:
        raise DecodeError("image too large to decode")


def _frames_in(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frame_array(ds: Dataset, index: int) -> NDArray[Any]:
    """One decoded frame (0-based), colour converted to RGB where the syntax implies it."""
    _check_size(ds, 1)
    return cast(NDArray[Any], _with_plugins(
        ds, lambda plugin: pixel_array(ds, index=index, decoding_plugin=plugin)))


# lossy by definition: JPEG baseline, JPEG extended, JPEG-LS near-lossless
_LOSSY_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                             "1.2.840.10008.1.2.4.81"})


def decompress(ds: Dataset) -> None:
    """Decode the pixel data in place to Explicit VR Little Endian (same SOP Instance).

    A lossy original stays marked lossy once decoded (PS3.3 C.7.6.1.1.5): JPEG baseline,
    extended and JPEG-LS near-lossless objects often lack the attribute (issue 13)."""
    lossy = str(ds.file_meta.TransferSyntaxUID) in _LOSSY_SYNTAXES
    _check_size(ds, _frames_in(ds))
    _with_plugins(ds, lambda plugin: ds.decompress(
        decoding_plugin=plugin, generate_instance_uid=False))
    if lossy:
        ds.LossyImageCompression = "01"


def native_frame_bytes(ds: Dataset, index: int) -> bytes:
    """A frame as Explicit VR Little Endian pixel bytes (decoded if compressed)."""
    arr = frame_array(ds, index)
    if int(ds.get("BitsAllocated", 8)) == 1:
        return pack_bits(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


# --- rendering ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "linear"


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: tuple[int, int] | None = None
    quality: int = 90


MAX_VIEWPORT = 4096


def parse_window(value: str | None) -> Window | None:
    if value is None or not value.strip():
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 3):
        raise RenderError("window is center,width[,function]")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise RenderError("window center and width must be numbers") from None
    function = parts[2].lower() if len(parts) == 3 else "linear"
    if function not in ("linear", "linear-exact", "sigmoid"):
        raise RenderError("window function is linear, linear-exact or sigmoid")
    if width <= 0 or (function == "linear" and width < 1) or not np.isfinite(center + width):
        raise RenderError("window width out of range")
    return Window(center, width, function)


def parse_viewport(value: str | None) -> tuple[int, int] | None:
    if value is None or not value.strip():
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 6):
        raise RenderError("viewport is vw,vh (source region is not supported)")
    try:
        vw, vh = int(parts[0]), int(parts[1])
    except ValueError:
        raise RenderError("viewport sizes must be integers") from None
    if not (0 < vw <= MAX_VIEWPORT and 0 < vh <= MAX_VIEWPORT):
        raise RenderError("viewport size out of range")
    return vw, vh


def parse_quality(value: str | None) -> int:
    if value is None or not value.strip():
        return 90
    try:
        quality = int(value)
    except ValueError:
        raise RenderError("quality must be an integer") from None
    if not 1 <= quality <= 100:
        raise RenderError("quality is 1..100")
    return quality


def _apply_window(arr: NDArray[Any], window: Window) -> NDArray[np.uint8]:
    x = arr.astype(np.float64)
    c, w = window.center, window.width
    if window.function == "linear-exact":
        y = (x - c) / w + 0.5
    elif window.function == "sigmoid":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    else:  # PS3.3 C.11.2.1.2.1
        y = (x - (c - 0.5)) / (w - 1) + 0.5 if w > 1 else (x >= c).astype(np.float64)
    return cast(NDArray[np.uint8], np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8))


def _stretch(arr: NDArray[Any]) -> NDArray[np.uint8]:
    x = arr.astype(np.float64)
    low, high = float(np.min(x)), float(np.max(x))
    if high <= low:
        return np.zeros(x.shape, dtype=np.uint8)
    return cast(NDArray[np.uint8],
                np.rint((x - low) * (255.0 / (high - low))).astype(np.uint8))


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _grey(ds: Dataset, arr: NDArray[Any], window: Window | None) -> NDArray[np.uint8]:
    arr = apply_modality_lut(arr, ds)
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            function = str(ds.get("VOILUTFunction", "LINEAR")).strip().lower().replace("_", "-")
            window = Window(_first(ds.WindowCenter), _first(ds.WindowWidth),
                            function if function in ("linear-exact", "sigmoid") else "linear")
            if window.width <= 0:
                window = None
        except (TypeError, ValueError, IndexError):
            window = None
    if window is not None:
        out = _apply_window(arr, window)
    elif "VOILUTSequence" in ds:
        out = _stretch(apply_voi_lut(arr, ds))
    else:
        out = _stretch(arr)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 255 - out
    return out


def _colour(ds: Dataset, arr: NDArray[Any]) -> NDArray[np.uint8]:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored", 8))
    if arr.dtype == np.uint8 and bits <= 8:
        return cast(NDArray[np.uint8], arr)
    scale = 255.0 / float((1 << bits) - 1)
    return cast(NDArray[np.uint8],
                np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8))


def render(ds: Dataset, index: int, options: RenderOptions) -> bytes:
    """Render frame ``index`` (0-based) as JPEG or PNG bytes."""
    arr = frame_array(ds, index)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if int(ds.get("SamplesPerPixel", 1)) == 1 and photometric != "PALETTE COLOR":
        if arr.ndim != 2:
            raise DecodeError("unexpected frame shape")
        image = Image.fromarray(_grey(ds, arr, options.window))
    else:
        rgb = _colour(ds, arr)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DecodeError("unexpected colour frame shape")
        image = Image.fromarray(np.ascontiguousarray(rgb))
    if options.viewport is not None:
        vw, vh = options.viewport
        scale = min(vw / image.width, vh / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if options.media_type == "image/png":
        image.save(out, format="PNG", optimize=False)
    else:
        image.save(out, format="JPEG", quality=options.quality)
    return out.getvalue()
