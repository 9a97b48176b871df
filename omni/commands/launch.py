"""`omni launch slurm`: render an sbatch script, save it with the resolved config in the run folder, and
submit it, for `omni train RECIPE` (the default), `omni tokenizer train image|audio` (``--tokenizer``)
or `omni data preprocess` as an array job plus a manifest job (``--preprocess``);
`omni launch status|cancel RUN_DIR`."""

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
    s.add_argument("recipe", metavar="RECIPE", nargs="?",
                   help="a recipe YAML (a RunConfig), or a shipped recipe name (optional with --tokenizer and "
                   "--preprocess: the defaults)")
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
    m = s.add_argument_group(
        "tokenizer training and preprocessing",
        "--tokenizer image|audio RECIPE --data ... --out DIR: `omni tokenizer train image|audio` on every node "
        "(data-parallel under torchrun, requeued like training). --preprocess --input ... --tokenizer BUNDLE "
        "--out DIR --array N: `omni data preprocess` as an array of N tasks (task i = rank i of N), then a "
        "job (--dependency=afterok) that checks every shard is done and writes the manifest.")
    m.add_argument("--tokenizer", metavar="image|audio|BUNDLE",
                   help="image or audio: train that tokenizer; with --preprocess: the tokenizer bundle to tokenize with")
    m.add_argument("--preprocess", action="store_true", help="submit `omni data preprocess` as an array job")
    m.add_argument("--data", action="extend", nargs="+", metavar="DIR_OR_SHARDS", help="tokenizer training data")
    m.add_argument("--eval-data", action="extend", nargs="+", metavar="DIR_OR_SHARDS",
                   help="held-out images for the image tokenizer's eval")
    m.add_argument("--input", action="extend", nargs="+", metavar="SHARDS", help="shards to preprocess")
    m.add_argument("--out", metavar="DIR", help="the tokenizer's or the token dataset's folder")
    m.add_argument("--array", type=int, metavar="N", help="preprocess array tasks")
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
    from omni.cli import split_overrides
    from omni.errors import OmniError

    # --data / --input take several values and so swallow the key=value overrides after them; and
    # without a recipe (allowed with --tokenizer / --preprocess) the first override lands in RECIPE
    moved = []
    for name in ("data", "eval_data", "input"):
        if getattr(args, name):
            plain, extra = split_overrides(getattr(args, name))
            setattr(args, name, plain)
            moved += extra
    if args.recipe and split_overrides([args.recipe])[1] and not Path(args.recipe).exists():
        moved.insert(0, args.recipe)
        args.recipe = None
    args.overrides = moved + list(args.overrides)
    if args.preprocess:
        return _submit_preprocess(args)
    if args.tokenizer is not None:
        if args.tokenizer not in ("image", "audio"):
            raise OmniError(f"--tokenizer {args.tokenizer!r}: one of image, audio (the tokenizer to train); with "
                            "--preprocess, the tokenizer bundle to tokenize with")
        return _submit_tokenizer(args)
    given = [f"--{n.replace('_', '-')}" for n in ("data", "eval_data", "input", "out", "array") if getattr(args, n) is not None]
    if given:
        raise OmniError(f"{', '.join(given)}: only with --tokenizer image|audio or --preprocess; a training run's "
                        "data and folder are recipe keys (data.paths=[...] train.out=DIR)")
    if args.recipe is None:
        raise OmniError("omni launch slurm: give a RECIPE to train (or --tokenizer image|audio, or --preprocess)")
    return _submit_train(args)


def _job(args, name: str):
    from omni.parallel.slurm import SlurmJob, parse_env

    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                   account=args.account, qos=args.qos, time=args.time, cpus_per_task=args.cpus_per_task,
                   container_image=args.container_image, container_mounts=args.container_mounts,
                   env=parse_env(args.env), job_name=args.job_name or name, python=args.python)
    job.check()
    return job


def _sbatch(script: Path, *flags: str) -> str:
    """Submit ``script`` with ``sbatch --parsable``; its job id."""
    from omni.errors import OmniError

    r = subprocess.run([shutil.which("sbatch"), "--parsable", *flags, str(script)], capture_output=True, text=True)
    if r.returncode != 0:
        raise OmniError(f"sbatch refused {script}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip().split(";")[0]


def _need_sbatch() -> None:
    from omni.errors import OmniError

    if shutil.which("sbatch") is None:
        raise OmniError("sbatch is not on PATH: run `omni launch slurm` on a Slurm login node (--dry-run prints the "
                        "script without submitting)")


def _absolute(items: list[str]) -> list[str]:
    """Paths as the compute nodes see them (the job may start elsewhere); named sources as given."""
    return [str(Path(i).resolve()) if Path(i).exists() else i for i in items]


def _submit_train(args) -> int:
    from omni.config import RunConfig, check_run, load_config, resolve_recipe, save_config
    from omni.parallel.megatron.config import check_megatron
    from omni.parallel.slurm import SCRIPT_FILE, render

    cfg = load_config(RunConfig, resolve_recipe(args.recipe), overrides=args.overrides)
    check_run(cfg)
    world = args.nodes * max(args.gpus_per_node, 1)
    if cfg.parallel.backend == "megatron":
        from omni.parallel.megatron.config import Machine

        # the cluster's GPUs, not this login node's, run it: check the layout as for Hopper with TE
        check_megatron(cfg, world=world, machine=Machine(te_version="assumed", capability=(9, 0)))
    else:
        check_megatron(cfg, world=world)
    job = _job(args, cfg.name)
    run_dir = Path(cfg.train.out).resolve()
    script = render(job, cfg, run_dir, args.template)
    if args.dry_run:
        print(script, end="")
        return 0
    _need_sbatch()
    from omni.io import atomic_write_text, check_writable

    check_writable(run_dir, "train.out")
    save_config(cfg, run_dir / "run.yaml")
    atomic_write_text(run_dir / SCRIPT_FILE, script)
    return _submitted(run_dir, "train", cfg, _sbatch(run_dir / SCRIPT_FILE))


def _submitted(run_dir: Path, kind: str, cfg, job_id: str) -> int:
    from omni.parallel.slurm import SCRIPT_FILE, read_state, write_state

    write_state(run_dir, {**read_state(run_dir), "kind": kind, "job_id": job_id, "requeues": [],
                          "max_requeues": cfg.launch.max_requeues})
    print(f"submitted job {job_id}\nscript {run_dir / SCRIPT_FILE}\nlog {run_dir / f'slurm-{job_id}.out'}")
    return 0


def _section_overrides(section: str, overrides: list[str]) -> list[str]:
    """Overrides relative to ``section`` (``steps=100``) or full keys (``tokenizer.image.steps=100``,
    ``launch.max_requeues=5``) -> full keys."""
    return [o if o.startswith((section + ".", "launch.")) else f"{section}.{o}" for o in overrides]


def _submit_tokenizer(args) -> int:
    from omni.config import RunConfig, load_config, resolve_recipe, save_config
    from omni.errors import OmniError
    from omni.media import expand_sources
    from omni.parallel.slurm import RECIPE_FILE, SCRIPT_FILE, render

    kind = args.tokenizer
    if not args.data or not args.out:
        raise OmniError(f"--tokenizer {kind} needs --data DIR_OR_SHARDS ... and --out DIR")
    if args.eval_data and kind == "audio":
        raise OmniError("--eval-data: the audio tokenizer trainer takes no eval data (evaluate it with "
                        "`omni eval audio-tokenizer`)")
    section = f"tokenizer.{kind}"
    cfg = load_config(RunConfig, resolve_recipe(args.recipe) if args.recipe else None,
                      overrides=_section_overrides(section, args.overrides))
    world = args.nodes * max(args.gpus_per_node, 1)
    batch = cfg.tokenizer.image.batch_size if kind == "image" else cfg.tokenizer.audio.train.batch_size
    key = f"{section}.batch_size" if kind == "image" else f"{section}.train.batch_size"
    if batch % world:
        raise OmniError(f"{key}={batch} is the global batch: it must divide by the {world} processes "
                        f"(--nodes {args.nodes} x {max(args.gpus_per_node, 1)} per node)")
    data = _absolute(args.data)
    expand_sources(data, kind)  # missing data fails here, not on the cluster
    evals = _absolute(args.eval_data or [])
    if evals:
        expand_sources(evals, kind)
    out = Path(args.out).resolve()
    command = ["tokenizer", "train", kind, "--config", str(out / RECIPE_FILE), "--data", *data,
               *(["--eval-data", *evals] if evals else []), "--out", str(out), "--quiet"]
    job = _job(args, f"{kind}-tokenizer")
    script = render(job, cfg, out, args.template, command)
    if args.dry_run:
        print(script, end="")
        return 0
    _need_sbatch()
    from omni.io import atomic_write_text, check_writable

    check_writable(out, "--out")
    save_config(cfg, out / RECIPE_FILE)
    atomic_write_text(out / SCRIPT_FILE, script)
    return _submitted(out, f"tokenizer {kind}", cfg, _sbatch(out / SCRIPT_FILE))


def _submit_preprocess(args) -> int:
    from omni.config import RunConfig, load_config, resolve_recipe, save_config
    from omni.errors import OmniError
    from omni.media import list_shards
    from omni.parallel.slurm import render_preprocess, write_state

    if not (args.input and args.tokenizer and args.out) or args.array is None:
        raise OmniError("--preprocess needs --input SHARDS ..., --tokenizer BUNDLE, --out DIR and --array N")
    if args.array < 1:
        raise OmniError(f"--array {args.array}: a preprocess array needs at least one task")
    inputs = _absolute(args.input)
    n_shards = len(list_shards(inputs))
    if args.array > n_shards:
        raise OmniError(f"--array {args.array} tasks for {n_shards} input shard(s): a task gets shards s with "
                        f"s % {args.array} == its index, so {args.array - n_shards} would get none; use "
                        f"--array {n_shards} or fewer")
    bundle = Path(args.tokenizer).resolve()
    if not bundle.is_dir():
        raise OmniError(f"--tokenizer {args.tokenizer}: no such tokenizer bundle folder")
    cfg = load_config(RunConfig, resolve_recipe(args.recipe) if args.recipe else None,
                      overrides=_section_overrides("data.preprocess", args.overrides))
    out = Path(args.out).resolve()
    folder = out / "slurm"
    recipe = folder / "preprocess.yaml"
    common = ["data", "preprocess", "--input", *inputs, "--tokenizer", str(bundle), "--out", str(out),
              "--config", str(recipe), "--quiet"]
    job = _job(args, "preprocess")
    array = render_preprocess(job, out, [*common, "--workers", str(max(args.cpus_per_task, 1))], args.array,
                              args.template)
    manifest = render_preprocess(job, out, [*common, "--finalize"], None, args.template)
    if args.dry_run:
        print(array, end="")
        print("\n# ---- the manifest job, submitted with --dependency=afterok:<the array job> ----\n")
        print(manifest, end="")
        return 0
    _need_sbatch()
    from omni.io import atomic_write_text, check_writable

    check_writable(out, "--out")
    save_config(cfg, recipe)
    atomic_write_text(folder / "preprocess.sbatch", array)
    atomic_write_text(folder / "manifest.sbatch", manifest)
    array_id = _sbatch(folder / "preprocess.sbatch")
    # afterok: only once every array task succeeded; a failed task cancels it rather than leaving it pending
    manifest_id = _sbatch(folder / "manifest.sbatch", f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes")
    write_state(out, {"kind": "preprocess", "job_id": array_id, "manifest_job_id": manifest_id,
                      "array": args.array})
    print(f"submitted array job {array_id} ({args.array} tasks) and manifest job {manifest_id}\n"
          f"scripts {folder / 'preprocess.sbatch'}, {folder / 'manifest.sbatch'}\nlogs {folder}")
    return 0


def _squeue_state(job: str) -> str:
    if not shutil.which("squeue"):
        return "unknown (no squeue here)"
    r = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True)
    states = sorted(set(r.stdout.split()))  # an array job: one line per task
    return ",".join(states) or "not in the queue (ended)"


def _status(args) -> int:
    import json

    from omni.errors import OmniError
    from omni.parallel.slurm import progress, read_state
    from omni.run import METRICS

    run_dir = Path(args.run_dir)
    state = read_state(run_dir)
    if not state:
        raise OmniError(f"{run_dir} is not a run launched by `omni launch slurm` (no slurm.json)")
    job = state.get("job_id", "?")
    if state.get("kind") == "preprocess":
        from omni.data.preprocess import MANIFEST

        marker = run_dir / "preprocess.json"
        total = json.loads(marker.read_text())["n_shards"] if marker.is_file() else "?"
        done = sum(1 for f in (run_dir / "shards").glob("*.json") if not f.name.endswith(".det.json"))
        manifest = "written" if (run_dir / MANIFEST).is_file() else "not written yet"
        print(f"array job {job} ({state.get('array')} tasks): {_squeue_state(job)}; manifest job "
              f"{state.get('manifest_job_id')}: {_squeue_state(state.get('manifest_job_id'))}; shards done {done} "
              f"of {total}; manifest {manifest}")
        return 0
    done, steps, finished = progress(run_dir)
    last = ""
    metrics = run_dir / METRICS
    if metrics.is_file():
        rows = [r for r in (json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip())
                if "loss" in r and "step" in r]
        if rows:
            last = f"; last logged step {rows[-1]['step']}, loss {rows[-1]['loss']:.4f}"
    print(f"{state.get('kind', 'train')} job {job}: {_squeue_state(job)}; requeues {len(state.get('requeues', []))}; "
          f"checkpoint step {done} of {steps}{' (finished)' if finished else ''}{last}")
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
    from omni.parallel.slurm import read_state, requeue_decision

    max_requeues = read_state(Path(args.run_dir)).get("max_requeues", 3)
    again, why = requeue_decision(Path(args.run_dir), args.job_id, max_requeues)
    print(f"omni: {why}", flush=True)
    return 0 if again else 1
