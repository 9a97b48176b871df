"""The training loop of `omni train` (plain-PyTorch backend).

One process, or many under torchrun (DDP or FSDP2; gloo on CPU, NCCL on GPU). Per step:
``grad_accum`` micro-batches from the blended stream, the loss normalized by the *global* number
of scored tokens (so 2 processes with half the micro-batch compute exactly the loss and the
gradient of 1 process with the whole batch), gradient clipping, AdamW, the learning rate of
:func:`omni.run.lr_at`.

A non-finite loss or gradient skips the optimizer step (counted and logged); ``max_bad_steps``
in a row abort the run. SIGTERM and SIGUSR1 (preemption) finish the current step, save a
checkpoint and exit cleanly. Checkpoints (omni.train.checkpointing, in the run convention of
:mod:`omni.run`: run.yaml, metrics.jsonl, step_XXXXXX/) hold everything needed to continue bit
for bit: on a CPU, 2N steps in one run equal N steps, a kill, a resume and N more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch

from omni.config import RunConfig, to_dict
from omni.config.model import MROPE_KINDS
from omni.errors import OmniError
from omni.parallel.dist import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    init_distributed,
    parallelize,
)
from omni.run import (
    MetricsLog,
    StopFlag,
    discard_checkpoints,
    find_resume,
    list_checkpoints,
    lr_at,
    prune,
    save_run_config,
    set_rng_state,
    step_dir,
)
from omni.train.checkpointing import load_train_checkpoint, save_train_checkpoint
from omni.vocab import MODALITY_NAMES

_StopFlag = StopFlag  # its former name here


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linears, embeddings), none on norms and biases: the per-head QK-norm
    weights are 2-D [heads, head_dim] but norms (the megatron backend's rule too)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            norm = p.dim() < 2 or ".q_norm." in name or ".k_norm." in name
            (no_decay if norm else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _target_weights(batch: dict, cfg: RunConfig, modality_table: torch.Tensor) -> torch.Tensor:
    """float [B, T]: which targets count (stage) times the loss weight of their modality."""
    tc = cfg.train
    base = batch["loss_mask"] if tc.stage == "sft" else batch["valid_mask"]
    lw = torch.tensor([tc.loss_weights.text, tc.loss_weights.text, tc.loss_weights.image, tc.loss_weights.audio, 0.0])
    return base * lw[modality_table[batch["labels"]].long()]


def _routed_documents(path) -> bool:
    """Whether the token dataset at ``path`` holds routed documents (its manifest says; False without one)."""
    import json

    manifest = Path(path) / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text())["totals"].get("routed"))


HEAD_OF = {"<det>": "det", "<gen>": "gen"}
"""Routing token -> its head's key (``heads.<key>``, ``train.loss_weights.<key>``)."""


def _routing_slots(datasets, cfg: RunConfig) -> dict[str, int]:
    """Routing token -> K of the token datasets that hold routed documents (each written with its
    ``data.preprocess`` K, in its manifest); the heads' K must agree."""
    from omni.config.data import PreprocessConfig

    slots: dict[str, int] = {}
    for d in datasets:
        routed = d.manifest["totals"].get("routed", {})
        written = {**vars(PreprocessConfig()), **d.manifest.get("config", {})}
        for name, key in (("<det>", "det_queries"), ("<gen>", "gen_queries")):
            if routed.get(name):
                k = int(written[key])
                if slots.setdefault(name, k) != k:
                    raise OmniError(f"the token datasets disagree on the slots after {name}: {d.path} has {k}, an "
                                    f"earlier one {slots[name]} (data.preprocess.{key}); preprocess them alike")
    heads = cfg.heads.enabled
    for name, k in heads.items():
        if name in slots and slots[name] != k:
            key = HEAD_OF[name]
            raise OmniError(f"heads.{key}.n_queries={k} but the token datasets carry {slots[name]} slots after each "
                            f"{name} (preprocessed with data.preprocess.{key}_queries={slots[name]}); set "
                            f"heads.{key}.n_queries={slots[name]} or preprocess again")
        if name not in slots:
            key = HEAD_OF[name]
            raise OmniError(f"heads.{key}.enabled but no token dataset of data.paths holds a {name} document: the head "
                            f"would never train (preprocess data with {key} segments, docs/data.md)")
    return slots


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str = "auto", progress: bool = True):
        from omni.bundle import UnifiedTokenizer
        from omni.config import check_run
        from omni.data.packing import TokenDataset, build_stream
        from omni.io import check_writable
        from omni.parallel.megatron.config import check_megatron

        # Everything a user can get wrong is checked before a process group starts or a step is taken.
        check_run(cfg)
        if cfg.parallel.backend == "megatron":
            routed = [p for p in [*cfg.data.paths, *cfg.data.eval_paths] if _routed_documents(p)]
            if routed:
                raise OmniError(f"{', '.join(routed)} hold routed documents (<det>/<gen> and their slots): the "
                                "megatron backend does not handle them yet (it would score the slots as text); train "
                                "them with parallel.backend=torch")
        check_megatron(cfg)  # the torch backend refuses megatron-only keys; megatron checks its layout
        self.cfg, self.progress, self.resume = cfg, progress, resume
        if not cfg.data.tokenizer:
            raise OmniError("data.tokenizer is not set: give the tokenizer bundle the token datasets were made with")
        self.tok = UnifiedTokenizer.load(cfg.data.tokenizer)
        if cfg.model.vocab_size != self.tok.vocab.size:
            # The bundle defines the id space; the model recipe gives only the shape (litgpt does the same).
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.tok.vocab.size))
            self.cfg = cfg
        self.info: DistInfo = init_distributed(cfg.parallel)
        self.modality_table = self.tok.vocab.modality_table
        self.heads = self.heads_opt = None  # the task heads (heads.*): the torch backend builds them
        self._build()  # the backend's model(s) and optimizer; sets dp_rank / dp_world
        # the M-RoPE kinds train on 3-D positions: batches carry position_ids [3, B, L] (omni.rope.mrope_positions)
        self.mrope = cfg.model.rope.kind in MROPE_KINDS
        self.stream = build_stream(cfg.data, self.tok, self.dp_rank, self.dp_world, mrope=self.mrope,
                                   pairs=cfg.train.stage == "dpo")
        self.eval_datasets = [TokenDataset(p, self.tok) for p in cfg.data.eval_paths]
        self.slots = _routing_slots([p.ds for p in self.stream.packers] + self.eval_datasets, cfg)
        self.out = check_writable(cfg.train.out, "train.out")
        tc = cfg.train
        self.step = 0
        self.bad_in_row = 0
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.initialized_from: Path | None = None
        found = find_resume(self.out, resume)
        if resume == "none" and self.info.is_main and discard_checkpoints(self.out):
            # starting over deliberately: the old run's later steps must not outlive (or be resumed over) this one's
            print(f"--resume none: the earlier checkpoints in {self.out} were discarded", flush=True)
        if found is not None:
            self._restore(found)
        elif tc.init_from:
            self.initialized_from = self._init_weights(tc.init_from)
        self.resumed_from = found
        wandb = None
        if tc.wandb.enabled:
            wandb = {"project": tc.wandb.project, "entity": tc.wandb.entity, "mode": tc.wandb.mode,
                     "name": cfg.name, "config": to_dict(cfg)}
        self.log = MetricsLog(self.out, self.step, tc.tensorboard, self.info.is_main, wandb=wandb)

    def _build(self) -> None:
        """The plain-PyTorch backend: one OmniDecoder, DDP or FSDP2 over all processes, AdamW."""
        from omni.model import OmniDecoder

        cfg, tc = self.cfg, self.cfg.train
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = OmniDecoder(cfg.model).to(self.info.device)
        model.set_modality_table(self.modality_table.to(self.info.device))
        self.model = model
        self.module = parallelize(model, cfg.parallel, self.info, tc.activation_checkpointing)
        self.opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                     eps=tc.eps, foreach=False)
        self._build_heads()
        self.dp_rank, self.dp_world = self.info.rank, self.info.world  # every process is a data-parallel rank

    def _build_heads(self) -> None:
        """The task heads of ``heads.*`` (VisionLLM v2), replicated on every rank, with their own AdamW.

        Not inside DDP / FSDP: a rank whose micro-batches hold no routing token runs no head, which
        those wrappers do not allow; their gradients are averaged over the ranks by hand instead
        (:meth:`_sync_head_grads`). Their gradient is clipped on its own, at the same norm."""
        cfg, tc = self.cfg, self.cfg.train
        if not cfg.heads.enabled:
            return
        from omni.decoders.routing import RoutingHeads

        grid = self.tok.vocab.image_grid or (self.tok.image.grid if self.tok.image is not None else None)
        torch.manual_seed(cfg.seed + 1)  # identical on every rank, independent of the decoder's init
        self.heads = RoutingHeads(cfg.heads, cfg.model.dim, self.tok.vocab.specials, grid,
                                  image_tokenizer=self.tok.image).to(self.info.device)
        # fused: the heads hold hundreds of small tensors (a diffusers UNet's ~300), for which the
        # per-tensor loop costs 5x the fused kernel on a CPU (19 vs 4 ms a step for the demo's UNet)
        self.heads_opt = torch.optim.AdamW(_param_groups(self.heads, tc.weight_decay), lr=tc.lr,
                                           betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=True)

    def _sync_head_grads(self, n_routes: dict[str, int]) -> None:
        """Average the heads' gradients over the ranks (zeros where a rank ran no head); a head no
        rank ran this step gets no gradient at all, so AdamW leaves it as it is."""
        from omni.run import average_gradients

        params = list(self.heads.parameters())
        for q in params:
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        average_gradients(params)
        unused = [name for name in self.heads.queries.n_queries if not n_routes.get(name)]
        for name in unused:
            head = HEAD_OF[name]
            for q in [self.heads.queries.queries[name.strip("<>")], *self.heads.heads[head].parameters()]:
                q.grad = None

    # --- state ---------------------------------------------------------------------------
    def _full_states(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.module, options=opts),
                get_optimizer_state_dict(self.module, self.opt, options=opts))

    def _restore(self, path: Path) -> None:
        import json

        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from omni.run import TRAINER_STATE

        if json.loads((path / TRAINER_STATE).read_text()).get("backend") == "megatron":
            raise OmniError(f"cannot resume {path} with parallel.backend=torch: it was saved by the megatron backend "
                            "(resume with parallel.backend=megatron, or start from its weights with train.init_from "
                            "after `omni convert from-megatron`)")
        model_state, optim_state, state, rng = load_train_checkpoint(path)
        self._check_batch(path, state)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, model_state, options=opts)
        set_optimizer_state_dict(self.module, self.opt, optim_state, options=opts)
        self._restore_heads(path)
        self.stream.load_state_dict(state["data"])
        self.step = state["step"]
        self.bad_in_row, self.skipped_steps = state["bad_in_row"], state["skipped_steps"]
        self.tokens_seen = state["tokens_seen"]
        set_rng_state(state["rng"], rng)

    def _restore_heads(self, path: Path) -> None:
        from safetensors.torch import load_file

        from omni.decoders.routing import HEADS_WEIGHTS
        from omni.run import read_checkpoint

        has = (path / HEADS_WEIGHTS).is_file()
        if self.heads is None and not has:
            return
        if self.heads is None or not has:
            raise OmniError(f"cannot resume {path}: it was saved {'with' if has else 'without'} task heads and this run "
                            f"has {'none' if self.heads is None else 'heads.* enabled'}; resume with the same heads.*, "
                            "or start a new run from its weights with train.init_from")
        self.heads.load_state_dict(load_file(str(path / HEADS_WEIGHTS)))
        self.heads_opt.load_state_dict(read_checkpoint(path)[1]["heads"])

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: micro_batch_size x grad_accum x data-parallel ranks."""
        return self.cfg.train.micro_batch_size * self.cfg.train.grad_accum * self.dp_world

    def _check_batch(self, path: Path, state: dict) -> None:
        """A resume may change the number of processes, not the global batch. The data stream's
        position is global (sequence i goes to rank i % world), so with the same global batch
        every step reads the same sequences whatever the split over processes; with another
        global batch, the steps would not be the ones the schedule planned."""
        tc = self.cfg.train
        saved = state.get("global_batch")
        if saved is None:  # written before the global batch was saved: exactly the same split only
            saved = state.get("world", 0) * state.get("micro_batch_size", 0) * tc.grad_accum
        if saved == self.global_batch:
            return
        hint = []
        for key, have in (("train.grad_accum", tc.grad_accum), ("train.micro_batch_size", tc.micro_batch_size)):
            per = self.global_batch // have  # the other two factors
            if saved % per == 0:
                hint.append(f"{key}={saved // per}")
        raise OmniError(f"cannot resume {path}: it was saved with a global batch of {saved} sequences; this run has "
                        f"{self.global_batch} (micro_batch_size {tc.micro_batch_size} x grad_accum {tc.grad_accum} x "
                        f"data-parallel ranks {self.dp_world}). The number of processes may change, the global batch may not"
                        + (f": set {' or '.join(hint)}" if hint else ""))

    def _init_weights(self, source: str) -> Path:
        """Fine-tuning: the weights of checkpoint (or run folder) ``source``, nothing else of it."""
        from safetensors.torch import load_file

        from omni.bundle import UnifiedTokenizer
        from omni.checkpoint import TOKENIZER_DIR, WEIGHTS_FILE, resolve_checkpoint

        path = resolve_checkpoint(source)
        UnifiedTokenizer.load(path / TOKENIZER_DIR).check_compatible(
            self.tok.identity(), what=f"train.init_from={source} (the token datasets' bundle)")
        state = load_file(str(path / WEIGHTS_FILE))
        own = self._omni_shapes()
        bad = sorted(k for k in set(own) | set(state)
                     if k not in own or k not in state or own[k].shape != state[k].shape)
        if bad:
            detail = "; ".join(f"{k}: {tuple(state[k].shape) if k in state else 'absent'} in the checkpoint, "
                               f"{tuple(own[k].shape) if k in own else 'absent'} in this model" for k in bad[:4])
            raise OmniError(f"train.init_from={source}: its weights do not fit model.* of this run ({detail}"
                            f"{' ...' if len(bad) > 4 else ''})")
        self._load_omni_weights(state)
        return path

    def _omni_shapes(self) -> dict:
        """The OmniDecoder state-dict names of this run's model, with their (full) shapes' tensors."""
        return self.model.state_dict()

    def _load_omni_weights(self, state: dict) -> None:
        """Set the model to OmniDecoder weights ``state`` (full tensors, every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))  # FSDP shards it

    def save(self) -> Path | None:
        model_state, optim_state = self._full_states()  # collective under FSDP: every rank calls it
        path = None
        if self.info.is_main:
            trainer_state = {"data": self.stream.state_dict(), "bad_in_row": self.bad_in_row,
                             "skipped_steps": self.skipped_steps, "tokens_seen": self.tokens_seen,
                             "world": self.info.world, "micro_batch_size": self.cfg.train.micro_batch_size,
                             "global_batch": self.global_batch}
            path = save_train_checkpoint(self.out, self.step, model_state, optim_state, self.cfg.model,
                                              self.tok, self.cfg, trainer_state, heads=self.heads,
                                              heads_optim=None if self.heads is None else self.heads_opt.state_dict())
            prune(self.out, self.cfg.train.keep_last)
        barrier()
        return path

    # --- one optimizer step --------------------------------------------------------------
    def _sync_context(self, last: bool):
        if last or not self.info.distributed:
            return contextlib.nullcontext()
        if hasattr(self.module, "no_sync"):  # DDP: accumulate locally, all-reduce on the last micro-batch
            return self.module.no_sync()
        self.module.set_requires_gradient_sync(False)  # FSDP2
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        cfg, tc, dev = self.cfg, self.cfg.train, self.info.device
        lr = lr_at(self.step, tc.lr, tc.steps, tc.warmup_steps, tc.schedule, tc.min_lr, tc.decay_fraction)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batches = [self.stream.next_batch(tc.micro_batch_size) for _ in range(tc.grad_accum)]
        weights = [_target_weights(b, cfg, self.modality_table).to(dev) for b in batches]
        routed = [self._routes(b, w) for b, w in zip(batches, weights)]  # the slots' targets get weight 0
        routes, weights = [r for r, _ in routed], [w for _, w in routed]
        # the heads' losses are means over the global batch's routes of each kind (like the LM's over tokens)
        n_routes = {}
        if self.heads is not None:
            counts = torch.tensor([[sum(r.name == name for r in rs) for rs in routes] for name in self.slots],
                                  dtype=torch.float64).sum(1)
            n_routes = dict(zip(self.slots, all_reduce_sum(counts).long().tolist()))
        # Normalize by the scored-token weight of the whole global batch: exact equivalence to one
        # process with the whole batch, whatever the split over ranks and micro-batches.
        global_denom = all_reduce_sum(torch.stack([w.sum() for w in weights]).sum().double()).clamp_min(1.0)
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if tc.precision == "bf16"
                    else contextlib.nullcontext())
        # sums for logging: [total, ce, z, then ce and count per modality]
        sums = torch.zeros(3 + 2 * len(MODALITY_NAMES), dtype=torch.float64)
        head_sums: dict[str, float] = {}
        for i, (b, w, rs) in enumerate(zip(batches, weights, routes)):
            last = i == len(batches) - 1
            if last and hasattr(self.module, "set_requires_gradient_sync"):
                self.module.set_requires_gradient_sync(True)
            with self._sync_context(last), autocast:
                ids, doc_ids = b["input_ids"].to(dev), b["doc_ids"].to(dev)
                run_heads = self.heads is not None and bool(rs)
                # position_ids: [B, L], or [3, B, L] (time, height, width) for the M-RoPE kinds
                out = self.module(ids, labels=b["labels"].to(dev), loss_mask=w, doc_ids=doc_ids,
                                  position_ids=b["position_ids"].to(dev), return_hidden=run_heads,
                                  splice=self.heads.queries.splicer(rs) if run_heads else None)
                local = w.sum().clamp_min(1.0)  # the model's loss is a mean over this micro-batch
                loss = out.loss * (local / global_denom).float() * self.info.world
                if run_heads:
                    loss = loss + self._head_loss(out.hidden, ids, doc_ids, b, rs, n_routes, head_sums)
            loss.backward()
            with torch.no_grad():
                sums[0] += float(out.loss.detach()) * float(local)
                sums[1] += float(out.ce_loss.detach()) * float(local)
                sums[2] += float(out.z_loss.detach()) * float(local)
                for name, mean in out.loss_by_modality.items():
                    k = MODALITY_NAMES.index(name)
                    n = out.tokens_by_modality[name]
                    sums[3 + 2 * k] += float(mean) * n
                    sums[4 + 2 * k] += n
        all_reduce_sum(sums)
        grad_norm = self._clip()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        head_row = {}
        if self.heads is not None:
            self._sync_head_grads(n_routes)
            head_params = [p for p in self.heads.parameters() if p.grad is not None]
            head_norm = torch.nn.utils.clip_grad_norm_(head_params, max_norm) if head_params else torch.zeros(())
            names = sorted(head_sums)
            totals = all_reduce_sum(torch.tensor([head_sums[k] for k in names], dtype=torch.float64))
            head_row = {"grad_norm_heads": float(head_norm), **{f"routes_{k.strip('<>')}": n for k, n in n_routes.items()}}
            head_row.update({k: float(v) for k, v in zip(names, totals)})  # already means over the global routes
            if not torch.isfinite(head_norm):
                grad_norm = head_norm  # a non-finite head gradient skips the step like the decoder's
        loss_value = sums[0] / float(global_denom)
        bad, n_tokens = self._step_or_skip(loss_value, grad_norm, batches)
        row = {"step": self.step, "loss": float(loss_value), "ce": float(sums[1] / float(global_denom)),
               "z": float(sums[2] / float(global_denom)), "lr": lr, "grad_norm": float(grad_norm),
               "skipped": bool(bad), "skipped_steps": self.skipped_steps, "tokens": n_tokens, **head_row}
        weights_by_mod = {"text": tc.loss_weights.text, "special": tc.loss_weights.text,
                          "image": tc.loss_weights.image, "audio": tc.loss_weights.audio}
        for k, name in enumerate(MODALITY_NAMES[:4]):
            n = float(sums[4 + 2 * k])
            if n and weights_by_mod[name] > 0:  # the model's per-modality mean carries the weight: undo it
                row[f"loss_{name}"] = float(sums[3 + 2 * k]) / n / weights_by_mod[name]
        return row

    def _clip(self) -> torch.Tensor:
        """Clip the decoder's gradient to train.grad_clip; its global norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor

    def _step_or_skip(self, loss_value: torch.Tensor, grad_norm: torch.Tensor, batches: list) -> tuple[bool, int]:
        """The optimizer step, or none where any rank's loss or gradient norm is not finite (counted:
        ``max_bad_steps`` in a row abort the run); then the step and token counters move on. Returns
        (skipped, tokens of this step over all processes)."""
        bad = torch.tensor([0.0 if (torch.isfinite(loss_value) and torch.isfinite(grad_norm)) else 1.0])
        bad = bool(all_reduce_max(bad).item())
        opts = [o for o in (self.opt, self.heads_opt) if o is not None]
        for o in opts:
            if not bad:
                o.step()
            o.zero_grad(set_to_none=True)
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        self.skipped_steps += bad
        self.step += 1
        tc = self.cfg.train
        n_tokens = tc.micro_batch_size * tc.grad_accum * batches[0]["input_ids"].shape[1] * self.info.world
        self.tokens_seen += n_tokens
        return bad, n_tokens

    def _routes(self, batch: dict, weights: torch.Tensor) -> tuple[list, torch.Tensor]:
        """(the routing tokens of a micro-batch, their K slots checked; ``weights`` [B, T] with the targets
        of each routing token and its first K-1 slots at 0: they would be the slot placeholder)."""
        if not self.slots:
            return [], weights
        from omni.decoders.routing import find_routes, mask_slot_targets
        from omni.vocab import SLOT

        v = self.tok.vocab
        rs = find_routes(batch["input_ids"], self.slots, v.specials, v.special(SLOT))
        return rs, mask_slot_targets(weights, rs, 0.0)

    def _head_loss(self, hidden, ids, doc_ids, batch: dict, routes: list, n_routes: dict[str, int],
                   sums: dict[str, float]) -> torch.Tensor:
        """This micro-batch's share of the weighted head losses: each head's terms are a mean over its
        routes here, weighted by their share of the global batch's routes (x world: the decoder's
        gradients are averaged over the ranks, and so are the heads', :meth:`_sync_head_grads`)."""
        tc = self.cfg.train
        det = [r for r in routes if r.name == "<det>"]
        gen = [r for r in routes if r.name == "<gen>"]
        boxes = [torch.from_numpy(b) for b in self.stream.det_boxes(batch["spans"], batch["input_ids"], det)]
        latents = None
        if gen and "gen" in self.heads.heads:
            codes = self.heads.gen_codes(batch["input_ids"], gen, self.tok.vocab.id_to_code)
            latents = self.heads.gen_latents(self.tok.image, codes)
        terms = self.heads.losses(hidden.float(), ids, routes, boxes, doc_ids, gen_latents=latents)
        total = hidden.new_zeros((), dtype=torch.float32)
        for name, value in terms.items():
            key = name.split("_")[0]  # det_ce -> det, gen_diffusion -> gen
            mine = det if key == "det" else gen
            share = len(mine) / max(n_routes.get(f"<{key}>", 0), 1)
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * share
            total = total + getattr(tc.loss_weights, key) * value * share * self.info.world
        return total

    # --- validation ----------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Mean cross-entropy (nats per scored token, no z-loss, no loss weights) over the first
        ``eval_batches`` micro-batches per process of data.eval_paths, overall and per modality.

        The held-out stream is rebuilt each time (the same seed, epoch 0), so every validation reads
        the same sequences and the figures compare across steps; the sequences are split over the
        processes like training's, and the sums are reduced over them.
        """
        from omni.data.packing import BlendedSequences, DocumentPacker

        tc, dev = self.cfg.train, self.info.device
        packers = [DocumentPacker(d, self.cfg.data.seq_len, self.cfg.data.seed, self.tok.vocab, index=i,
                                  mrope=self.mrope) for i, d in enumerate(self.eval_datasets)]
        stream = BlendedSequences(packers, None, self.dp_rank, self.dp_world)
        sums = torch.zeros(2 + 2 * len(MODALITY_NAMES), dtype=torch.float64)  # [ce sum, count, (sum, count) per modality]
        self.module.eval()
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if tc.precision == "bf16"
                    else contextlib.nullcontext())
        try:
            for _ in range(tc.eval_batches):
                b = stream.next_batch(tc.micro_batch_size)
                w = b["valid_mask"].to(dev)
                rs, w = self._routes(b, w)  # slot targets are not scored here either
                splice = self.heads.queries.splicer(rs) if self.heads is not None and rs else None
                with autocast:
                    out = self.module(b["input_ids"].to(dev), labels=b["labels"].to(dev), loss_mask=w,
                                      doc_ids=b["doc_ids"].to(dev), position_ids=b["position_ids"].to(dev),
                                      splice=splice)
                n = float(w.sum())
                sums[0] += float(out.ce_loss) * n
                sums[1] += n
                for name, mean in out.loss_by_modality.items():
                    k = MODALITY_NAMES.index(name)
                    sums[2 + 2 * k] += float(mean) * out.tokens_by_modality[name]
                    sums[3 + 2 * k] += out.tokens_by_modality[name]
        finally:
            self.module.train()
        all_reduce_sum(sums)
        row = {"step": self.step, "val_loss": float(sums[0] / sums[1].clamp_min(1.0)), "val_tokens": int(sums[1])}
        for k, name in enumerate(MODALITY_NAMES[:4]):
            if sums[3 + 2 * k]:
                row[f"val_loss_{name}"] = float(sums[2 + 2 * k] / sums[3 + 2 * k])
        return row

    def layout(self) -> str:
        """How the processes are used, beyond data parallelism (the summary's batch line)."""
        return ""

    def summary(self, resume: str) -> str:
        """What this run is about to do, printed once at start (rank 0)."""
        from omni.model import count_parameters

        tc, dc = self.cfg.train, self.cfg.data
        docs = sum(len(p.ds) for p in self.stream.packers)
        tokens = sum(int(p.ds.lengths.sum()) for p in self.stream.packers)
        planned = tc.steps * self.global_batch * dc.seq_len
        lines = [
            f"model: {count_parameters(self.cfg.model) / 1e6:.2f}M parameters ({self.cfg.model.n_layers} layers, "
            f"dim {self.cfg.model.dim}, vocab {self.cfg.model.vocab_size})",
            f"data: {len(dc.paths)} dataset(s), {docs:,} documents, {tokens:,} tokens"
            + (f" (weights {', '.join(f'{w:.2f}' for w in self.stream.weights)})" if len(dc.paths) > 1 else "")
            + (f"; validation on {len(dc.eval_paths)} held-out dataset(s) every {tc.eval_every} steps"
               if tc.eval_every else ""),
            f"batch: {self.global_batch} sequences of {dc.seq_len} tokens per step = micro_batch_size "
            f"{tc.micro_batch_size} x grad_accum {tc.grad_accum} x data-parallel {self.dp_world}"
            + self.layout(),
            f"plan: {tc.steps:,} steps, {planned:,} tokens ({planned / max(tokens, 1):.2f} epochs of the blend)",
        ]
        if self.resumed_from is not None:
            how = "--resume auto: the newest intact checkpoint in train.out" if resume == "auto" else f"--resume {resume}"
            lines.append(f"start: step {self.step}, resumed from {self.resumed_from} ({how})")
        elif self.initialized_from is not None:
            lines.append(f"start: step 0 with the weights of {self.initialized_from} (train.init_from; fresh "
                         "optimizer, schedule and data stream)")
        else:
            why = "--resume none" if resume == "none" else f"no checkpoint in {self.out}"
            lines.append(f"start: step 0 from random init ({why})")
        return "\n".join(lines)

    # --- the run -------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        from omni.model import flops_per_token

        tc = self.cfg.train
        if self.info.is_main:
            save_run_config(self.cfg, self.out)
            print(self.summary(self.resume), flush=True)
        bar = tqdm(total=tc.steps, initial=self.step, unit="step", desc="train", disable=not (self.progress and self.info.is_main))
        last_saved = self.step if self.resumed_from is not None else -1
        stopped_by = None
        fpt = flops_per_token(self.cfg.model, self.cfg.data.seq_len)
        with StopFlag(announce=self.info.is_main) as stop:
            while self.step < tc.steps:
                t0 = time.perf_counter()
                row = self.train_step()
                dt = time.perf_counter() - t0
                row["tokens_per_s"] = row["tokens"] / dt
                if tc.peak_flops:
                    row["mfu"] = fpt * row["tokens_per_s"] / (tc.peak_flops * self.info.world)
                if self.bad_in_row >= tc.max_bad_steps:
                    self.log.write(row)
                    raise OmniError(f"training diverged: {self.bad_in_row} steps in a row had a non-finite loss or "
                                    f"gradient (last at step {self.step}, loss {row['loss']}, grad norm {row['grad_norm']}); "
                                    f"lower train.lr or raise train.max_bad_steps")
                if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.steps):
                    row.update(self.validate())
                if self.step % tc.log_every == 0 or row["skipped"] or self.step == tc.steps or "val_loss" in row:
                    self.log.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                flag = torch.tensor([float(stop.signal or 0)])
                stop_signal = int(all_reduce_max(flag).item())
                if self.step % tc.save_every == 0 or self.step == tc.steps or stop_signal:
                    self.save()
                    last_saved = self.step
                if stop_signal:
                    stopped_by = signal.Signals(stop_signal).name
                    break
        bar.close()
        if last_saved != self.step:
            self.save()
        self.log.close()
        if stopped_by and self.info.is_main:
            print(f"{stopped_by}: saved {step_dir(self.out, self.step)}; rerun the same command to resume",
                  flush=True)
        return {"step": self.step, "skipped_steps": self.skipped_steps, "stopped_by": stopped_by,
                "checkpoint": str(step_dir(self.out, self.step))}


def train(cfg: RunConfig, resume: str = "auto", progress: bool = True) -> dict:
    """Run (or continue) training; returns a summary. Under torchrun, call on every rank."""
    import torch.distributed as dist

    try:
        if cfg.parallel.backend == "megatron":
            from omni.train.megatron import MegatronTrainer

            return MegatronTrainer(cfg, resume, progress).run()
        if cfg.train.stage == "dpo":
            from omni.train.dpo import DPOTrainer

            return DPOTrainer(cfg, resume, progress).run()
        return Trainer(cfg, resume, progress).run()
    except KeyboardInterrupt:  # the second Ctrl-C: no checkpoint now, but say which one there is
        found = list_checkpoints(cfg.train.out)
        if os.environ.get("RANK", "0") == "0":
            print(f"aborted without saving; the newest checkpoint is {found[-1][1]}" if found else
                  "aborted without saving; no checkpoint was written", file=sys.stderr, flush=True)
        raise
    finally:
        if cfg.parallel.backend == "megatron":
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()

