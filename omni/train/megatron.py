"""`omni train` on megatron-core (``parallel.backend=megatron``): tensor, pipeline and data parallel.

The same loop as the plain-PyTorch backend (:class:`omni.train.loop.Trainer`: schedule, data stream,
loss normalization, non-finite skipping, metrics, validation, signals, checkpoints and ``--resume
auto``); what changes is what a step runs on:

* the model is megatron-core ``GPTModel`` chunks (:mod:`omni.parallel.megatron.model`), one per
  virtual-pipeline stage of this pipeline rank, initialized with the plain OmniDecoder's seeded
  init (converted), so both backends start from the same weights; wrapped in megatron's
  ``DistributedDataParallel`` (gradients reduced over the data-parallel group in fp32 buffers);
* a step is megatron's ``get_forward_backward_func()`` schedule (no pipelining, 1F1B, or
  interleaved) over ``train.grad_accum`` micro-batches, the loss from vocab-parallel logits
  (:mod:`omni.parallel.megatron.loss`), then megatron's optimizer (Adam, optionally the
  DistributedOptimizer: ZeRO-1 over the data-parallel group) with its gradient clipping;
* the data stream is sharded by data-parallel rank: the TP and PP ranks of one replica read the
  same sequences;
* checkpoints are megatron's ``dist_checkpointing`` (``step_XXXXXX/megatron/``, every tensor with
  its global shape and offsets), so a run saved at one TP x PP layout resumes at another; beside it
  the run convention's ``trainer_state.json``, ``rng.safetensors``, ``run.yaml`` and, last,
  ``checksums.json``. The final checkpoint also holds the OmniDecoder weights (gathered), so
  ``omni.load`` and ``omni generate`` take it as it is.

Loss normalization (as the torch backend's): every micro-batch's summed loss is divided by the
scored-token weight of the whole global batch (all-reduced over data-parallel ranks before the
step). megatron's schedule divides each micro-batch's loss by the number of micro-batches and its
DDP averages gradients over the data-parallel ranks; the loss handed to it is scaled by both, so
the gradient is exactly that of sum(loss) / global weight.

Two traps of megatron-core 0.16 with torch's Adam (no TE / apex) are handled here
(../shared/notes/megatron-core-on-cpu.md): weight decay per parameter group (its ``wd_mult`` is
applied only by megatron's own scheduler, which omni does not use), and, when loading the
optimizer, the one ``step`` tensor megatron gives every parameter (Adam would then count a step per
parameter): each parameter gets its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from omni.errors import OmniError
from omni.run import RNG, TRAINER_STATE, rng_state, save_run_config, step_dir, write_checksums
from omni.train.loop import Trainer, _target_weights
from omni.vocab import MODALITY_NAMES

MEGATRON_DIR = "megatron"
"""The dist_checkpointing folder inside a step folder."""
INIT_FROM_OMNI_MAX_PARAMS = 2_000_000_000
"""Up to this size every rank builds the plain OmniDecoder once to take its init (same start as the
torch backend); above it megatron's own init (same distributions, other draws), to spare the memory."""


def _sharded_state(chunks: list, opt, loading: bool) -> dict:
    """The dist_checkpointing state of model chunks + optimizer (megatron-LM's layout: ``model`` or
    ``model0..`` per virtual stage, ``optimizer`` fully reshardable, so any TP x PP x DP loads it)."""
    if len(chunks) == 1:
        model = {"model": chunks[0].sharded_state_dict()}
    else:  # the chunks' local key names collide: keep them apart (megatron takes any structure here)
        model = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    state = dict(model)
    state["optimizer"] = opt.sharded_state_dict(model, is_loading=loading,
                                                metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    return state


class MegatronTrainer(Trainer):
    """:class:`~omni.train.loop.Trainer` with megatron-core's model, schedules, optimizer and checkpoints."""

    # --- the model -----------------------------------------------------------------------
    def _build(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from omni.model import OmniDecoder, count_parameters
        from omni.parallel.megatron.layers import optimizer_config_overrides
        from omni.parallel.megatron.model import build_model_chunks, initialize_parallel, load_omni_state

        cfg, tc, p = self.cfg, self.cfg.train, self.cfg.parallel
        if not dist.is_initialized():  # one process: megatron still needs a (trivial) process group
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        initialize_parallel(cfg)
        chunks = build_model_chunks(cfg)
        if count_parameters(cfg.model) <= INIT_FROM_OMNI_MAX_PARAMS:
            torch.manual_seed(cfg.seed)  # the torch backend's init, on every rank
            reference = OmniDecoder(cfg.model)
            for c in chunks:
                load_omni_state(c, reference.state_dict(), cfg)
            del reference
        half = tc.precision in ("bf16", "fp8")
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=p.distributed_optimizer)
        model = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c) for c in chunks]
        config = chunks[0].config
        config.finalize_model_grads_func = finalize_model_grads  # DP reduce, tied embedding across PP
        config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        # batched p2p with PP=2 interleaving matches messages in the wrong order on gloo (the note's
        # trap: a silently wrong loss); unbatched send/recv is exact on every backend
        config.batch_p2p_comm = False
        opt_cfg = OptimizerConfig(optimizer="adam", lr=tc.lr, min_lr=tc.min_lr, weight_decay=tc.weight_decay,
                                  adam_beta1=tc.beta1, adam_beta2=tc.beta2, adam_eps=tc.eps,
                                  clip_grad=tc.grad_clip, bf16=half,
                                  params_dtype=torch.bfloat16 if half else torch.float32,
                                  use_distributed_optimizer=p.distributed_optimizer)
        self.opt = get_megatron_optimizer(opt_cfg, model, config_overrides=optimizer_config_overrides(opt_cfg))
        self.chunks, self.module, self.model = chunks, model, None
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_world = parallel_state.get_data_parallel_world_size()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        # one replica reports the loss: the last stage's first TP rank of each data-parallel rank
        self.reporter = self.last_stage and parallel_state.get_tensor_model_parallel_rank() == 0

    def layout(self) -> str:
        p = self.cfg.parallel
        vp = f" x virtual {p.virtual_pipeline}" if p.virtual_pipeline > 1 else ""
        return (f"; megatron-core: tensor {p.tensor} x pipeline {p.pipeline}{vp} x data {self.dp_world}"
                f"{', distributed optimizer' if p.distributed_optimizer else ''}")

    # --- one step ------------------------------------------------------------------------
    def _run_schedule(self, batches: list[dict], weights: list[torch.Tensor], denom: torch.Tensor,
                      forward_only: bool) -> torch.Tensor:
        """megatron's schedule over ``batches``; returns the global sums [ce, z, weight, (ce, n) per
        modality] over all micro-batches and data-parallel ranks (on every rank)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from omni.parallel.megatron.loss import loss_sums
        from omni.parallel.megatron.model import forward_inputs

        cfg, n = self.cfg, len(batches)
        scale = n * self.dp_world  # undo the schedule's 1/n and DDP's 1/dp: d(sum loss)/global weight
        dev = self.info.device
        table = self.modality_table.to(dev)
        denom = denom.to(dev)

        def forward_step(data_iterator, model):
            b, w = next(data_iterator)
            b = {k: v.to(dev) for k, v in b.items() if torch.is_tensor(v)}
            w = w.to(dev)
            # local spec: a block-diagonal mask (megatron rotates by index, which under it is omni's
            # per-document RoPE exactly); TE spec: one THD sequence of documents (parallel/megatron/model.py)
            output = model(**forward_inputs(self.chunks[0], b["input_ids"], b["doc_ids"]))

            def loss_func(logits):
                s = loss_sums(logits, b["labels"], w, vocab_size=cfg.model.vocab_size, z_loss=cfg.model.z_loss,
                              modality_table=table)
                row = torch.cat([torch.stack([s.ce, s.z, s.weight.detach()]).double(),
                                 torch.stack([s.modality_ce, s.modality_tokens], 1).reshape(-1).double()]).cpu()
                return s.loss / denom * scale, {"sums": row}

            return output, loss_func

        pairs = list(zip(batches, weights))
        data = [iter(pairs) for _ in self.chunks] if len(self.chunks) > 1 else iter(pairs)
        # the shape the pipeline stages exchange: [s, b, dim], or [b*s, 1, dim] as THD under TE
        seq, mbs = cfg.data.seq_len, cfg.train.micro_batch_size
        if getattr(self.chunks[0], "omni_te", False):
            seq, mbs = seq * mbs, 1
        stats = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data,
            model=self.module if len(self.module) > 1 else self.module[0], num_microbatches=n,
            seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)
        sums = torch.zeros(3 + 2 * 5, dtype=torch.float64)
        if self.reporter:
            for s in stats:
                sums += s["sums"]
        dist.all_reduce(sums)  # every rank: the sums of all data-parallel replicas
        return sums

    def train_step(self) -> dict:
        from megatron.core import parallel_state

        from omni.run import lr_at

        cfg, tc = self.cfg, self.cfg.train
        lr = lr_at(self.step, tc.lr, tc.steps, tc.warmup_steps, tc.schedule, tc.min_lr, tc.decay_fraction)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = tc.weight_decay * g.get("wd_mult", 1.0)  # 0 for norms, biases, QK-norms
        batches = [self.stream.next_batch(tc.micro_batch_size) for _ in range(tc.grad_accum)]
        weights = [_target_weights(b, cfg, self.modality_table) for b in batches]
        denom = torch.stack([w.sum() for w in weights]).sum().double()
        dist.all_reduce(denom, group=parallel_state.get_data_parallel_group())
        denom = denom.clamp_min(1.0)
        sums = self._run_schedule(batches, weights, denom, forward_only=False)

        found_inf = self.opt.prepare_grads()  # main (fp32) grads from the DDP buffers
        grad_norm = float(self.opt.get_grad_norm())  # reduced over the model-parallel ranks
        loss_value = (sums[0] + cfg.model.z_loss * sums[1]) / denom
        bad = bool(found_inf) or not (torch.isfinite(loss_value) and torch.isfinite(torch.tensor(grad_norm)))
        if bad:
            self.bad_in_row += 1
            self.skipped_steps += 1
        else:
            if tc.grad_clip > 0:
                self.opt.clip_grad_norm(tc.grad_clip)
            self.opt.step_with_ready_grads()
            self.bad_in_row = 0
        for m in self.module:
            m.zero_grad_buffer()
        self.opt.zero_grad()
        self.step += 1
        n_tokens = self.global_batch * cfg.data.seq_len
        self.tokens_seen += n_tokens
        row = {"step": self.step, "loss": float(loss_value), "ce": float(sums[0] / denom),
               "z": float(sums[1] / denom), "lr": lr, "grad_norm": grad_norm, "skipped": bad,
               "skipped_steps": self.skipped_steps, "tokens": n_tokens}
        weights_by_mod = {"text": tc.loss_weights.text, "special": tc.loss_weights.text,
                          "image": tc.loss_weights.image, "audio": tc.loss_weights.audio}
        for k, name in enumerate(MODALITY_NAMES[:4]):
            n = float(sums[4 + 2 * k])
            if n and weights_by_mod[name] > 0:  # the weighted mean carries the modality's weight: undo it
                row[f"loss_{name}"] = float(sums[3 + 2 * k]) / n / weights_by_mod[name]
        return row

    @torch.no_grad()
    def validate(self) -> dict:
        from omni.data.packing import BlendedSequences, DocumentPacker

        tc = self.cfg.train
        packers = [DocumentPacker(d, self.cfg.data.seq_len, self.cfg.data.seed, self.tok.vocab, index=i)
                   for i, d in enumerate(self.eval_datasets)]
        stream = BlendedSequences(packers, None, self.dp_rank, self.dp_world)
        batches = [stream.next_batch(tc.micro_batch_size) for _ in range(tc.eval_batches)]
        weights = [b["valid_mask"] for b in batches]
        for m in self.module:
            m.eval()
        try:
            sums = self._run_schedule(batches, weights, torch.tensor(1.0, dtype=torch.float64), forward_only=True)
        finally:
            for m in self.module:
                m.train()
        row = {"step": self.step, "val_loss": float(sums[0] / sums[2].clamp_min(1.0)), "val_tokens": int(sums[2])}
        for k, name in enumerate(MODALITY_NAMES[:4]):
            if sums[4 + 2 * k]:
                row[f"val_loss_{name}"] = float(sums[3 + 2 * k] / sums[4 + 2 * k])
        return row

    # --- weights in omni's layout --------------------------------------------------------
    def _omni_shapes(self) -> dict:
        from omni.model import OmniDecoder

        with torch.device("meta"):
            return OmniDecoder(self.cfg.model).state_dict()

    def _load_omni_weights(self, state: dict) -> None:
        from omni.parallel.megatron.model import load_omni_state

        for c in self.chunks:  # the parameters are views into DDP's buffers: loading fills those
            load_omni_state(c, state, self.cfg)
        self.opt.reload_model_params()  # the optimizer's fp32 main weights follow the new weights

    def gather_omni_state(self) -> dict | None:
        """The OmniDecoder state dict of the whole model on rank 0 (None elsewhere): every rank's
        chunk states gathered and converted back (convert.from_megatron)."""
        from megatron.core import parallel_state

        from omni.parallel.megatron.convert import from_megatron
        from omni.parallel.megatron.model import megatron_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        mine = None
        if self.dp_rank == 0:  # one replica is the whole model
            mine = {(tp_rank, pp_rank, c.vp_stage or 0): {k: v.detach().float().cpu() for k, v in megatron_state(c).items()}
                    for c in self.chunks}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        if not self.info.is_main:
            return None
        rank_states = {k: v for part in every if part for k, v in part.items()}
        p = self.cfg.parallel
        return from_megatron(rank_states, self.cfg.model, p.tensor, p.pipeline, p.virtual_pipeline,
                             te=getattr(self.chunks[0], "omni_te", False))

    # --- checkpoints ---------------------------------------------------------------------
    def save(self) -> Path | None:
        """``OUT/step_XXXXXX``: megatron/ (dist_checkpointing, every rank writes its shards), then rank
        0 adds the run convention's files and checksums and renames the folder into place."""
        from megatron.core import dist_checkpointing

        final = step_dir(self.out, self.step)
        tmp = final.parent / f".{final.name}.tmp"
        if self.info.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / MEGATRON_DIR).mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(_sharded_state(self.chunks, self.opt, loading=False), str(tmp / MEGATRON_DIR))
        final_step = self.step == self.cfg.train.steps
        omni_state = self.gather_omni_state() if final_step else None
        if self.info.is_main:
            self._finish_checkpoint(tmp, final, omni_state)
        dist.barrier()
        return final if self.info.is_main else None

    def _finish_checkpoint(self, tmp: Path, final: Path, omni_state: dict | None) -> None:
        from safetensors.torch import save

        from omni.io import atomic_write_bytes, atomic_write_text
        from omni.run import prune

        if omni_state is not None:  # the inference checkpoint too: omni.load(step folder) works
            from omni.checkpoint import save_checkpoint
            from omni.model import OmniDecoder

            with torch.device("meta"):
                holder = OmniDecoder(self.cfg.model)
            holder.load_state_dict(omni_state, assign=True)
            save_checkpoint(tmp / "omni", holder, self.cfg.model, self.tok, extra_meta={"step": self.step})
            for item in (tmp / "omni").iterdir():
                item.rename(tmp / item.name)
            (tmp / "omni").rmdir()
        trainer_state = {"data": self.stream.state_dict(), "bad_in_row": self.bad_in_row,
                         "skipped_steps": self.skipped_steps, "tokens_seen": self.tokens_seen,
                         "world": self.info.world, "micro_batch_size": self.cfg.train.micro_batch_size,
                         "global_batch": self.global_batch, "backend": "megatron",
                         "layout": {"tensor": self.cfg.parallel.tensor, "pipeline": self.cfg.parallel.pipeline,
                                    "virtual_pipeline": self.cfg.parallel.virtual_pipeline}}
        rng_js, rng_tensors = rng_state()
        atomic_write_bytes(tmp / RNG, save(rng_tensors))
        atomic_write_text(tmp / TRAINER_STATE, json.dumps({**trainer_state, "step": self.step, "param_groups": {},
                                                           "rng": rng_js}) + "\n")
        save_run_config(self.cfg, tmp)
        write_checksums(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune(self.out, self.cfg.train.keep_last)

    def _restore(self, path: Path) -> None:
        from megatron.core import dist_checkpointing
        from safetensors.torch import load_file

        from omni.run import set_rng_state

        state = json.loads((path / TRAINER_STATE).read_text())
        if state.get("backend") != "megatron":
            raise OmniError(f"cannot resume {path} with parallel.backend=megatron: it was saved by the torch backend "
                            "(start from its weights with train.init_from, or resume with parallel.backend=torch)")
        self._check_batch(path, state)
        self._prime_optimizer()
        loaded = dist_checkpointing.load(_sharded_state(self.chunks, self.opt, loading=True), str(path / MEGATRON_DIR))
        if len(self.chunks) == 1:
            self.chunks[0].load_state_dict(loaded["model"])
        else:
            for i, c in enumerate(self.chunks):
                c.load_state_dict(loaded[f"model{i}"])
        self._load_optimizer(loaded["optimizer"], applied=state["step"] - state["skipped_steps"])
        self.stream.load_state_dict(state["data"])
        self.step = state["step"]
        self.bad_in_row, self.skipped_steps = state["bad_in_row"], state["skipped_steps"]
        self.tokens_seen = state["tokens_seen"]
        set_rng_state(state["rng"], load_file(str(path / RNG)))

    def _inner_optimizers(self) -> list:
        """The torch optimizers inside megatron's (chained) optimizer."""
        opts = getattr(self.opt, "chained_optimizers", [self.opt])
        return [o.optimizer for o in opts]

    def _prime_optimizer(self) -> None:
        """Give every parameter of the torch Adam its state before a load: megatron's state_dict of a
        fresh optimizer has no 'step' to match (KeyError / assertion otherwise)."""
        for inner in self._inner_optimizers():
            for group in inner.param_groups:
                for prm in group["params"]:
                    st = inner.state[prm]
                    if "step" not in st:
                        st["step"] = torch.zeros((), dtype=torch.float32)
                        st["exp_avg"] = torch.zeros_like(prm, memory_format=torch.preserve_format)
                        st["exp_avg_sq"] = torch.zeros_like(prm, memory_format=torch.preserve_format)

    def _load_optimizer(self, state: dict, applied: int) -> None:
        """Load megatron's optimizer state, with omni's own handling of torch Adam's ``step``.

        megatron-core 0.16 with torch's Adam (no TE / apex) gets the step wrong twice: (1) its
        DistributedOptimizer's fully reshardable load leaves ``step`` out of the tensors it hands to
        ``_set_main_param_and_optimizer_states``, which then copies every state key, ``step``
        included (KeyError); this optimizer's copy takes the keys the checkpoint has; (2) every
        load gives all parameters ONE shared ``step`` tensor, which Adam increments in place once
        per parameter (the bias correction wrong from the first step after a resume). So each
        parameter gets its own step, set to the updates this run applied (steps minus skipped ones).
        """
        for opt in getattr(self.opt, "chained_optimizers", [self.opt]):
            if hasattr(opt, "model_param_group_index_map"):  # a DistributedOptimizer
                opt._set_main_param_and_optimizer_states = _setter_of_present_keys(opt)
        try:
            self.opt.load_state_dict(state)
        finally:
            for opt in getattr(self.opt, "chained_optimizers", [self.opt]):
                opt.__dict__.pop("_set_main_param_and_optimizer_states", None)
        for inner in self._inner_optimizers():
            for st in inner.state.values():
                if "step" in st:
                    st["step"] = torch.tensor(float(applied))


def _setter_of_present_keys(opt):
    """``opt._set_main_param_and_optimizer_states`` that copies only the state keys the checkpoint
    holds (the main parameter and Adam's moments; ``step`` is set afterwards, per parameter)."""

    def setter(model_param, tensors: dict) -> None:
        group_index, group_order = opt.model_param_group_index_map[model_param]
        main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **opt.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    return setter
