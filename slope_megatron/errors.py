"""The base of every error meant for the user rather than for a traceback, and the launchers'
exit statuses (so a benchmark that runs `launch/pretrain.py` can tell "does not fit" from a
crash)."""

EXIT_USER_ERROR = 2  # a SlopeError: config, data, checkpoint or a stopped run
EXIT_OUT_OF_MEMORY = 3  # the GPU ran out of memory (the model or batch does not fit)


class SlopeError(Exception):
    """A problem the user can fix, whose message says what is wrong and what to do.

    The launchers print it as one `error: ...` line and exit with status 2.
    """


def out_of_memory_message(error: BaseException) -> str:
    """One line for a CUDA out-of-memory error: PyTorch's own first line (what it tried to
    allocate, what was free) and the settings that make a run fit."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"out of GPU memory: {first.rstrip('.')}. To fit, lower train.micro_batch_size "
            "(train.global_batch_size stays the same through more gradient accumulation), set "
            "train.activation_checkpointing=true, raise zero.stage, or use more GPUs "
            "(parallel.tensor / parallel.pipeline)")
