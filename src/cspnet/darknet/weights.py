"""Darknet ``.weights`` files: read and write, with the exact length checked.

Format (darknet ``save_weights_upto`` / ``load_weights_upto``), little-endian:

- header: int32 ``major``, ``minor``, ``revision``, then ``seen`` (images trained on) as
  uint64 when ``major * 10 + minor >= 2`` and as uint32 in older files;
- then, for every ``[convolutional]`` layer in cfg order (except weight-sharing ones): the biases
  (the BN shift with ``batch_normalize=1``), then BN scales, rolling means and rolling variances
  if there is BN, then the weights (C_out x C_in/groups x k x k); for ``[connected]``: biases,
  weights (outputs x inputs; stored transposed when ``major`` or ``minor`` > 1000), then the BN triple.

Darknet stops reading silently at the end of the file; here the length must match exactly,
and a partial file (darknet ``partial``, e.g. ``csdarknet53.conv.104``) is read with
``cutoff`` = the number of layers it covers, taken from a ``.conv.N`` file name by default.
"""
from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from ..weights import WeightsError
from .build import DarknetNet, WeightRecord


class DarknetWeightsError(WeightsError):
    """A ``.weights`` file that does not fit the network it is read into."""


@dataclass(frozen=True)
class WeightsHeader:
    major: int = 0
    minor: int = 2
    revision: int = 5
    seen: int = 0

    @property
    def seen_is_64bit(self) -> bool:
        return self.major * 10 + self.minor >= 2

    @property
    def transposed(self) -> bool:
        return self.major > 1000 or self.minor > 1000

    @property
    def nbytes(self) -> int:
        return 12 + (8 if self.seen_is_64bit else 4)

    def pack(self) -> bytes:
        fmt = "<iiiQ" if self.seen_is_64bit else "<iiiI"
        return struct.pack(fmt, self.major, self.minor, self.revision, self.seen)


_PARTIAL_NAME = re.compile(r"\.conv\.(\d+)$")


def read_header(data: bytes, path: str = "<weights>") -> WeightsHeader:
    """Parse the header at the start of ``data``."""
    if len(data) < 12:
        raise DarknetWeightsError(f"{path}: {len(data)} bytes is too short for a Darknet weights header")
    major, minor, revision = struct.unpack_from("<iii", data)
    wide = major * 10 + minor >= 2
    need = 20 if wide else 16
    if len(data) < need:
        raise DarknetWeightsError(f"{path}: {len(data)} bytes is too short for a version {major}.{minor} header ({need} bytes)")
    (seen,) = struct.unpack_from("<Q" if wide else "<I", data, 12)
    return WeightsHeader(major, minor, revision, seen)


def _records(target: DarknetNet | Sequence[WeightRecord], cutoff: int | None) -> list[WeightRecord]:
    if isinstance(target, DarknetNet):
        return target.weight_records(cutoff)
    if cutoff is not None:
        raise ValueError("cutoff counts Darknet layers; give a DarknetNet, not a record list")
    return list(target)


def default_cutoff(path: str | os.PathLike) -> int | None:
    """The layer count a ``darknet partial`` file covers, from its name (``x.conv.104`` -> 104)."""
    match = _PARTIAL_NAME.search(str(path))
    return int(match.group(1)) if match else None


def is_darknet_weights(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as a Darknet weights file: ``*.weights`` or a ``darknet partial`` cut."""
    return Path(path).suffix == ".weights" or default_cutoff(path) is not None


def _length_hint(records: list[WeightRecord], found: int) -> str:
    total = 0
    for k, record in enumerate(records):
        if total == found and k:
            last = records[k - 1].layer
            # any cutoff after the last layer read and up to the next weighted layer reads the same floats
            if last is None or record.layer is None:
                how = "read it with partial=True, as create_model(darknet_weights=) does for a file named x.conv.N"
            elif record.layer == last + 1:
                how = f"pass cutoff={record.layer}"
            else:
                how = f"pass cutoff=N with {last + 1} <= N <= {record.layer}"
            return f"; the file ends exactly after the first {k} of {len(records)} weighted layers, a partial file? ({how})"
        total += record.num_floats
    if found > total:
        return ("; the file holds more weights than this network: is it the cfg these weights belong to, "
                "or a classifier's weights for a backbone built without one?")
    return "; the file ends inside a layer: truncated or meant for another cfg"


def read_weights(
    target: DarknetNet | Sequence[WeightRecord],
    path: str | os.PathLike,
    *,
    cutoff: int | None = None,
    partial: bool = False,
    trailing: int = 0,
) -> WeightsHeader:
    """Read a ``.weights`` file into ``target`` (a `DarknetNet` or a list of records) and return its header.

    ``cutoff``: read only layers ``0 .. cutoff-1`` (default: from a ``.conv.N`` file name, else all).
    The file must hold exactly the floats those layers need; the error says how many were
    expected and found, unless ``partial`` allows a file that ends after a whole layer (the
    layers after it keep their values). ``trailing``: that many floats at the end of the file belong
    to layers the target does not have (a classifier after a backbone) and are not read.
    """
    path = Path(path)
    if cutoff is None and isinstance(target, DarknetNet):
        cutoff = default_cutoff(path)
    records = _records(target, cutoff)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DarknetWeightsError(f"{path}: cannot read weights ({e.strerror or e})") from None
    header = read_header(data, str(path))
    body = len(data) - header.nbytes
    expected = sum(r.num_floats for r in records)
    if body % 4:
        raise DarknetWeightsError(f"{path}: {body} bytes after the header is not a whole number of float32 values")
    found = body // 4 - trailing
    if partial and found < expected:
        boundaries = np.cumsum([0] + [r.num_floats for r in records])
        k = int(np.searchsorted(boundaries, found))
        if k < len(boundaries) and boundaries[k] == found:
            records, expected = records[:k], found
    if found != expected:
        scope = f"layers 0..{cutoff - 1}" if cutoff is not None else "all layers"
        raise DarknetWeightsError(
            f"{path}: expected {expected} floats for {len(records)} weighted layers ({scope}), found {found}"
            + _length_hint(records, found))
    values = np.frombuffer(data, dtype="<f4", offset=header.nbytes)
    offset = 0
    with torch.no_grad():
        for record in records:
            for t in record.tensors:
                chunk = values[offset : offset + t.numel()]
                offset += t.numel()
                src = torch.from_numpy(chunk.astype(np.float32))
                if header.transposed and record.layout == "connected" and t is record.weight:
                    src = src.view(t.shape[1], t.shape[0]).t()
                t.copy_(src.reshape(t.shape))
    return header


def write_weights(
    target: DarknetNet | Sequence[WeightRecord],
    path: str | os.PathLike,
    *,
    header: WeightsHeader | None = None,
    cutoff: int | None = None,
) -> Path:
    """Write ``target``'s weights as a Darknet ``.weights`` file, atomically (temp file + rename).

    ``cutoff`` writes only layers ``0 .. cutoff-1`` (darknet ``partial``). The default header is
    what darknet itself writes (0.2.5, 64-bit ``seen``).
    """
    header = header or WeightsHeader()
    if header.transposed:
        raise ValueError("writing transposed (major/minor > 1000) weights files is not supported")
    records = _records(target, cutoff)
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        f.write(header.pack())
        for record in records:
            for t in record.tensors:
                f.write(t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return Path(path)
