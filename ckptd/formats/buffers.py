"""The byte buffers the format readers work on: whole files mapped with mmap, or bytes in tests."""

from __future__ import annotations

import mmap

Buffer = bytes | bytearray | memoryview | mmap.mmap
