"""Faults at scale, each ending in one line on every process with its own exit status
(`illm.errors`): a write of the main process that failed (a full disk, a quota, a file-size
limit), and a collective operation that failed or timed out because another process or machine
stopped."""

from __future__ import annotations

from contextlib import contextmanager

import torch.distributed as dist

from illm.errors import LostPeerError, WriteFailedError, one_line


class WriteRecorder:
    """A file proxy that remembers the first OSError of a write: `torch.save` reports a failed
    write as "unexpected pos", without the reason (no space, file too large)."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.file.flush()


def describe_write_error(error: BaseException, recorder: WriteRecorder | None = None) -> str:
    cause = recorder.error if recorder is not None and recorder.error is not None else error
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.strerror} [errno {cause.errno}]"
    return one_line(cause)


def share_write_failure(accelerator, message: str) -> None:
    """Every process raises `WriteFailedError` when the main process's write failed (`message`
    non-empty there). A collective: every process calls it, and it replaces a barrier."""
    if accelerator.num_processes > 1:
        shared = [message if accelerator.is_main_process else ""]
        dist.broadcast_object_list(shared, src=0)
        message = shared[0]
    if message:
        raise WriteFailedError(message)


def is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    markers = (
        "gloo",
        "NCCL",
        "Connection closed by peer",
        "Connection reset by peer",
        "Timed out",
        "timed out",
    )
    return isinstance(error, RuntimeError) and dist.is_initialized() and any(m in text for m in markers)


@contextmanager
def lost_peers(run_dir):
    """Turn a failed or timed-out collective (another process or machine stopped) into one line
    naming the run's last intact checkpoint (`run.collective_timeout_s` bounds the wait)."""
    try:
        yield
    except (dist.DistError, RuntimeError) as error:
        if not is_collective_failure(error):
            raise
        from illm.checkpoint import latest_intact_checkpoint

        last = latest_intact_checkpoint(run_dir)
        raise LostPeerError(
            f"a collective operation failed, so another training process or machine stopped "
            f"({one_line(error)}); the last intact checkpoint is {last}: run the same command on every "
            "machine to resume from it"
        ) from None
