"""``python -m broker.lincheck FILE [--model register|cas|counter] [--budget SECONDS]
[--max-states N] [--failing OUT]``: check a JSON-lines history, print one line.

Exit status: 0 linearizable, 1 NOT linearizable, 2 unknown (budget exhausted) or an error
(one line on stderr, no traceback). This module reads the file and the clock, so it is an
adapter over the pure package.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from broker.lincheck._checker import Verdict, check
from broker.lincheck._history import HistoryError, dumps, loads
from broker.lincheck._models import MODELS

EXIT = {Verdict.OK: 0, Verdict.ILLEGAL: 1, Verdict.UNKNOWN: 2}
"""Exit status per verdict."""

ERROR_EXIT = 2
"""Exit status of bad input: like unknown, no verdict was reached."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage block: callers read stderr.
        self.exit(ERROR_EXIT, f"error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m broker.lincheck",
                description="Check that a JSON-lines history is linearizable.")
    p.add_argument("file", help="history, one JSON operation per line ('-' reads stdin)")
    p.add_argument("--model", choices=sorted(MODELS), default="cas")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="give up with 'unknown' after this long")
    p.add_argument("--max-states", type=int, default=None, metavar="N",
                   help="give up with 'unknown' after memoising this many states")
    p.add_argument("--failing", default=None, metavar="OUT",
                   help="when NOT linearizable, write the failing key's operations to OUT "
                        "(JSON lines, the input format) to study or re-check them alone")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = _parser().parse_args(argv)
    if args.budget is not None and not args.budget > 0:
        print("error: --budget must be a positive number of seconds", file=sys.stderr)
        return ERROR_EXIT
    try:
        if args.file == "-":
            history = loads(sys.stdin)
        else:
            with open(args.file, encoding="utf-8") as lines:
                history = loads(lines)
        deadline = None if args.budget is None else time.monotonic() + args.budget
        result = check(history, args.model, now=None if deadline is None else time.monotonic,
                       deadline=deadline, max_states=args.max_states)
    except HistoryError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return ERROR_EXIT
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {args.file}: cannot read ({type(exc).__name__})", file=sys.stderr)
        return ERROR_EXIT
    if args.failing is not None and result.verdict is Verdict.ILLEGAL:
        try:
            with open(args.failing, "w", encoding="utf-8") as out:
                out.writelines(line + "\n" for line in dumps(result.ops))
        except OSError as exc:
            print(f"error: {args.failing}: cannot write ({type(exc).__name__})",
                  file=sys.stderr)
            return ERROR_EXIT
    print(result.explain())
    return EXIT[result.verdict]


if __name__ == "__main__":
    sys.exit(main())
