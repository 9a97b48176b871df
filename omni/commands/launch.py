"""`omni launch slurm RECIPE ...`: render an sbatch script for `omni train`, save it with the resolved
config in the run folder, and submit it; `omni launch status|cancel RUN_DIR`."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter

    p = sub.add_parser("launch", help="launch training on a cluster (Slurm)", formatter_class=Formatter)
    lsub = p.add_subparsers(dest="launch_cmd", metavar="COMMAND", required=True)
    s = lsub.add_parser(
        "slurm",
        help="submit `omni train RECIPE` as a Slurm job (multi-node, requeued on preemption)",
        description="Resolve RECIPE with the overrides, write it as train.out/run.yaml, render an sbatch script "
        "(recipes/slurm/train.sbatch.j2, or --template) to train.out/job.sbatch and submit it with "
        "`sbatch --parsable`. The script runs one srun task per node, each `python -m omni.parallel.launch "
        "--nnodes N --nproc-per-node G` with a c10d rendezvous on the first node; Slurm's USR1 before the "
        "time limit (--signal=B:USR1@launch.signal_lead) and preemption's TERM make the trainers "
        "checkpoint, and the job requeues itself until the run is finished (or launch.max_requeues "
        "requeues in a row made no progress).",
        formatter_class=Formatter,
    )
    s.add_argument("recipe", metavar="RECIPE", help="a recipe YAML (a RunConfig), or a shipped recipe name")
    s.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=0, metavar="G",
                   help="GPUs (= processes) per node; 0: one CPU process per node with gloo (default 0)")
    s.add_argument("--partition", default="", metavar="P")
    s.add_argument("--account", default="", metavar="A")
    s.add_argument("--qos", default="", metavar="Q")
    s.add_argument("--time", default="", metavar="HH:MM:SS", help="the job's time limit")
    s.add_argument("--cpus-per-task", type=int, default=0, metavar="C")
    s.add_argument("--container-image", default="", metavar="IMG", help="pyxis/enroot image for srun")
    s.add_argument("--container-mounts", default="", metavar="SRC:DST,...", help="pyxis mounts (with --container-image)")
    s.add_argument("--env", action="append", default=[], metavar="K=V", help="an environment variable; repeat")
    s.add_argument("--job-name", default="", metavar="NAME", help="default: the recipe's name")
    s.add_argument("--template", metavar="FILE", help="your own Jinja2 sbatch template")
    s.add_argument("--python", default=sys.executable, metavar="PATH",
                   help="the Python on the compute nodes (default: this one, %(default)s)")
    s.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (full dotted keys)")
    s.set_defaults(func=_slurm)

    st = lsub.add_parser("status", help="a launched run: job, requeues, last step and loss", formatter_class=Formatter)
    st.add_argument("run_dir", metavar="RUN_DIR")
    st.set_defaults(func=_status)
    c = lsub.add_parser("cancel", help="cancel a launched run's job (scancel)", formatter_class=Formatter)
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.set_defaults(func=_cancel)
    r = lsub.add_parser("requeue-check", help="(used by the job script) exit 0 when the job should requeue itself",
                        formatter_class=Formatter)
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--job-id", required=True)
    r.set_defaults(func=_requeue_check)


def _slurm(args) -> int:
    from omni.config import RunConfig, check_run, load_config, resolve_recipe, save_config
    from omni.errors import OmniError
    from omni.parallel.megatron.config import check_megatron
    from omni.parallel.slurm import SCRIPT_FILE, SlurmJob, parse_env, render

    cfg = load_config(RunConfig, resolve_recipe(args.recipe), overrides=args.overrides)
    check_run(cfg)
    world = args.nodes * max(args.gpus_per_node, 1)
    if cfg.parallel.backend == "megatron":
        from omni.parallel.megatron.config import Machine

        # the cluster's GPUs, not this login node's, run it: check the layout as for Hopper with TE
        check_megatron(cfg, world=world, machine=Machine(te_version="assumed", capability=(9, 0)))
    else:
        check_megatron(cfg, world=world)
    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                   account=args.account, qos=args.qos, time=args.time, cpus_per_task=args.cpus_per_task,
                   container_image=args.container_image, container_mounts=args.container_mounts,
                   env=parse_env(args.env), job_name=args.job_name or cfg.name, python=args.python)
    run_dir = Path(cfg.train.out).resolve()
    script = render(job, cfg, run_dir, args.template)
    if args.dry_run:
        print(script, end="")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise OmniError("sbatch is not on PATH: run `omni launch slurm` on a Slurm login node (--dry-run prints the "
                        "script without submitting)")
    from omni.io import atomic_write_text, check_writable

    check_writable(run_dir, "train.out")
    save_config(cfg, run_dir / "run.yaml")
    atomic_write_text(run_dir / SCRIPT_FILE, script)
    r = subprocess.run([sbatch, "--parsable", str(run_dir / SCRIPT_FILE)], capture_output=True, text=True)
    if r.returncode != 0:
        raise OmniError(f"sbatch refused {run_dir / SCRIPT_FILE}: {r.stderr.strip() or r.stdout.strip()}")
    job_id = r.stdout.strip().split(";")[0]
    from omni.parallel.slurm import read_state, write_state

    write_state(run_dir, {**read_state(run_dir), "job_id": job_id, "requeues": []})
    print(f"submitted job {job_id}\nscript {run_dir / SCRIPT_FILE}\nlog {run_dir / f'slurm-{job_id}.out'}")
    return 0


def _status(args) -> int:
    import json

    from omni.errors import OmniError
    from omni.parallel.slurm import progress, read_state
    from omni.run import METRICS

    run_dir = Path(args.run_dir)
    state = read_state(run_dir)
    if not state:
        raise OmniError(f"{run_dir} is not a run launched by `omni launch slurm` (no slurm.json)")
    done, steps = progress(run_dir)
    job = state.get("job_id", "?")
    slurm_state = "unknown (no squeue here)"
    if shutil.which("squeue"):
        r = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True)
        slurm_state = r.stdout.strip() or "not in the queue (ended)"
    last = ""
    metrics = run_dir / METRICS
    if metrics.is_file():
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        if rows:
            last = f"; last logged step {rows[-1]['step']}, loss {rows[-1].get('loss', float('nan')):.4f}"
    print(f"job {job}: {slurm_state}; requeues {len(state.get('requeues', []))}; checkpoint step {done} of {steps}"
          f"{last}")
    return 0


def _cancel(args) -> int:
    from omni.errors import OmniError
    from omni.parallel.slurm import read_state

    job = read_state(Path(args.run_dir)).get("job_id")
    if not job:
        raise OmniError(f"{args.run_dir} has no launched job (no slurm.json)")
    if shutil.which("scancel") is None:
        raise OmniError("scancel is not on PATH")
    subprocess.run(["scancel", str(job)], check=False)
    print(f"cancelled job {job}")
    return 0


def _requeue_check(args) -> int:
    from omni.config import RunConfig, load_config
    from omni.parallel.slurm import requeue_decision
    from omni.run import RUN_CONFIG

    cfg = load_config(RunConfig, Path(args.run_dir) / RUN_CONFIG)
    again, why = requeue_decision(Path(args.run_dir), args.job_id, cfg.launch.max_requeues)
    print(f"omni: {why}", flush=True)
    return 0 if again else 1
