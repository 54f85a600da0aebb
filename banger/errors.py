"""The one error hierarchy. Every failure banger reports is a BangerError.

Each carries a stable ``code`` (for --json), a human ``message``, a ``hint`` that
says what to do, and the process ``exit_code``.  Adapters translate OSError,
netlink, HTTP and subprocess errors into these at their edge; the CLI maps them
to output in one place (banger.cli.output.emit).
"""

from __future__ import annotations

# Documented exit codes (README.md, "Exit codes").
EXIT_OK = 0
EXIT_ERROR = 1          # generic failure
EXIT_USAGE = 2          # bad flags / arguments (also click's own usage errors)
EXIT_NOT_FOUND = 3      # no such VM / image / kernel / snapshot
EXIT_CONFLICT = 4       # name taken, resource in use, wrong state
EXIT_BUSY = 5           # a lock could not be taken in time
EXIT_HOST = 6           # host is missing something (tool, device, permission)
EXIT_TIMEOUT = 7        # guest did not become ready / operation timed out
EXIT_EXTERNAL = 8       # an external command, registry or VMM failed
EXIT_INTERRUPTED = 130


class BangerError(Exception):
    code = "error"
    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None, *, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details or {}

    def to_dict(self) -> dict:
        d = {"code": self.code, "message": self.message, "hint": self.hint}
        if self.details:
            d["details"] = self.details
        return d


class UsageError(BangerError):
    code = "usage"
    exit_code = EXIT_USAGE


class InvalidName(UsageError):
    code = "invalid_name"


class NotFound(BangerError):
    code = "not_found"
    exit_code = EXIT_NOT_FOUND


class Conflict(BangerError):
    code = "conflict"
    exit_code = EXIT_CONFLICT


class InvalidState(Conflict):
    code = "invalid_state"


class LockTimeout(BangerError):
    code = "lock_timeout"
    exit_code = EXIT_BUSY


class HostError(BangerError):
    code = "host"
    exit_code = EXIT_HOST


class GuestTimeout(BangerError):
    code = "timeout"
    exit_code = EXIT_TIMEOUT


class CommandFailed(BangerError):
    """An external command exited non-zero. Carries argv, exit code and stderr tail."""

    code = "command_failed"
    exit_code = EXIT_EXTERNAL

    def __init__(self, argv: list[str], returncode: int, stderr: str = "", hint: str | None = None):
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        msg = f"command failed (exit {returncode}): {' '.join(argv)}"
        if tail:
            msg += f"\n{tail}"
        super().__init__(msg, hint, details={"argv": argv, "returncode": returncode, "stderr_tail": tail})
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class ExternalError(BangerError):
    """A registry, VMM API or other external peer failed."""

    code = "external"
    exit_code = EXIT_EXTERNAL


class IntegrityError(ExternalError):
    code = "integrity"


class LimitExceeded(ExternalError):
    """Input from outside (a registry, an image, a guest) is larger than a fixed or configured bound."""

    code = "limit_exceeded"


class NoSpace(HostError):
    """The filesystem banger writes to has not enough free space (checked before, or hit while writing)."""

    code = "no_space"
