"""`omni data preprocess`: tokenize WebDataset shards into packed token datasets; `omni data needles`: the
toy world's long documents (needle-in-a-haystack items, albums, long text) for a long-context stage;
`omni data stories`: its long stories (N steps, one picture each) for long output; `omni data iterdpo`: a
policy's stories corrected by the toy world into IterDPO preference pairs."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter
    from omni.config import help_text
    from omni.config.data import PreprocessConfig

    p = sub.add_parser("data", help="preprocess raw shards into token datasets", formatter_class=Formatter)
    dsub = p.add_subparsers(dest="data_cmd", metavar="COMMAND", required=True)
    pre = dsub.add_parser(
        "preprocess",
        help="tokenize WebDataset shards into Megatron indexed token datasets + a manifest",
        description="Tokenize every sample of the input shards with a tokenizer bundle. Output: "
        "DIR/shards/*.bin/.idx (megatron-core IndexedDataset), DIR/manifest.json (documents and "
        "tokens per modality, skipped samples by reason). Shard i belongs to rank i % world; a "
        "rerun skips finished shards. The input format is in docs/data.md.",
        epilog=help_text(PreprocessConfig) + "\n(keys are relative to the recipe's data.preprocess section)",
        formatter_class=Formatter,
    )
    pre.add_argument("--input", action="extend", nargs="+", required=True, metavar="SHARDS",
                     help="tar shards, folders, globs or brace patterns (data-{000..009}.tar); several after "
                     "one flag, or the flag repeated")
    pre.add_argument("--tokenizer", required=True, metavar="BUNDLE", help="tokenizer bundle folder")
    pre.add_argument("--out", required=True, metavar="DIR", help="output folder")
    pre.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
    pre.add_argument("--rank", type=int, default=None, metavar="R",
                     help="this job's rank (default: the Slurm array task index, else 0)")
    pre.add_argument("--world", type=int, default=None, metavar="W",
                     help="number of jobs (default: the Slurm array task count, else 1)")
    pre.add_argument("--config", metavar="YAML", help="a recipe (its data.preprocess section is used)")
    pre.add_argument("--finalize", action="store_true",
                     help="tokenize nothing: check that every rank's shards are done and write the manifest (the "
                     "job after a Slurm array, see `omni launch slurm --preprocess`)")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, see below")
    pre.set_defaults(func=_preprocess)

    from omni.toy.needles import KINDS, SPLITS

    nd = dsub.add_parser(
        "needles",
        help="write the toy world's long documents (text needles, V-NIAH items, albums, long text) as shards",
        description="Write WebDataset shards of long documents sized in tokens of a tokenizer bundle "
        "(omni.toy.needles): 'needle' (a magic number hidden in real text, the question, the answer scored), "
        "'vniah' (an odd picture among three or more haystack pictures, the question, the answer scored), 'album' (pictures "
        "with their captions) and 'long_text' (real text). Haystack text, magic numbers and scenes are split "
        "by content, as `omni eval niah` reads them. A rerun keeps finished shards.",
        formatter_class=Formatter,
    )
    nd.add_argument("out", metavar="DIR", help="folder to write shards into")
    nd.add_argument("--tokenizer", required=True, metavar="BUNDLE", help="the bundle documents are sized for")
    nd.add_argument("--docs", type=int, default=1000, help="documents of each kind (default 1000)")
    nd.add_argument("--kinds", default="needle", help=f"comma-separated kinds: {', '.join(KINDS)} (default needle)")
    nd.add_argument("--max-tokens", type=int, default=256, help="longest document in tokens (default 256)")
    nd.add_argument("--min-tokens", type=int, default=None, help="shortest (default: a quarter of --max-tokens)")
    nd.add_argument("--split", default="train", choices=SPLITS, help="content split (default train)")
    nd.add_argument("--grid", type=int, default=1, help="objects on a grid of this many pixels (the demo's: 4)")
    nd.add_argument("--per-shard", type=int, default=1000, help="documents per shard (default 1000)")
    nd.add_argument("--seed", type=int, default=0)
    nd.set_defaults(func=_needles)

    from omni.eval.demo import DemoConfig
    from omni.toy.shapes import ORDERS

    world = DemoConfig()
    st = dsub.add_parser(
        "stories",
        help="write the toy world's long stories (\"draw A, then B, then ...\" and one picture per step) as shards",
        description="Write WebDataset shards of stories of N steps (omni.toy.stories, after LongWriter-V): the prompt "
        "\"draw a red circle, then a blue square, then ... .\" (a \"prompt\": true segment: only the pictures and "
        "<eos> are trained) and one picture per step, its object alone on the canvas. The pictures are toy-world "
        "scenes of --split and the prompt text is split by a hash of itself, as `omni eval longwrite` reads them. "
        "--size, --grid and --order default to `omni demo`'s world (demo.canvas, demo.grid, demo.order in a demo "
        "folder's config.yaml). A rerun keeps finished shards.",
        formatter_class=Formatter,
    )
    st.add_argument("out", metavar="DIR", help="folder to write shards into")
    st.add_argument("--steps", default="4,8", metavar="LO,HI",
                    help="story lengths, drawn per story from LO..HI inclusive (default 4,8; one number: that length)")
    st.add_argument("--stories", type=int, default=1000, help="stories (default 1000)")
    st.add_argument("--split", default="train", choices=SPLITS, help="content split (default train)")
    st.add_argument("--size", type=int, default=world.canvas, help=f"canvas side in pixels (default {world.canvas}, "
                    "the demo's; must equal the image tokenizer's image_size)")
    st.add_argument("--grid", type=int, default=world.grid,
                    help=f"objects on a grid of this many pixels (default {world.grid}, the demo's)")
    st.add_argument("--order", default=world.order, choices=ORDERS,
                    help=f"order a scene's objects become steps (default {world.order}, the demo's)")
    st.add_argument("--per-shard", type=int, default=1000, help="stories per shard (default 1000)")
    st.add_argument("--seed", type=int, default=0)
    st.set_defaults(func=_stories)

    it = dsub.add_parser(
        "iterdpo",
        help="sample long stories with a checkpoint, correct them with the toy world, write IterDPO preference pairs",
        description="LongWriter-V's IterDPO data on the toy world (omni.eval.longwrite): a checkpoint continues the "
        "prompts of --stories training stories (greedy, pictures only, stopping by itself); the judge reads each "
        "picture; a wrong or missing step is replaced by the world's right picture, and one drawn past the N steps "
        "by the end; each corrected step i gives a pair (the corrected output up to step i vs the original up to "
        "step i). Writes preference shards for `omni data preprocess` and OUT/iterdpo.json (the sampled outputs' "
        "length and quality scores, pairs per step). The world is the bundle's canvas with --grid and --order.",
        formatter_class=Formatter,
    )
    it.add_argument("out", metavar="DIR", help="folder to write preference shards into")
    it.add_argument("--checkpoint", required=True, metavar="DIR", help="the policy to sample (an SFT checkpoint)")
    it.add_argument("--judge", required=True, metavar="DIR", help="a toy-world judge (an `omni demo` folder's judge/)")
    it.add_argument("--steps", default="4,8", metavar="LO,HI", help="story lengths LO..HI inclusive (default 4,8)")
    it.add_argument("--stories", type=int, default=500, help="stories to sample (default 500)")
    it.add_argument("--grid", type=int, default=world.grid, help=f"as for `omni data stories` (default {world.grid})")
    it.add_argument("--order", default=world.order, choices=ORDERS, help=f"as for `omni data stories` (default {world.order})")
    it.add_argument("--rejected-prefix", default="original", choices=("original", "corrected"),
                    help="the rejected side of pair i: the original output up to step i ('original', the default: "
                    "LongWriter-V's pairs), or the corrected steps before i and the original step i ('corrected': "
                    "the two sides differ in step i alone)")
    it.add_argument("--batch-size", type=int, default=16, help="stories generated at once (default 16)")
    it.add_argument("--seed", type=int, default=0)
    it.set_defaults(func=_iterdpo)


def _needles(args) -> int:
    from omni.bundle import UnifiedTokenizer
    from omni.toy.needles import write_shards

    tok = UnifiedTokenizer.load(args.tokenizer)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    paths = write_shards(args.out, tok, args.docs, kinds, args.max_tokens, args.min_tokens, args.split, args.seed,
                         args.grid, args.per_shard, resume=True)
    print(f"wrote {args.docs} {args.split} documents of each of {', '.join(kinds)} ({len(paths)} shards) to {args.out}")
    return 0


def _steps(text: str) -> range:
    """--steps LO,HI (or one length) -> the story lengths."""
    from omni.errors import OmniError

    try:
        bounds = [int(v) for v in text.split(",")]
    except ValueError:
        bounds = []
    if len(bounds) not in (1, 2) or bounds[0] < 1 or bounds[-1] < bounds[0]:
        raise OmniError(f"--steps {text!r} is invalid: give LO,HI (story lengths LO..HI inclusive, "
                        "1 <= LO <= HI, for example 4,8) or one length >= 1")
    return range(bounds[0], bounds[-1] + 1)


def _stories(args) -> int:
    from omni.toy.stories import write_shards

    steps = _steps(args.steps)
    paths = write_shards(args.out, args.stories, steps, args.split, args.seed, args.size, args.grid, args.order,
                         per_shard=args.per_shard, resume=True)
    print(f"wrote {args.stories} {args.split} stories of {steps[0]} to {steps[-1]} steps ({len(paths)} shards) "
          f"to {args.out}")
    return 0


def _iterdpo(args) -> int:
    import json
    from pathlib import Path

    from omni.eval.judge import judged_suite
    from omni.eval.longwrite import iterdpo_samples, write_preference_shards
    from omni.io import atomic_write_text
    from omni.toy.stories import stories

    steps = _steps(args.steps)
    model, tok, judge = judged_suite(args.checkpoint, [], args.judge, "iterdpo", "--judge", "stories")
    # training prompts only: validation and test prompts are what `omni eval longwrite` measures
    sts = stories(args.stories, steps, "train", args.seed, tok.image.config.image_size, args.grid, args.order)
    samples, summary = iterdpo_samples(model, tok, judge, sts, f"train-{args.seed}", args.batch_size, args.seed,
                                       args.rejected_prefix)
    paths = write_preference_shards(args.out, samples) if samples else []
    summary.update(checkpoint=str(args.checkpoint), split="train", steps=list(steps), seed=args.seed,
                   shards=[p.name for p in paths])
    atomic_write_text(Path(args.out) / "iterdpo.json", json.dumps(summary, indent=1) + "\n")
    print(f"{summary['pairs']} preference pairs from {summary['stories']} training stories "
          f"({summary['stories_corrected']} corrected; sampled S_l {summary['length_score']:.1f}, "
          f"S_q {summary['quality_score']:.1f}) to {args.out}")
    return 0


def slurm_array_rank_world() -> tuple[int, int]:
    """(rank, world) of a Slurm array task (ids need not start at 0), else (0, 1)."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        task_min = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - task_min, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def _preprocess(args) -> int:
    from omni.cli import split_overrides
    from omni.config import load_section
    from omni.data.preprocess import MANIFEST, finalize, preprocess, skip_lines
    from omni.io import read_json

    inputs, extra = split_overrides(args.input)
    cfg = load_section("data.preprocess", args.config, extra + list(args.overrides))  # the later value wins
    if args.finalize:
        totals = finalize(inputs, args.tokenizer, args.out, cfg)
        print(f"wrote {os.path.join(args.out, MANIFEST)}: {totals['documents']} documents from "
              f"{totals['samples']} samples, {totals['tokens'].get('total', 0)} tokens, in all shards")
        return 0
    rank, world = slurm_array_rank_world()
    rank = args.rank if args.rank is not None else rank
    world = args.world if args.world is not None else world
    summary = preprocess(inputs, args.tokenizer, args.out, cfg, workers=args.workers, rank=rank,
                         world=world, progress=not args.quiet)
    print(f"rank {rank}/{world}: {summary['processed']} shard(s) processed, {summary['already_done']} already "
          f"done, {summary['documents']} documents from {summary['samples']} samples in {summary['seconds']:.1f}s")
    if summary["skipped"]:
        # printed even with --quiet (which only hides the progress bar): a skip is data lost from training
        print(f"skipped, by reason (first keys; each shard's {os.path.join(args.out, 'shards', 'NAME.json')} "
              "lists them):")
        print("\n".join(skip_lines(summary)))
    if summary["manifest"]:
        totals = read_json(os.path.join(args.out, MANIFEST), "the manifest just written is unreadable")["totals"]
        print(f"wrote {os.path.join(args.out, MANIFEST)}: {totals['documents']} documents from "
              f"{totals['samples']} samples, {totals['tokens'].get('total', 0)} tokens, in all shards")
    else:
        print("manifest.json not written yet: other ranks' shards are still missing")
    return 0
