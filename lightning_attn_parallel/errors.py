"""The one error path of every command-line entry point.

A user error (a bad key, value, path or plan) is a `UserError`: its message names the value and
the fix, and it ends the process as one line `error: ...` on stderr with exit code 2, no
traceback. Anything else that goes wrong during a run (a collective timing out, a disk filling, a
dead peer) keeps its full traceback in a log file and still prints one line, with exit code 1.

Entry points wrap their body in `run_or_exit`:

    from lightning_attn_parallel.errors import UserError, run_or_exit

    def main() -> None:
        ...                      # raise UserError("data.path='x' does not exist: ...")

    if __name__ == "__main__":
        run_or_exit(main, log_dir="runs/export")
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, TypeVar, Union

T = TypeVar("T")

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


class UserError(ValueError):
    """Input that cannot run: the message names the key, value or path and the fix."""


def rank() -> int:
    """This process's global rank: the process group's, else the launcher's environment, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # noqa: BLE001 - rank lookup must never mask the real error
        pass
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def first_line(error: BaseException, with_type: bool = False) -> str:
    """The first non-empty line of an error's message (gloo's source-file prefix and NCCL's
    advice dropped), optionally behind its type name: for one-line reports that quote a cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.startswith("[") and "] " in text:  # gloo prefixes its source file: drop it
        text = text.split("] ", 1)[1]
    text = text.split(". This is typically")[0]
    if with_type:
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text or type(error).__name__


def one_line(text: str) -> str:
    """Fold a multi-line message into one line (Hydra and OmegaConf write several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def did_you_mean(name: str, choices: Any, prefix: str = "") -> str:
    """' (did you mean PREFIXbest?)' for a misspelt name, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def exit_for_user_error(error: BaseException) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with code 2."""
    print(f"error: {one_line(str(error))}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def write_traceback_log(error: BaseException, log_dir: Union[str, Path, None]) -> Optional[Path]:
    """Write the traceback of `error` to `<log_dir>/error-rank<R>.log`; None if that fails."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    for folder in ([Path(log_dir)] if log_dir else []) + [Path.cwd(), Path(os.environ.get("TMPDIR", "/tmp"))]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"error-rank{rank()}.log"
            path.write_text(text)
            return path.resolve()
        except OSError:
            continue
    return None


def run_or_exit(main: Callable[[], T], log_dir: Union[str, Path, Callable[[], Any], None] = None,
                translate: Optional[Callable[[BaseException], Optional[UserError]]] = None) -> T:
    """Run `main()`; end any failure as one line on stderr.

    - `UserError` (or what `translate` turns into one): `error: <message>`, exit code 2.
    - Any other exception: its traceback goes to `<log_dir>/error-rank<R>.log` (`log_dir` may be
      a callable, read only on failure, for a run directory known only once the run starts), and
      one line `error: <first line> (traceback: <path>)`, exit code 1.
    - KeyboardInterrupt and SystemExit pass through unchanged.
    """
    try:
        return main()
    except UserError as error:
        exit_for_user_error(error)
    except Exception as error:  # noqa: BLE001 - the one place that reports every failure
        user_error = translate(error) if translate else None
        if user_error is not None:
            exit_for_user_error(user_error)
        folder = log_dir() if callable(log_dir) else log_dir
        path = write_traceback_log(error, folder)
        where = f" (traceback: {path})" if path else ""
        print(f"error: {first_line(error, with_type=True)}{where}", file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILURE)


__all__ = ["UserError", "run_or_exit", "did_you_mean", "exit_for_user_error", "write_traceback_log", "one_line",
           "first_line", "rank",
           "EXIT_USER_ERROR", "EXIT_FAILURE"]
