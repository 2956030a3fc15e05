"""The base of every error meant for the user rather than for a traceback, and the launchers'
exit statuses (so a benchmark that runs `launch/pretrain.py` can tell "does not fit" from a
crash)."""

EXIT_USER_ERROR = 2  # a SlopeError: config, data, checkpoint, a full disk or a stopped run
EXIT_OUT_OF_MEMORY = 3  # the GPU ran out of memory (the model or batch does not fit)
# stopped by SIGTERM/SIGINT/SIGUSR1 (train.stop_signals) after saving a checkpoint, or during
# start-up before there was anything to save: rerun (or requeue) the same command to resume.
# 75 is sysexits.h's EX_TEMPFAIL ("a temporary failure; the user is invited to retry").
EXIT_STOPPED_BY_SIGNAL = 75


class SlopeError(Exception):
    """A problem the user can fix, whose message says what is wrong and what to do.

    The launchers print it as one `error: ...` line and exit with status 2.
    """


def out_of_memory_message(error: BaseException) -> str:
    """One line for a CUDA out-of-memory error: what PyTorch failed to allocate and what was
    free (its message up to there; the allocator's tuning advice is left out), then the
    settings that make a run fit."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if " is free." in text:  # "... Tried to allocate X. GPU 0 has ... of which Y is free."
        text = text[:text.index(" is free.") + len(" is free")]
    return (f"out of GPU memory: {text.rstrip('.')}. To fit: lower train.micro_batch_size "
            "(train.global_batch_size stays the same through more gradient accumulation), set "
            "train.activation_checkpointing=true, or shard the model state over more GPUs "
            "(zero.stage with data parallelism, parallel.tensor, parallel.pipeline)")
