"""The head suites: `omni eval detection` (the three requests of a scene and their ground truth, the suite
end to end on a checkpoint with a random-init detection head) and `omni eval gen-head` (end to end with
a random-init diffusion head and a small judge), with clear refusals."""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import run_cli
from omni.toy import shapes as toy


def test_requests_of_a_scene_and_their_boxes():
    from omni.eval.detection import requests_of

    rng = np.random.default_rng(0)
    for seed in toy.scene_seeds(40, "validation", size=32):
        sc = toy.scene(seed, size=32)
        (k1, r1, g1), (k2, r2, g2), (k3, r3, g3) = requests_of(sc, rng, toy.NOVEL_PAIRS)
        assert (k1, r1, k2, k3) == ("the shapes", "find the shapes", "present pair", "absent pair")
        assert g1 == [tuple(v / 32 for v in o.box) for o in sc.objects]
        (pair,) = toy.parse_caption(r2[5:])
        assert pair in sc.pairs and len(g2) == sc.pairs.count(pair)
        (absent,) = toy.parse_caption(r3[5:])
        assert absent not in sc.pairs and absent not in toy.NOVEL_PAIRS and g3 == []


def test_suite_end_to_end_and_refusals(tmp_path, tiny_model_config, real_tokenizer):
    from omni.checkpoint import save_checkpoint
    from omni.config.heads import DetectionHeadConfig, HeadsConfig
    from omni.decoders.routing import RoutingHeads
    from omni.model import OmniDecoder

    torch.manual_seed(0)
    model = OmniDecoder(tiny_model_config)
    save_checkpoint(tmp_path / "plain", model, tokenizer=real_tokenizer)
    heads = RoutingHeads(HeadsConfig(det=DetectionHeadConfig(enabled=True, width=32, n_objects=4, n_layers=1,
                                                             n_heads=2, ffn_dim=64)),
                         tiny_model_config.dim, real_tokenizer.vocab.specials, (4, 4))
    save_checkpoint(tmp_path / "det", model, tokenizer=real_tokenizer, heads=heads)
    rc, out, err = run_cli("eval", "detection", "--checkpoint", tmp_path / "det", "detection.n_scenes=6",
                           "--out", tmp_path / "m")
    assert rc == 0, err
    m = json.loads(out)
    assert m["n_scenes"] == 6 and m["the_shapes"]["requests"] == 6 and m["every_pair"]["requests"] == 12
    for group in ("the_shapes", "every_pair", "present_pair", "pooled"):
        assert 0 <= m[group]["ap50"] <= 1 and 0 <= m[group]["chance_ap50"] <= 1
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == m
    rc, _, err = run_cli("eval", "detection", "--checkpoint", tmp_path / "plain", "detection.n_scenes=2")
    assert rc == 2 and "has no detection head" in err and "Traceback" not in err
    rc, _, err = run_cli("eval", "detection", "--checkpoint", tmp_path / "det", "--data", "x")
    assert rc == 2 and "takes no --data" in err
    rc, _, err = run_cli("eval", "detection", "--checkpoint", tmp_path / "det", "detection.split=train")
    assert rc == 2 and "detection.split" in err


def test_gen_head_suite_end_to_end_and_refusals(tmp_path, tiny_model_config, real_tokenizer):
    """`omni eval gen-head`: a checkpoint with a (random-init) diffusion head makes one image per
    held-out caption, judged; the figures are shares, beside the chance row; clear refusals."""
    from omni.checkpoint import save_checkpoint
    from omni.config.heads import DiffusionHeadConfig, HeadsConfig
    from omni.decoders.routing import RoutingHeads
    from omni.eval.judge import train_judge
    from omni.model import OmniDecoder

    torch.manual_seed(0)
    model = OmniDecoder(tiny_model_config)
    heads = RoutingHeads(HeadsConfig(gen=DiffusionHeadConfig(enabled=True, n_queries=3, widths=(32,), layers=1,
                                                             head_dim=32, cross_dim=32, steps=2)),
                         tiny_model_config.dim, real_tokenizer.vocab.specials, (4, 4), image_tokenizer=real_tokenizer.image)
    save_checkpoint(tmp_path / "gen", model, tokenizer=real_tokenizer, heads=heads)
    save_checkpoint(tmp_path / "plain", model, tokenizer=real_tokenizer)
    train_judge(n_scenes=20, seed=0, steps=5).save(tmp_path / "judge")
    rc, out, err = run_cli("eval", "gen-head", "--checkpoint", tmp_path / "gen", f"gen.judge={tmp_path / 'judge'}",
                           "gen.n_scenes=6", "gen.steps=2")
    assert rc == 0, err
    m = json.loads(out)
    assert m["n_scenes"] == 6 and 0 <= m["correct"] <= 1 and 0 <= m["chance_correct"] <= 1 and m["steps"] == 2
    rc, _, err = run_cli("eval", "gen-head", "--checkpoint", tmp_path / "gen", "gen.n_scenes=2")
    assert rc == 2 and "gen.judge is not set" in err
    rc, _, err = run_cli("eval", "gen-head", "--checkpoint", tmp_path / "plain", f"gen.judge={tmp_path / 'judge'}")
    assert rc == 2 and "has no diffusion head" in err and "Traceback" not in err


def test_head_suites_read_an_mrope_model_at_its_3d_positions(monkeypatch, tiny_model_config, real_tokenizer):
    """Both suites run an M-RoPE model at the rows' own (time, height, width) positions, as training
    and generation do: each forward gets [3, B, L] equal to omni.rope.mrope_positions of every row."""
    import dataclasses

    from omni.config.heads import DetectionHeadConfig, DiffusionHeadConfig, HeadsConfig
    from omni.config.model import RopeConfig
    from omni.decoders.routing import RoutingHeads
    from omni.eval.detection import evaluate_detection
    from omni.eval.gen_head import evaluate_gen_head
    from omni.eval.judge import Judge, JudgeConfig
    from omni.model import OmniDecoder
    from omni.rope import mrope_positions

    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_model_config, rope=RopeConfig(kind="mrope"))
    model = OmniDecoder(cfg).eval()
    model.heads = RoutingHeads(HeadsConfig(
        det=DetectionHeadConfig(enabled=True, width=32, n_objects=4, n_layers=1, n_heads=2, ffn_dim=64),
        gen=DiffusionHeadConfig(enabled=True, n_queries=4, widths=(32,), head_dim=16, cross_dim=16, steps=2)),
        cfg.dim, real_tokenizer.vocab.specials, (4, 4), image_tokenizer=real_tokenizer.image)
    seen = []
    forward = OmniDecoder.forward

    def spy(self, ids, *args, position_ids=None, **kw):
        seen.append((ids.clone(), position_ids))
        return forward(self, ids, *args, position_ids=position_ids, **kw)

    monkeypatch.setattr(OmniDecoder, "forward", spy)
    scenes = toy.scenes(2, "validation", size=32, grid=4)
    evaluate_detection(model, real_tokenizer, scenes, toy.NOVEL_PAIRS, batch_size=4)
    evaluate_gen_head(model, real_tokenizer, Judge(JudgeConfig(size=32)), scenes, steps=2)
    assert len(seen) == 2 + 1  # two detection batches (6 requests), one <gen> batch (2 captions)
    pad = real_tokenizer.vocab.special("<pad>")
    for ids, pos in seen:
        assert pos is not None and pos.shape == (3, *ids.shape)
        for row, p in zip(ids, pos.unbind(1)):
            n = int((row != pad).sum()) if (row == pad).any() else len(row)
            want = torch.from_numpy(mrope_positions(row[:n].numpy(), real_tokenizer.vocab)[0])
            assert torch.equal(p[:, :n], want)
            if (row == real_tokenizer.vocab.special("<boi>")).any():  # the detection rows hold an image:
                assert (p[1, :n] != p[2, :n]).any()  # its rows and columns, truly 3-D
