"""How every ``worknode`` command ends when it cannot do its job: one line on stderr.

Every failure a command meets reaches :meth:`WorknodeGroup.main`, the one place that turns it
into exactly one line ``error: <message>`` on stderr, with the credentials of any URL in it
replaced by ``***``, and a non-zero exit status:

- ``2`` (:data:`EXIT_USAGE`): click's usage errors (a missing argument, a value out of range);
- ``1`` (:data:`EXIT_FAILURE`): everything else: a setting that does not validate
  (:class:`services._config.ConfigError`), any :class:`~broker.errors.WorknodeError`, an
  ``OSError`` on a file or a port, and an unexpected exception (a bug: its traceback is
  logged at DEBUG, the line says so);
- ``3`` (:data:`EXIT_UNCONFIRMED`): a write command published, but no replica confirmed it;
- ``130`` (:data:`EXIT_INTERRUPTED`): Ctrl-C (SIGINT), after a clean shutdown.

A bare group (``worknode``, ``worknode keys``) shows its help, as click does. Commands
raise rather than print; one that must end with a status of its own prints
:func:`error_line` and raises ``SystemExit`` (the write commands, :data:`EXIT_UNCONFIRMED`).

Network commands run their coroutine with :func:`run_until_signal`: SIGINT or SIGTERM cancels
it once, so its ``finally`` blocks and ``async with`` exits stop every task, server and
connection it started (no "Task exception was never retrieved", no orphaned nats-server),
and the command then exits 130 (SIGINT) or the status it chose for SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

import click

from broker.errors import WorknodeError
from broker.transport import redact_credentials

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_UNCONFIRMED",
    "EXIT_USAGE",
    "WorknodeGroup",
    "error_line",
    "run_until_signal",
]

T = TypeVar("T")

EXIT_FAILURE = 1
"""The command failed; the ``error:`` line says why."""
EXIT_USAGE = 2
"""The command line itself is wrong (click's usage errors)."""
EXIT_UNCONFIRMED = 3
"""A write was published but no replica confirmed it within the timeout."""
EXIT_INTERRUPTED = 130
"""Interrupted by SIGINT (128 + 2, the shell's convention), after a clean shutdown."""

log = logging.getLogger("worknode.cli")


def error_line(message: str) -> str:
    """``error: <message>`` on one line, credentials in URLs redacted."""
    text = " ".join(redact_credentials(message).split())
    return f"error: {text or 'unknown error'}"


def _describe(exc: BaseException) -> tuple[str, int]:
    """The message and exit status for an exception that ended a command."""
    if isinstance(exc, click.UsageError):
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return exc.format_message() + hint, exc.exit_code
    if isinstance(exc, click.ClickException):
        return exc.format_message(), exc.exit_code
    if isinstance(exc, WorknodeError):
        return str(exc) or type(exc).__name__, EXIT_FAILURE
    if isinstance(exc, OSError):
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror or exc}", EXIT_FAILURE
        return str(exc.strerror or exc), EXIT_FAILURE
    log.debug("unexpected exception", exc_info=exc)
    return (f"unexpected {type(exc).__name__}: {exc} (a bug; WORKNODE_LOG_LEVEL=DEBUG logs "
            "the traceback)"), EXIT_FAILURE


def _fail(message: str, status: int) -> NoReturn:
    sys.stdout.flush()
    click.echo(error_line(message), err=True)
    sys.exit(status)


class WorknodeGroup(click.Group):
    """A ``click.Group`` whose ``main`` ends every failure with one ``error:`` line."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; see the module docstring for what a failure prints."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.Abort:  # click's translation of KeyboardInterrupt (and EOF at a prompt)
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        except SystemExit:
            raise
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help, as click
            exc.show()
            sys.exit(exc.exit_code)
        except BaseException as exc:  # the one boundary: whatever ends a command, one line
            _fail(*_describe(exc))
        sys.exit(rv if isinstance(rv, int) else 0)


def run_until_signal(
    main: Callable[[], Coroutine[Any, Any, T]], *, sigterm_status: int = 128 + signal.SIGTERM
) -> T:
    """``asyncio.run(main())``, stopped cleanly by SIGINT or SIGTERM.

    The first signal cancels ``main`` (its clean-up runs; a second signal cancels again, for
    a clean-up that hangs). Once it has ended, however it ended (cancelled, returned, or an
    error the interruption caused), the process exits with :data:`EXIT_INTERRUPTED` after
    SIGINT and ``sigterm_status`` after SIGTERM (a service passes 0: a supervisor asked it
    to stop, and it did)."""
    received: list[int] = []

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            if received:
                log.warning("signal %d again: cancelling the clean-up", signum)
            received.append(signum)
            task.cancel()

        # The handlers stay until the loop closes: a signal during asyncio.run's own
        # clean-up (cancelling leftover tasks) must not raise KeyboardInterrupt into it.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        return await main()

    try:
        result = asyncio.run(guarded())
    except (Exception, asyncio.CancelledError) as exc:
        if not received:
            raise
        log.debug("interrupted by signal %d: %r", received[0], exc)
    else:
        if not received:
            return result
    sys.stdout.flush()
    sys.exit(EXIT_INTERRUPTED if received[0] == signal.SIGINT else sigterm_status)
