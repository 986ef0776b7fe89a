"""Atomic file writes: temp sibling + fsync + rename, so a kill at any instant leaves either the
old file or the new one under the real name, never a half-written one."""

import os
import re
import uuid
from pathlib import Path

_TEMP_NAME = re.compile(r"^\.(.+)\.\d+\.[0-9a-f]{8}\.tmp$")


def temp_sibling(path):
    """A unique hidden sibling of `path` (created with the user's umask, unlike mkstemp)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def temp_target(name):
    """The file name a temp sibling named `name` was to become, or None if it is not one: a
    writer killed mid-write leaves its temp file behind, and its owner may remove it."""
    match = _TEMP_NAME.match(name)
    return match.group(1) if match else None


def fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, payload):
    """Write `payload` (bytes-like) to `path` atomically and durably."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
