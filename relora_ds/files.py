"""Writing a file so that a reader, or a job killed halfway, sees the old file or the new one, never a part of it.

    atomic_write("run/compare.json", json.dumps(report))               # text
    atomic_write("run/loss.png", lambda f: fig.savefig(f, format="png"))  # a writer of a binary file

The content goes into a temporary file beside `path` (same directory, so the rename stays on one file system),
is flushed and fsynced, and is then renamed over `path` (os.replace, atomic on POSIX); on any error the temporary
file is removed and the old `path` is left as it was. Every file relora-ds writes in one piece goes through here.
"""

import os
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
