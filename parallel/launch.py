"""``python -m omni.parallel.launch``: torchrun, stopping cleanly when it is signalled.

Takes exactly torchrun's arguments (``--standalone --nproc_per_node 2 -m omni train RECIPE``).

Why not plain torchrun: its agent turns SIGTERM / SIGINT into a ``SignalException``, sends the same
signal to the workers and waits for them (up to 30 s, then SIGKILL). omni's trainer finishes its
step, saves a checkpoint and exits 0 on that signal (:mod:`omni.train.loop`), but the agent then
re-raises, so torchrun prints a traceback and exits 1 although the run stopped as asked. Here the
exception is caught once the workers are done: one line, exit 0 (130 for Ctrl-C, the shell's code
for an interrupted command).

SIGUSR1 (Slurm's ``--signal=B:USR1@lead`` preemption warning) is added to the signals the agent
forwards (torchrun's ``--signals-to-handle``, unless given), so a job script can signal the launcher
alone: without it, SIGUSR1's default action kills the agent and leaves the workers running on.
"""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""Forwarded to the workers by the agent (torchrun's default lacks SIGUSR1)."""


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import parse_args, run

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in argv):
        # torchrun's launcher sets TORCHELASTIC_SIGNALS_TO_HANDLE from this argument (default without
        # SIGUSR1), overriding the environment; older versions read the environment only
        args.signals_to_handle = SIGNALS
        os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = SIGNALS
    try:
        run(args)
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"omni.parallel.launch: {name} forwarded to the workers, which saved a checkpoint and stopped; "
              "rerun the same command to resume", file=sys.stderr, flush=True)
        return 130 if e.sigval == signal.SIGINT else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
