"""What `import hubd_client` costs a whole process over `python -c pass`, with `import tensorflow_hub` beside it.

    .venv/bin/python bench/bench_import.py [--runs 21] [--tf-runs 5] [--python PATH]

Each figure is the median wall time of fresh processes (`python -c ...`, run from a temporary directory with no
PYTHONPATH, so the packages come from the interpreter's installation); the three commands take turns so that the
machine's load falls on all of them alike. The budget (issue #11): `import hubd_client` at most 40 ms more than
`python -c pass`. Writes bench/results/import.json; exits 1 when the budget is exceeded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 0.040
COMMANDS = {
    "pass": "pass",
    "hubd_client": "import hubd_client",
    "resolver": "import hubd_client.resolver",  # what the first resolve() adds: transport, handle parser
    "tensorflow_hub": "import tensorflow_hub",
}


def once(python: str, code: str, env: dict[str, str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-c", code], env=env, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="processes for `pass` and `import hubd_client`")
    parser.add_argument("--tf-runs", type=int, default=5, help="processes for `import tensorflow_hub` (0: skip)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to measure (default: this one)")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HUBD_"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as cwd:
        for name, code in COMMANDS.items():  # one untimed run each: warm the page cache and .pyc files
            if name != "tensorflow_hub" or args.tf_runs:
                once(args.python, code, env, cwd)
        for i in range(args.runs):
            for name, code in COMMANDS.items():
                if name != "tensorflow_hub" or i < args.tf_runs:
                    times[name].append(once(args.python, code, env, cwd))
    medians = {name: statistics.median(values) for name, values in times.items() if values}
    extra = medians["hubd_client"] - medians["pass"]
    print(f"interpreter: {args.python} ({len(times['pass'])} runs; tensorflow_hub {len(times['tensorflow_hub'])})")
    print(f"python -c pass                     median {medians['pass'] * 1000:8.1f} ms")
    print(f"python -c 'import hubd_client'     median {medians['hubd_client'] * 1000:8.1f} ms")
    print(f"  difference: import hubd_client   {extra * 1000:+8.1f} ms (budget {BUDGET_S * 1000:.0f} ms)")
    resolver_extra = medians["resolver"] - medians["pass"]
    print(f"python -c 'import hubd_client.resolver' median {medians['resolver'] * 1000:4.1f} ms")
    print(
        f"  difference: what resolve() imports {resolver_extra * 1000:+6.1f} ms (not budgeted: paid on first use)"
    )
    if "tensorflow_hub" in medians:
        tf_extra = medians["tensorflow_hub"] - medians["pass"]
        print(f"python -c 'import tensorflow_hub'  median {medians['tensorflow_hub'] * 1000:8.1f} ms")
        ratio = tf_extra / resolver_extra if resolver_extra > 0 else float("inf")
        print(
            f"  difference: import tensorflow_hub {tf_extra * 1000:+8.1f} ms ({ratio:.0f}x what resolve() imports)"
        )
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "import.json").write_text(
        json.dumps(
            {"python": args.python, "medians_s": medians, "samples_s": times, "budget_s": BUDGET_S}, indent=1
        )
    )
    sys.exit(0 if extra <= BUDGET_S else 1)


if __name__ == "__main__":
    main()
