"""WebDataset shards read with the standard library: member offsets, labels, truncation checks.

A shard is a plain (uncompressed) tar; a sample is the group of members sharing a key (the name up
to the first dot of the base name), here an image (`jpg`/`jpeg`/`png`) and a `cls` label of ASCII
digits. Scanning the 512-byte headers directly is 4-20x faster than `tarfile` (ImageNet has 2.5M
members); GNU long names and pax headers fall back to `tarfile`.
"""
from __future__ import annotations

import logging
import os
import tarfile

from sdarts.errors import DataError

log = logging.getLogger("sdarts.data")

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png")


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key runs up to the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


class _Exotic(Exception):
    """A header type the fast scanner leaves to `tarfile` (GNU long names, pax headers)."""


def _octal(field: bytes) -> int:
    if field[0] & 0x80:   # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _headers_fast(path: str, size: int) -> tuple[list[tuple[str, int, int]], dict[str, bytes], str | None]:
    """Regular members as (name, data offset, size) by reading the 512-byte ustar headers directly
    (10-20x faster than `tarfile`, which matters for ImageNet's 2.5M members), small members' bytes,
    and what is wrong with the file if it is truncated. Raises _Exotic on GNU/pax extensions."""
    members, small = [], {}
    off = 0
    with open(path, "rb") as f:
        while True:
            f.seek(off)
            buf = f.read(1024)   # the header and, for a label, its data
            hdr = buf[:512]
            if len(hdr) < 512:
                return members, small, (f"no end-of-archive block after byte {off}" if not hdr.strip(b"\0")
                                        else f"header at byte {off} cut short")
            if hdr.count(0) == 512:
                return members, small, None
            chk = _octal(hdr[148:156])
            if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
                raise DataError(f"{path}: corrupt tar header at byte {off} (checksum mismatch)")
            kind = hdr[156:157]
            if kind in (b"L", b"K", b"x", b"g"):
                raise _Exotic
            n = _octal(hdr[124:136])
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            data = off + 512
            if kind in (b"0", b"\0", b"7"):
                if data + n > size:
                    return members, small, f"member {name} ends at byte {data + n}, the file has {size}"
                members.append((name, data, n))
                if n <= 512:
                    small[name] = buf[512:512 + n]
            off = data + (n + 511) // 512 * 512


def _headers_tarfile(path: str, size: int) -> tuple[list[tuple[str, int, int]], dict[str, bytes], str | None]:
    """The same through `tarfile`; it stops silently at a header cut short, hence the checks."""
    members, small = [], {}
    with tarfile.open(path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            if m.offset_data + m.size > size:
                return members, small, f"member {m.name} ends at byte {m.offset_data + m.size}, the file has {size}"
            members.append((m.name, m.offset_data, m.size))
            if m.size <= 512:
                small[m.name] = tf.extractfile(m).read()
        end = tf.offset
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read(512)
    if len(tail) < 512 or tail.count(0) != 512:
        return members, small, f"no end-of-archive block after byte {end}"
    return members, small, None


def scan_tar(path: str, on_bad: str = "error") -> tuple[list[tuple[str, list]], dict[str, bytes], list[str]]:
    """(key, members) per sample of one shard, members as (ext, offset, size, name); the raw `.cls`
    bytes by key (read during the scan: a seek per label would double the scan time); skipped names.

    Truncation is checked explicitly: every member must end inside the file, and the end-of-archive
    zero block must follow the last member (`tarfile` alone stops silently at a header cut short).
    """
    size = os.path.getsize(path)
    try:
        try:
            found, small, problem = _headers_fast(path, size)
        except _Exotic:
            found, small, problem = _headers_tarfile(path, size)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated tar shard ({e})") from None
    samples: dict[str, list] = {}
    cls: dict[str, bytes] = {}
    skipped: list[str] = []
    for name, off, n in found:
        key, ext = _split_name(name)
        samples.setdefault(key, []).append((ext, off, n, name))
        if ext == "cls":
            cls[key] = small.get(name, b"")
    if problem is not None:
        if on_bad != "skip":
            raise DataError(f"{path}: truncated tar shard ({problem})")
        # keep the samples that are complete; the last one may have lost members, so it goes too
        if samples:
            last = next(reversed(samples))
            skipped.append(f"{path}:{last}")
            del samples[last]
        log.warning("%s: truncated tar shard (%s); kept %d complete samples", path, problem, len(samples))
    return list(samples.items()), cls, skipped


def parse_label(path: str, name: str, raw: bytes) -> int:
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{path}:{name}: .cls is not ASCII digits ({raw[:16]!r})") from None
