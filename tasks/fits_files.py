"""Opening one field's FITS files safely: each file opened once (memory-mapped unless gzipped), checked to
be FITS and not truncated before any data is read, HDUs selected by index or EXTNAME, and 2-d image data
returned with every problem an InputError that names the file. Also the content hash of an input file
(`file_digest`: xxh3_128 by default, sha256 on request). tasks.fits_input builds the field's cubes on top of
this.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import xxhash
from astropy.io import fits

IMAGE_HDUS = (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)


class InputError(Exception):
    """A field's input is unusable: `path` is the offending file, `problem` says why."""

    def __init__(self, path, problem: str):
        # one line, whatever the library below said (wcslib's messages span several)
        problem = "; ".join(part.strip() for part in str(problem).splitlines() if part.strip())
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


# the hashes a completion record may name: xxh3_128 is non-cryptographic and about 7x faster than sha256
# (11.8 against 1.6 GB/s on a page-cached 1 GB file here; BLAKE3 4.5), which is plenty to see a changed input
HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_BLOCK = 1 << 22


def file_digest(path, algorithm: str = "xxh3_128") -> str:
    """Hex digest of the file's bytes by `algorithm` (a key of HASHES), read in 4 MiB blocks into one buffer."""
    h = HASHES[algorithm]()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_file(path) -> str:
    return file_digest(path, "sha256")


def _data_nbytes(header: fits.Header) -> int:
    """Bytes of data (without padding) the header announces."""
    naxis = int(header.get("NAXIS", 0))
    if naxis == 0:
        return 0
    n = math.prod(int(header.get(f"NAXIS{k}", 0)) for k in range(1, naxis + 1))
    return abs(int(header.get("BITPIX", 8))) // 8 * int(header.get("GCOUNT", 1)) * (int(header.get("PCOUNT", 0)) + n)


class FitsFiles:
    """Opened, size-checked FITS files of one field, each opened once."""

    def __init__(self):
        self.open: dict[Path, fits.HDUList] = {}
        self.unmapped: dict[Path, fits.HDUList] = {}  # for scaled (BZERO/BSCALE/BLANK) data
        self.mapped: set[Path] = set()

    def hdul(self, path: Path) -> fits.HDUList:
        path = Path(path)
        if path in self.open:
            return self.open[path]
        if not path.exists():
            raise InputError(path, "no such file")
        if not path.is_file():
            raise InputError(path, "not a regular file")
        with open(path, "rb") as f:
            head = f.read(80)
        gz = head[:2] == b"\x1f\x8b"
        if not gz and not head.startswith(b"SIMPLE  ="):
            raise InputError(path, "not a FITS file (does not start with a SIMPLE card)")
        try:
            # memory-mapped (not gzip): the float32 conversion then reads the page cache directly,
            # one pass instead of a read into a buffer and a copy out of it
            hdul = fits.open(path, memmap=not gz, lazy_load_hdus=False)
        except Exception as exc:
            raise InputError(path, f"truncated or corrupt FITS file ({type(exc).__name__}: {exc})") from None
        self.open[path] = hdul
        if not gz:
            self.mapped.add(path)
            size = path.stat().st_size
            for i, hdu in enumerate(hdul):
                if isinstance(hdu, fits.CompImageHDU):
                    continue  # its header describes the uncompressed image; reading the data checks it
                # the HDU's own fileinfo: HDUList.fileinfo also serialises every header of the file to see whether
                # one was resized (about 2.5 ms per call here, 30 ms of a four-band field's ingest)
                need = hdu.fileinfo()["datLoc"] + _data_nbytes(hdu.header)
                if need > size:
                    raise InputError(path, f"truncated FITS file: {size} bytes, HDU {i} needs {need}")
        return hdul

    def close(self):
        for h in list(self.open.values()) + list(self.unmapped.values()):
            h.close()

    def select(self, path: Path, hdu) -> int:
        """Index of the HDU `hdu` (index, EXTNAME or None: the first with 2-d data)."""
        hdul = self.hdul(path)
        if isinstance(hdu, int):
            if not 0 <= hdu < len(hdul):
                raise InputError(path, f"no HDU {hdu} (the file has {len(hdul)})")
            return hdu
        if isinstance(hdu, str):
            for i, h in enumerate(hdul):
                if str(h.header.get("EXTNAME", "")).strip().upper() == hdu.strip().upper():
                    return i
            raise InputError(path, f"no HDU named {hdu!r}")
        for i, h in enumerate(hdul):
            if isinstance(h, IMAGE_HDUS) and h.header.get("NAXIS") == 2:
                return i
        found = ", ".join(f"HDU {i} NAXIS={h.header.get('NAXIS')}" for i, h in enumerate(hdul))
        raise InputError(path, f"empty image: no HDU with 2-d image data ({found})")

    def read(self, path: Path, index: int, what: str) -> tuple[fits.Header, np.ndarray]:
        """Header and 2-d data of HDU `index`; `what` names it in messages."""
        h = self.hdul(path)[index]
        if not isinstance(h, IMAGE_HDUS):
            raise InputError(path, f"{what} (HDU {index}) is not an image HDU")
        naxis = h.header.get("NAXIS", 0)
        dims = [h.header.get(f"NAXIS{k}", 0) for k in range(1, naxis + 1)]
        if naxis != 2 or 0 in dims:
            raise InputError(path, f"empty image: {what} (HDU {index}) has NAXIS={naxis}, shape {dims[::-1]}")
        path = Path(path)
        if path in self.mapped and not isinstance(h, fits.CompImageHDU) and h.header.get("BITPIX") == 16 \
                and h.header.get("BZERO") == 32768 and h.header.get("BSCALE", 1) == 1 and "BLANK" not in h.header:
            # unsigned 16-bit (int16 + 32768, the usual mask): mapped, and converted in one pass, as astropy's
            # uint=True gives it but without reading the file again into a buffer
            raw = np.memmap(path, dtype=">u2", mode="r", offset=h.fileinfo()["datLoc"],
                            shape=tuple(dims[::-1]))
            return h.header, np.bitwise_xor(raw, np.uint16(0x8000), dtype=np.uint16)
        if path in self.mapped and not isinstance(h, fits.CompImageHDU) \
                and any(k in h.header for k in ("BZERO", "BSCALE", "BLANK")):
            # astropy cannot memory-map scaled data (e.g. uint16 stored as int16 + BZERO): read it
            if path not in self.unmapped:
                self.unmapped[path] = fits.open(path, memmap=False, lazy_load_hdus=False)
            h = self.unmapped[path][index]
        try:
            data = h.data
        except Exception as exc:
            raise InputError(path, f"truncated or corrupt FITS data in {what} (HDU {index}): {exc}") from None
        if data is None or data.ndim != 2 or data.size == 0:
            raise InputError(path, f"empty image: {what} (HDU {index}) has no 2-d data")
        return h.header, data
