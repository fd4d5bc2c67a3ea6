"""GDCM decoding (JPEG Lossless Process 14 and SV1, JPEG Extended 8 and 12 bit) in a helper
process, so that a corrupt stream cannot end the process that asked.

Why a helper: python-gdcm 3.2 lets a C++ exception escape on some corrupt JPEG lossless frames,
and the process ends (std::terminate, SIGABRT). Fuzzing frames that dcmtk's ``dcmcjpeg`` wrote
found such inputs within a few hundred mutations; in the gateway's worker that would be one
malformed instance taking the service down. Here the decode runs in a helper process
(``python -m optimizer.contract.gdcm_decode``, started on first use, kept, restarted after it
died; up to one per core, ``DecoderPool``), which returns the array or an error text over a
pipe; a helper that dies or overruns ``timeout_s`` becomes a ``DecodeError`` and the caller
carries on. A helper of its own rather
than ``multiprocessing``: spawn and forkserver children re-import the caller's main module,
which breaks callers without a main guard, and a fork of the threaded gateway is unsafe.

PHI: the helper receives the Image Pixel module alone (geometry, photometric interpretation, bit
depths, the encoded frames) and the transfer syntax, never UIDs or patient attributes, so
nothing GDCM or its libjpeg print can name a patient ("Corrupt JPEG data: ...", "Unsupported
JPEG data precision 12", which GDCM writes for every 12-bit frame before decoding it right);
the helper's stderr goes to /dev/null all the same, and GDCM's own trace output is off.

12-bit JPEG Extended: pydicom's GDCM plugin refuses samples of more than 8 bits, although GDCM
decodes them (its output equals dcmtk's ``dcmdjpeg``, checked by
tests/optimizer/contract/test_preprocess_gdcm.py); ``_decode_frame`` below is a pydicom decoder
plugin, registered in the helper as ``PLUGIN_12BIT``, that decodes them with GDCM.
"""

from __future__ import annotations

import functools
import os
import pickle
import queue
import select
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders.base import DecodeRunner


class DecodeError(Exception):
    """The helper could not decode: the decoder's error text, or that it died or timed out
    (``preprocess.decode_frames`` turns it into a PreprocessError naming the syntax)."""


PLUGIN_12BIT = "bedside-gdcm"
# pydicom's decoder plugin per transfer syntax decoded here.
PLUGINS: dict[str, str] = {
    uid.JPEGLossless: "gdcm",
    uid.JPEGLosslessSV1: "gdcm",
    uid.JPEGExtended12Bit: PLUGIN_12BIT,
}
# What the helper gets of an instance: the Image Pixel module (PS3.3 C.7.6.3) and frame count.
PIXEL_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                  "PlanarConfiguration", "BitsAllocated", "BitsStored", "HighBit",
                  "PixelRepresentation", "NumberOfFrames", "PixelData")
TIMEOUT_S = 60.0  # a frame takes milliseconds; a long multi-frame cine, seconds

# pydicom decoder plugin interface (for PLUGIN_12BIT): what it needs and when it is usable.
DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("gdcm>=3.0.10",)}


def is_available(transfer_syntax: str) -> bool:
    if transfer_syntax not in DECODER_DEPENDENCIES:
        return False
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One JPEG Extended frame, 8 or 12 bits per sample, decoded by GDCM."""
    import gdcm

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    pixel_data = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    pixel_data.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(pixel_data)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(
        gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(
        gdcm.TransferSyntax.GetTSType(str(runner.transfer_syntax))))
    stored = runner.bits_stored
    image.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, runner.bits_allocated,
                                          stored, stored - 1, runner.pixel_representation))
    buffer = image.GetBuffer()  # char*, handed to Python as str
    if not buffer:
        raise ValueError("GDCM could not decode the JPEG Extended frame")
    return bytes(buffer.encode("utf-8", "surrogateescape"))


def pixel_module(ds: Dataset) -> Dataset:
    """The Image Pixel module of ``ds`` and its transfer syntax, nothing else."""
    out = Dataset()
    out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    for keyword in PIXEL_KEYWORDS:
        if keyword in ds:
            out[keyword] = ds[keyword]
    return out


def _prepare_helper() -> None:
    """In the helper: GDCM's trace off, the 12-bit plugin registered."""
    import gdcm
    from pydicom.pixels.decoders import JPEGExtended12BitDecoder

    gdcm.Trace.DebugOff()
    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    JPEGExtended12BitDecoder.add_plugin(PLUGIN_12BIT, (__name__, "_decode_frame"))


def _decode_here(ds: Dataset, indices: list[int], all_frames: bool) -> np.ndarray:
    plugin = PLUGINS[str(ds.file_meta.TransferSyntaxUID)]
    if all_frames:
        arr = pixel_array(ds, as_rgb=True, decoding_plugin=plugin)
        return arr[None] if int(ds.get("NumberOfFrames", 1) or 1) == 1 else arr
    return np.stack([pixel_array(ds, index=i, as_rgb=True, decoding_plugin=plugin)
                     for i in indices])


_LENGTH = 8  # bytes of the big-endian length before every pickled message


def _send(fd: int, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(len(data).to_bytes(_LENGTH, "big") + data)
    while view:
        view = view[os.write(fd, view):]


def _receive(fd: int, deadline: float | None = None) -> Any:
    """One message from ``fd``; EOFError at end of stream, TimeoutError past ``deadline``
    (time.monotonic). Messages come only from the helper this module started."""
    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            if deadline is not None:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    return pickle.loads(exactly(int.from_bytes(exactly(_LENGTH), "big")))


def helper_main() -> None:
    """The helper process: requests on stdin, answers on stdout, until stdin closes."""
    _prepare_helper()
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    while True:
        try:
            ds, indices, all_frames = _receive(fd_in)
        except EOFError:
            return
        try:
            reply: tuple[str, Any] = ("ok", _decode_here(ds, indices, all_frames))
        except Exception as exc:  # the decoders raise many types; the parent wraps the text
            reply = ("error", str(exc))
        _send(fd_out, reply)


class IsolatedDecoder:
    """One helper process (``python -m optimizer.contract.gdcm_decode``), started on first use
    and again after it died or overran; requests are served one at a time."""

    def __init__(self, timeout_s: float = TIMEOUT_S) -> None:
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def _helper(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        # stderr to nowhere: GDCM's libjpeg prints a line for every 12-bit frame and for every
        # corrupt one; none of it names a patient (see above), none of it helps an operator.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, close_fds=True)
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def decode(self, ds: Dataset, indices: list[int], all_frames: bool) -> np.ndarray:
        """The given frames of ``ds`` (all of them when ``all_frames``) as pydicom's
        ``pixel_array(..., as_rgb=True)`` returns them, decoded by GDCM in the helper; a
        DecodeError when the decoder fails, dies or runs out of time."""
        request = (pixel_module(ds), indices, all_frames)
        with self._lock:
            proc = self._helper()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                _send(proc.stdin.fileno(), request)
                kind, value = _receive(proc.stdout.fileno(),
                                       time.monotonic() + self._timeout_s)
            except TimeoutError:
                self._stop()
                raise DecodeError(f"the JPEG decoder took longer than {self._timeout_s:g} s "
                                  "(stopped)") from None
            except (EOFError, OSError):  # the helper died: GDCM ended it on this stream
                self._stop()
                raise DecodeError("the JPEG decoder failed on this pixel data (corrupt JPEG "
                                  "stream)") from None
        if kind != "ok":
            raise DecodeError(str(value))
        return np.asarray(value)


class DecoderPool:
    """Up to ``size`` helpers, each started when first needed: one decode per helper at a
    time, so concurrent callers (REST requests, the spool worker) use every core. The most
    recently freed helper is used first, so a lone caller keeps to one process."""

    def __init__(self, size: int, timeout_s: float = TIMEOUT_S) -> None:
        if size < 1:
            raise ValueError("a decoder pool needs at least one helper")
        self._free: queue.LifoQueue[IsolatedDecoder] = queue.LifoQueue()
        self._all = [IsolatedDecoder(timeout_s) for _ in range(size)]
        for decoder in self._all:
            self._free.put(decoder)

    def decode(self, ds: Dataset, indices: list[int], all_frames: bool) -> np.ndarray:
        decoder = self._free.get()
        try:
            return decoder.decode(ds, indices, all_frames)
        finally:
            self._free.put(decoder)

    def close(self) -> None:
        for decoder in self._all:
            decoder.close()


@functools.cache
def shared_decoder() -> DecoderPool:
    """The process's helpers: one per core, at most four (a helper holds about as much memory
    as a Python process with numpy and pydicom)."""
    return DecoderPool(min(4, os.cpu_count() or 1))


def decode_isolated(ds: Dataset, indices: list[int], all_frames: bool) -> np.ndarray:
    """``DecoderPool.decode`` on the process's shared helpers."""
    return shared_decoder().decode(ds, indices, all_frames)


if __name__ == "__main__":
    helper_main()
