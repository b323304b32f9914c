"""Pass rate of the converter on the ONNX backend test data shipped in the `onnx` package.

    .venv/bin/python bench/onnx_backend.py [--failures] [--unsupported]

Prints per suite: cases, supported (the converter accepts them), passed, failed, and the pass
rate over supported cases and over all cases.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.unit.onnx.backend_cases import all_cases, run_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--failures", action="store_true", help="list failing cases")
    parser.add_argument("--unsupported", action="store_true", help="list unsupported cases")
    args = parser.parse_args()
    start = time.perf_counter()
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    details: list[tuple[str, str, str]] = []
    for case in all_cases():
        status, detail = run_case(case)
        counts[case.suite][status] += 1
        if status == "fail" or (status == "unsupported" and args.unsupported):
            details.append((status, case.name, detail))
    print(f"{'suite':<18}{'cases':>7}{'supported':>11}{'passed':>8}{'failed':>8}{'random':>8}")
    total: collections.Counter[str] = collections.Counter()
    for suite, c in counts.items():
        total.update(c)
        supported = c["pass"] + c["fail"]
        print(
            f"{suite:<18}{sum(c.values()):>7}{supported:>11}{c['pass']:>8}{c['fail']:>8}"
            f"{c['random']:>8}"
        )
    supported = total["pass"] + total["fail"]
    print(
        f"pass rate: {total['pass']}/{supported} supported cases "
        f"({100 * total['pass'] / max(supported, 1):.1f}%), "
        f"{total['pass']}/{sum(total.values())} of all cases "
        f"({100 * total['pass'] / max(sum(total.values()), 1):.1f}%) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if args.failures or args.unsupported:
        for status, name, detail in details:
            print(f"{status:<12}{name}: {detail[:300]}")


if __name__ == "__main__":
    main()
