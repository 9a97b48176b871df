"""`omni model ...`: inspect decoder configs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter

    p = sub.add_parser("model", help="inspect decoder configs", formatter_class=Formatter)
    msub = p.add_subparsers(dest="model_cmd", metavar="COMMAND", required=True)
    i = msub.add_parser(
        "info",
        help="parameters and training FLOPs per token of a model recipe",
        description="Print the decoder shape of RECIPE (a YAML file with a `model:` mapping, or a "
        "shipped recipe such as models/7b), its parameter count and its training FLOPs per token "
        "(6*N_matmul + causal attention, see omni.model.flops_per_token).",
        formatter_class=Formatter,
    )
    i.add_argument("recipe", metavar="RECIPE", help="recipe file or shipped name (models/tiny, models/20m, ...)")
    i.add_argument("--seq-len", type=int, metavar="T", help="sequence length for the attention FLOPs (default: max_seq_len)")
    i.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of model keys, e.g. n_layers=4")
    i.set_defaults(func=_info)

    pl = msub.add_parser(
        "plan",
        help="memory per GPU, parallel layout and step time of a model recipe on N GPUs",
        description="Plan training RECIPE on --gpus N with megatron-core's layout (tensor, pipeline, "
        "context and data parallelism; bf16 weights, fp32 main gradients, fp32 Adam): parameters per "
        "pipeline stage, memory per GPU itemized (weights, gradients, optimizer, activations, CUDA/NCCL "
        "overhead) against the GPU's memory, FLOPs per token and per step, the pipeline bubble, and the "
        "step time and tokens/s at an assumed MFU. Without --tensor/--pipeline it suggests the smallest "
        "model-parallel layout that fits (TP up to 8 inside a node, then PP). The formulas and their "
        "sources are in omni/plan.py.\n\n"
        "Exit codes: 0 the plan fits, 1 it does not (the numbers say by how much), 2 bad input.",
        formatter_class=Formatter,
    )
    pl.add_argument("recipe", metavar="RECIPE", help="recipe file or shipped name (7b, models/7b, ...)")
    pl.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs in the job")
    pl.add_argument("--gpu", default="h100", metavar="KIND", help="a100, h100, h200 or b200 (default: h100)")
    pl.add_argument("--tensor", type=int, metavar="T", help="tensor-parallel size (giving --tensor or --pipeline turns the suggestion off)")
    pl.add_argument("--pipeline", type=int, metavar="P", help="pipeline-parallel size")
    pl.add_argument("--context", type=int, default=1, metavar="C", help="context-parallel size (default: 1)")
    pl.add_argument("--virtual-pipeline", type=int, default=1, metavar="V",
                    help="model chunks per pipeline stage, the interleaved schedule when > 1 (default: 1)")
    pl.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                    help="sequence parallelism within the TP group (default: on when --tensor > 1)")
    pl.add_argument("--micro-batch", type=int, default=1, metavar="B", help="sequences per micro-batch (default: 1)")
    pl.add_argument("--global-batch", type=int, metavar="G",
                    help="sequences per optimizer step (default: about 2^20 tokens, a multiple of DP x B)")
    pl.add_argument("--seq-len", type=int, metavar="S", help="sequence length (default: the recipe's max_seq_len)")
    pl.add_argument("--recompute", default="none", metavar="MODE",
                    help="activation recompute: none, selective (attention core) or full (default: none)")
    pl.add_argument("--precision", default="bf16", metavar="P", help="bf16 or fp8 (default: bf16)")
    pl.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True,
                    help="shard the Adam state over data-parallel ranks (ZeRO-1; default: on)")
    pl.add_argument("--mfu", type=float, default=0.40,
                    help="model-FLOPs utilization assumed for the step time, bubble excluded (default: 0.40)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of model keys, e.g. n_layers=40")
    pl.set_defaults(func=_plan)


def load_model_config(recipe: str, overrides=()):
    """The ModelConfig of a recipe's `model:` mapping (overrides are keys of ModelConfig)."""
    import yaml

    from omni.config import load_config, resolve_recipe
    from omni.config.model import ModelConfig
    from omni.errors import ConfigError

    try:
        path = resolve_recipe(recipe)
    except ConfigError:
        # a bare model name (`7b`) is the shipped models/7b
        try:
            path = resolve_recipe(f"models/{recipe}")
        except ConfigError:
            path = None
        if path is None or "/" in recipe:
            raise
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{path} has no `model:` mapping (a model recipe looks like recipes/models/tiny.yaml)")
    return load_config(ModelConfig, data["model"], overrides=list(overrides))


def _info(args) -> int:
    from omni.errors import OmniError
    from omni.model import count_parameters, flops_per_token

    cfg = load_model_config(args.recipe, args.overrides)
    T = args.seq_len or cfg.max_seq_len
    if T < 1:
        raise OmniError(f"--seq-len must be >= 1, got {T}")
    n = count_parameters(cfg)
    n_emb = cfg.vocab_size * cfg.dim
    f = flops_per_token(cfg, T)

    def human(x: float) -> str:
        for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if x >= scale:
                return f"{x / scale:.2f}{unit}"
        return f"{x:.0f}"

    print(f"recipe          {args.recipe}")
    print(f"shape           {cfg.n_layers} layers x dim {cfg.dim}, {cfg.n_heads} heads ({cfg.n_kv_heads} kv) "
          f"x {cfg.head_dim}, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}")
    print(f"options         qk_norm={cfg.qk_norm}/{cfg.qk_norm_type} swin_norm={cfg.swin_norm} "
          f"tie_embeddings={cfg.tie_embeddings} rope_theta={cfg.rope_theta:g} z_loss={cfg.z_loss:g}")
    print(f"parameters      {n:,} ({human(n)}); without the embedding {n - n_emb:,} ({human(n - n_emb)})")
    print(f"FLOPs/token     {f:,.0f} ({human(f)}) training (fwd+bwd) at seq_len {T}; forward {f / 3:,.0f}")
    return 0


def _human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _plan(args) -> int:
    import json

    from omni.errors import OmniError
    from omni.plan import GIB, HEADROOM, Layout, Training, get_gpu, make_plan, suggest

    cfg = load_model_config(args.recipe, args.overrides)
    gpu = get_gpu(args.gpu)
    if args.gpus < 1:
        raise OmniError(f"--gpus must be >= 1, got {args.gpus}")
    training = Training(seq_len=args.seq_len or cfg.max_seq_len, micro_batch=args.micro_batch,
                        global_batch=args.global_batch, recompute=args.recompute, precision=args.precision,
                        distributed_optimizer=args.distributed_optimizer, mfu=args.mfu)
    gpu.peak(training.precision)  # fp8 on a GPU without FP8: one line, exit 2
    if args.tensor is None and args.pipeline is None:
        if args.sequence_parallel is False:
            raise OmniError("--no-sequence-parallel needs a given layout (--tensor/--pipeline); suggestions use it")
        sug = suggest(cfg, args.gpus, gpu, training, args.context, args.virtual_pipeline)
        plan = sug.plan or sug.tried[-1]
        suggested, reason, tried = True, sug.reason, sug.tried
        alt = sug.full_recompute
    else:
        layout = Layout(args.tensor or 1, args.pipeline or 1, args.context, args.virtual_pipeline,
                        args.sequence_parallel)
        plan = make_plan(cfg, args.gpus, gpu, layout, training)
        suggested, tried, alt = False, [plan], None
        reason = "given" + ("" if plan.fits else f": does not fit, {plan.peak.total / GIB:.1f} GiB on the "
                            f"{plan.peak.stage} stage against {plan.budget_gib:.1f} GiB usable")

    if args.json:
        out = {"recipe": args.recipe, "suggested": suggested, "reason": reason, **plan.to_dict(),
               "tried": [{"tensor": q.layout.tensor, "pipeline": q.layout.pipeline, "context": q.layout.context,
                          "peak_gib": round(q.peak.total / GIB, 3), "fits": q.fits} for q in tried],
               "fits_with_full_recompute": None if alt is None else {
                   "tensor": alt.layout.tensor, "pipeline": alt.layout.pipeline, "context": alt.layout.context,
                   "peak_gib": round(alt.peak.total / GIB, 3)}}
        print(json.dumps(out, indent=2))
        return 0 if plan.fits else 1

    lay, tr, pr = plan.layout, plan.training, plan.params
    tag = "" if not suggested else " (suggested)" if plan.fits else " (the largest layout tried)"
    gib = lambda x: f"{x / GIB:8.2f}"  # noqa: E731
    print(f"recipe          {args.recipe}: {cfg.n_layers} layers x dim {cfg.dim}, {cfg.n_heads} heads "
          f"({cfg.n_kv_heads} kv) x {cfg.head_dim}, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}")
    print(f"GPUs            {plan.gpus} x {gpu.name}: {gpu.memory_gib:g} GiB, "
          f"{gpu.peak(tr.precision) / 1e12:g} TFLOP/s dense {tr.precision}")
    print(f"layout          {lay.describe()} CP={lay.context} DP={plan.data_parallel}, sequence parallel "
          f"{'on' if lay.sp else 'off'}, distributed optimizer {'on' if tr.distributed_optimizer else 'off'}, "
          f"recompute {tr.recompute}{tag}")
    print(f"                {reason}")
    print(f"batch           {plan.global_batch} sequences x {tr.seq_len} = {plan.global_batch * tr.seq_len:,} "
          f"tokens/step; micro-batch {tr.micro_batch}, {plan.microbatches} micro-batches per DP rank")
    print(f"parameters      {pr.total:,} ({_human(pr.total)}); embedding {pr.embedding:,}; output layer "
          f"{pr.output:,}; per block {pr.per_layer:,}")
    if lay.pipeline > 1:
        print(f"                stage 0 {pr.first_stage:,} (embedding + {cfg.n_layers // lay.pipeline} blocks), "
              f"last stage {pr.last_stage:,} (blocks + output layer)")
    stages = plan.memory
    print(f"{'memory per GPU (GiB)':<46}" + "".join(f"{m.stage + ' stage':>14}" for m in stages))
    opt = f"12 B / {plan.data_parallel * lay.context}" if tr.distributed_optimizer else "12 B"
    rows = [("parameters held (count)", lambda m: f"{_human(m.parameters):>8}"),
            ("weights (bf16, 2 B)", lambda m: gib(m.weights))]
    if tr.precision == "fp8":
        rows.append(("fp8 weight copies (2 B)", lambda m: gib(m.fp8_weight_copies)))
    rows += [("gradients (fp32 main, 4 B)", lambda m: gib(m.gradients)),
             (f"optimizer (Adam fp32, {opt})", lambda m: gib(m.optimizer)),
             ("activations: blocks", lambda m: gib(m.activation_blocks)),
             ("activations: embedding/logits", lambda m: gib(m.activations - m.activation_blocks)),
             ("CUDA/NCCL overhead", lambda m: gib(m.overhead)),
             ("total", lambda m: gib(m.total))]
    for label, f in rows:
        print(f"  {label:<44}" + "".join(f"{f(m):>14}" for m in stages))
    peak = plan.peak
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    print(f"                {verdict}: peak {peak.total / GIB:.1f} GiB ({peak.stage} stage) of {gpu.memory_gib:g} GiB, "
          f"budget {plan.budget_gib:.1f} GiB ({HEADROOM:.0%} headroom)")
    lb = plan.layer_bytes
    print(f"activations     per block and micro-batch on one GPU: none {lb['none'] / GIB:.3f} GiB, selective "
          f"{lb['selective'] / GIB:.3f}, full {lb['full'] / GIB:.4f}; {cfg.n_layers // lay.pipeline} blocks x "
          f"{plan.in_flight:g} micro-batch(es) in flight on the first stage")
    print(f"FLOPs           {plan.flops_per_token:,.0f} ({_human(plan.flops_per_token)}) per token (6N + causal "
          f"attention, seq {tr.seq_len}); {plan.flops_per_step:.3e} per step")
    bub = (f"pipeline bubble (P-1)/(V m) = {plan.bubble:.3f}" if lay.pipeline > 1 else "no pipeline bubble (PP=1)")
    print(f"time            {bub}; at MFU {tr.mfu:.0%} of {gpu.peak(tr.precision) / 1e12:g} TFLOP/s: "
          f"{plan.step_seconds:.2f} s/step, {plan.tokens_per_second:,.0f} tokens/s "
          f"({plan.tokens_per_second / plan.gpus:,.0f} per GPU)")
    for note in plan.notes:
        print(f"note            {note}")
    return 0 if plan.fits else 1
