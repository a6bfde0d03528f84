"""Inflate speed of the decompressors hubd can use, on the same archive: zlib (stdlib) vs ISA-L (`isal`).

    .venv/bin/python bench/bench_inflate.py [ARCHIVE]   (default: the 400 MB bench model)

hubd uses ISA-L when it is installed (it is a dependency) and zlib otherwise; this is why.
"""

from __future__ import annotations

import statistics
import sys
import time
import zlib
from pathlib import Path
from types import ModuleType

from isal import isal_zlib

CHUNK = 1 << 20


def inflate(lib: ModuleType, data: bytes) -> float:
    start = time.perf_counter()
    inflater = lib.decompressobj(wbits=31)
    for i in range(0, len(data), CHUNK):
        pending = data[i : i + CHUNK]
        while pending:
            inflater.decompress(pending, CHUNK)
            pending = inflater.unconsumed_tail
    return time.perf_counter() - start


def main() -> None:
    default = Path(__file__).parent / ".models" / "large_400mb.tar.gz"
    data = Path(sys.argv[1] if len(sys.argv) > 1 else default).read_bytes()
    results = {
        name: statistics.median(inflate(lib, data) for _ in range(3))
        for name, lib in (("zlib", zlib), ("isal", isal_zlib))
    }
    mib = len(data) / 2**20
    print(
        f"| inflate {mib:.0f} MiB archive | zlib {results['zlib']:.2f} s | isal {results['isal']:.2f} s | "
        f"isal is {results['zlib'] / results['isal']:.2f}x faster |"
    )


if __name__ == "__main__":
    main()
