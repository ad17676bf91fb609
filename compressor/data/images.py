"""Image files: every header checked before any work (unreadable, decompression bomb, unconvertible mode),
decoded to 8-bit RGB (16-bit scaled, not clipped), and small equal-size trees cached as uint8 arrays.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from compressor.errors import UserError

from compressor.data.folders import _Split


def _bars() -> bool:
    """``compressor.data.PROGRESS``, read at call time (the CLI's ``--no-progress`` sets it)."""
    import compressor.data

    return bool(compressor.data.PROGRESS)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bound, used when PIL.Image.MAX_IMAGE_PIXELS is None
_PIL_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "PA", "CMYK", "YCbCr", "HSV"})
_INT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_CONVERTIBLE = _PIL_MODES | _INT16_MODES | {"I", "F"}


def _max_pixels() -> int:
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS)


@contextmanager
def _bomb_errors() -> Iterator[None]:
    """PIL's DecompressionBombWarning raised as an error (not thread-safe: enter it on one thread)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """``Image.open``, with every failure inside (opening or decoding) one UserError naming the file.

    An image over ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (default 89,478,485, about 9459×9459) is
    refused as a possible decompression bomb, before its pixels are decoded.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > _max_pixels():
                raise UserError(f"refused as a possible decompression bomb ({w}×{h} = {w * h} pixels, over "
                                f"the limit of {_max_pixels()})", source=str(path))
            yield im
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"refused as a possible decompression bomb ({exc})", source=str(path)) from exc
    except Exception as exc:  # untrusted bytes: PIL raises OSError, but also ValueError, SyntaxError, EOFError...
        raise UserError(f"not a readable image ({type(exc).__name__})", source=str(path)) from exc


def _to_uint8(a: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """A one-channel 16-bit, 32-bit integer or float image as 8 bits, never clipped to white.

    * "I;16*" (16-bit): the high byte, ``v >> 8`` (32768 → 128, 65535 → 255);
    * "I" (32-bit int): values within 0..255 are taken as 8-bit, within 0..65535 as 16-bit (``v >> 8``);
    * "F" (float): values within 0..1 are scaled by 255, within 0..255 taken as they are (rounded);
    * anything else (negative, larger, NaN) cannot be converted faithfully: an error.
    """
    if mode in _INT16_MODES:
        return (a.astype(np.uint16) >> 8).astype(np.uint8)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > (255 if mode == "F" else 65535):
        raise UserError(f"image mode {mode!r} with values in [{lo:g}, {hi:g}] cannot be converted to 8 bits "
                        "faithfully", source=str(path))
    if mode == "F":
        return np.rint(a * 255.0 if hi <= 1.0 else a).astype(np.uint8)
    return (a if hi <= 255 else a >> 8).astype(np.uint8)


def _to_rgb(im: Any, path: Path) -> Any:
    """A PIL image as RGB, faithfully (see ``_to_uint8`` for 16-bit, "I" and "F"), else a UserError."""
    from PIL import Image

    if im.mode in _PIL_MODES:
        return im.convert("RGB")
    if im.mode in _INT16_MODES or im.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im), im.mode, path), "L").convert("RGB")
    raise UserError(f"image mode {im.mode!r} cannot be converted to RGB faithfully", source=str(path))


def _decode(path: Path) -> np.ndarray:
    """HWC uint8 RGB pixels of one file."""
    with _opened(path) as im:
        return np.asarray(_to_rgb(im, path))


def _load_rgb(path: str):
    """The lazy sets' loader: an RGB PIL image, converted like the in-memory sets, failures named."""
    from PIL import Image

    with _bomb_errors():
        return Image.fromarray(_decode(Path(path)), "RGB")


def _probe(path: Path) -> tuple[int, int]:
    """(width, height) from the header: a readable format, a pixel count under the bound, a convertible mode."""
    with _opened(path) as im:
        if im.mode not in _CONVERTIBLE:
            raise UserError(f"image mode {im.mode!r} cannot be converted to RGB faithfully", source=str(path))
        return im.size


def _probe_files(files: Sequence[Path], desc: str) -> list[tuple[int, int]]:
    """``_probe`` every file, on a few threads (it is I/O bound), stopping at the first bad one."""
    from PIL import Image
    from tqdm.auto import tqdm

    Image.init()  # plugins registered once, before the threads
    out: list[tuple[int, int]] = []
    with _bomb_errors(), tqdm(total=len(files), desc=desc, unit="img", leave=False,
                              disable=len(files) < 1000 or not _bars()) as bar:
        if len(files) < 256:
            return [_probe(f) for f in files]
        pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
        try:
            for i in range(0, len(files), 4096):
                out += pool.map(_probe, files[i:i + 4096])
                bar.update(len(files[i:i + 4096]))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def _check_headers(split: _Split, cache: Path) -> set[tuple[int, int]]:
    """The split's distinct (height, width): a cheap pass over every file's header before any work.

    Bounded: ``Image.open`` reads the header only, never the pixel data; a file whose pixels turn
    out corrupt later is still one UserError naming it when it is decoded. The result is kept in
    the cache, keyed by the split's content and the pixel bound, so an unchanged tree is not re-read.
    """
    marker = cache / split.cache_name(f"_{_max_pixels()}.sizes.json")
    try:
        return {(int(h), int(w)) for h, w in json.loads(marker.read_text())["sizes"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sizes = {(h, w) for w, h in _probe_files([f for f, _ in split.files], f"check {split.folder.name}")}
    from compressor.storage import io

    with suppress(UserError):  # the marker only saves time
        io.write_json(marker, {"sizes": sorted([h, w] for h, w in sizes)})
    return sizes


def _uniform_size(sizes: set[tuple[int, int]], root: Path) -> tuple[int, int]:
    if len(sizes) != 1:
        shown = ", ".join(f"{h}×{w}" for h, w in sorted(sizes)[:3])
        raise UserError(f"images have different sizes ({shown}, ...); use --data imagefolder (ImageNet-style, "
                        "resized on the fly)", source=str(root))
    return next(iter(sizes))


def _read_imagefolder_arrays(split: _Split, cache: Path, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split of ``hw``-sized images once into a cached uint8 NHWC .npz, keyed by the split's content."""
    from tqdm.auto import tqdm

    npz = cache / split.cache_name(".npz")
    if npz.exists():
        with suppress(OSError, ValueError, KeyError):
            with np.load(npz, allow_pickle=False) as z:
                return z["x"], z["y"]
    x = np.empty((len(split.files), hw[0], hw[1], 3), dtype=np.uint8)
    with _bomb_errors():
        for i, (f, _) in enumerate(tqdm(split.files, desc=f"decode {split.folder.name}", unit="img", leave=False,
                                         disable=not _bars())):
            a = _decode(f)
            if a.shape[:2] != hw:  # a header that lied about the size
                raise UserError(f"decodes to {a.shape[0]}×{a.shape[1]}, its header says {hw[0]}×{hw[1]}",
                                source=str(f))
            x[i] = a
    y = np.asarray([ci for _, ci in split.files], dtype=np.int64)
    from compressor.storage import io

    io.atomic_write(npz, lambda fh: np.savez(fh, x=x, y=y))
    return x, y


