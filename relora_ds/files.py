"""Writing a file so that a reader, or a job killed halfway, sees the old file or the new one, never a part of it.

    atomic_write("run/compare.json", json.dumps(report))               # text
    atomic_write("run/loss.png", lambda f: fig.savefig(f, format="png"))  # a writer of a binary file

The content goes into a temporary file beside `path` (same directory, so the rename stays on one file system),
is flushed and fsynced, and is then renamed over `path` (os.replace, atomic on POSIX); on any error the temporary
file is removed and the old `path` is left as it was. Every file relora-ds writes in one piece goes through here.
Also here: `parse_byte_size`, the sizes of the files it writes in shards ("5GB", "2GiB").
"""

import os
import re
import tempfile


def atomic_write(path: str, content) -> str:
    """Write `content` (str, bytes, or a function that writes into a binary file object) to `path` atomically,
    making its directory if needed; return `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_byte_size(text) -> int:
    """Bytes in "5GB", "500MB", "2GiB", "1.5GB" or a plain number of bytes (GB = 10^9, GiB = 2^30, as in Hugging
    Face's max_shard_size); 0 when `text` is not a size (the caller names its option in the error)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return max(text, 0)
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", str(text), flags=re.IGNORECASE)
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]) if match else 0
