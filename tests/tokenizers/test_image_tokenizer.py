"""The VQ image tokenizer: interface, quantizers, save/load, training on real photos, eval, bad input."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from conftest import run_cli
from omni.config import load_config
from omni.config.image_tokenizer import ImageTokenizerConfig, ImageTrainConfig
from omni.errors import ConfigError, OmniError

TINY = dict(image_size=32, base_channels=8, channel_multiplier=[1, 2, 2, 2], norm_groups=4,
            latent_channels=16, embed_dim=8, codebook_size=64, fsq_levels=[4, 4, 4])
"""32 px -> 4x4 codes (8x downsampling), tiny channels: milliseconds per image."""


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> ImageTokenizerConfig:
    return ImageTokenizerConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def crops():
    from omni.toy.photos import photos, random_crops

    return random_crops(photos("heldout"), 8, 32, seed=0)  # real photo crops [8,3,32,32]


@pytest.mark.parametrize("quantizer", ["vq", "fsq", "lfq", "nearest"])
def test_encode_decode_shapes_determinism_and_save_load(quantizer, crops, tmp_path):
    from omni.tokenizers.base import load_tokenizer, save_tokenizer
    from omni.tokenizers.image import VQImageTokenizer

    tok = VQImageTokenizer(tiny(quantizer=quantizer))
    with torch.no_grad():
        tok(crops)  # one training pass (vq: k-means init and EMA update) so the state is not the initial one
    tok.eval()
    with torch.no_grad():
        codes = tok.encode(crops)
        assert codes.shape == (8, 4, 4) and codes.dtype == torch.long
        assert tok.grid == (4, 4) and tok.tokens_per_image == 16
        assert 0 <= int(codes.min()) and int(codes.max()) < tok.codebook_size
        out = tok.decode(codes)
        assert out.shape == (8, 3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
        assert torch.equal(tok.decode(tok.encode(crops)), out)  # deterministic in eval mode
    save_tokenizer(tok, tmp_path / "img")
    back = load_tokenizer(tmp_path / "img", "image")
    assert type(back) is VQImageTokenizer and not back.training
    with torch.no_grad():
        assert torch.equal(back.encode(crops), codes)
        assert torch.equal(back.decode(codes), out)
    assert back.fingerprint() == tok.fingerprint()


def test_codebook_sizes_and_config_errors():
    from omni.tokenizers.image import VQImageTokenizer

    assert VQImageTokenizer(tiny(quantizer="fsq", fsq_levels=[8, 5, 5, 5])).codebook_size == 1000
    assert ImageTokenizerConfig(channel_multiplier=[1, 1, 2, 2, 4], image_size=256).downsample == 16
    with pytest.raises(ConfigError, match=r"quantizer='kmeans' is invalid: expected one of 'vq', 'fsq'"):
        ImageTokenizerConfig(quantizer="kmeans")
    with pytest.raises(ConfigError, match="codebook_size=1000 is invalid: expected a power of 2"):
        ImageTokenizerConfig(quantizer="lfq", codebook_size=1000)
    with pytest.raises(ConfigError, match="image_size=60 is invalid: expected a positive multiple of the downsample factor 8"):
        ImageTokenizerConfig(image_size=60)
    with pytest.raises(ConfigError, match="model.norm_groups=5"):
        load_config(ImageTrainConfig, overrides=["model.norm_groups=5"])
    with pytest.raises(ConfigError, match="perceptual_weights"):
        ImageTrainConfig(perceptual_weight=1.0)


def test_wrong_input_shapes_and_codes_are_refused(crops):
    from omni.tokenizers.image import VQImageTokenizer

    tok = VQImageTokenizer(tiny()).eval()
    with pytest.raises(OmniError, match=r"encode expects images \[B,3,32,32\]"):
        tok.encode(torch.rand(1, 3, 40, 32))
    with pytest.raises(OmniError, match=r"codes must lie in \[0, 64\)"):
        tok.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(OmniError, match=r"decode expects codes \[B,4,4\]"):
        tok.decode(torch.zeros(1, 16, dtype=torch.long))


def test_unified_tokenizer_fixed_codes_per_image_any_size_and_mode(text_tokenizer):
    """Other sizes/aspect ratios go through ImageTokenizer.preprocess; gray, RGBA, palette are converted."""
    from PIL import Image as PILImage

    from omni.bundle import UnifiedTokenizer
    from omni.document import Document, Image, Text
    from omni.tokenizers.image import VQImageTokenizer

    tok = VQImageTokenizer(tiny()).eval()
    bundle = UnifiedTokenizer.build(text_tokenizer, tok)
    gray = PILImage.fromarray((torch.rand(50, 90) * 255).byte().numpy(), mode="L")
    rgba = PILImage.new("RGBA", (20, 70), (10, 200, 30, 128))
    palette = PILImage.new("RGB", (33, 33), (5, 5, 250)).convert("P")
    for img in (gray, rgba, palette, torch.rand(3, 32, 32)):
        ids = bundle.encode(Document([Text("a"), Image(img)]))
        n_image = int((bundle.modality(ids) == 2).sum())
        assert n_image == 16
    doc = bundle.decode(bundle.encode(Document([Image(gray)])))
    assert doc.images[0].pixels.shape == (3, 32, 32)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory):
    """Real photos as PNG files, plus every kind of bad input, and a WebDataset shard."""
    from PIL import Image as PILImage

    from omni.toy.photos import export, photo

    d = tmp_path_factory.mktemp("messy")
    export(d / "photos", "heldout")  # 4 real photos
    arr = photo("astronaut")
    PILImage.fromarray(arr).convert("L").save(d / "gray.png")
    PILImage.fromarray(arr).convert("RGBA").save(d / "rgba.png")
    PILImage.fromarray(arr).convert("P").save(d / "palette.png")
    (d / "notes.txt").write_text("not an image")
    (d / "fake.jpg").write_bytes(b"this is not a jpeg")
    good = _png(PILImage.fromarray(arr))
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    PILImage.fromarray(arr[:8, :8]).save(d / "tiny.png")
    with tarfile.open(d / "shard-000.tar", "w") as tar:
        for name, data in (("0001.jpg", _png(PILImage.fromarray(photo("coins")))), ("0001.txt", b"coins"),
                           ("0002.png", b"corrupt"), ("0003.png", good)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return d


def test_reader_converts_and_counts_bad_input(messy_dir):
    from omni.media import SkipReport
    from omni.tokenizers.image_train import iter_images

    report = SkipReport()
    images = list(iter_images(str(messy_dir), report, min_side=16))
    assert len(images) == 4 + 3 + 2  # photos, gray/rgba/palette, two good shard members
    assert all(a.shape[2] == 3 and a.dtype.name == "uint8" for _, a in images)
    assert report.skipped == {"unsupported_format": 1, "corrupt_image": 3, "too_small": 1}
    assert report.converted["L"] == 1 and report.converted["RGBA"] == 1 and report.converted["P"] == 1
    rgba = dict(images)[str(messy_dir / "rgba.png")]
    assert rgba.shape == (512, 512, 3)


def test_ssim_matches_scikit_image(crops):
    from skimage.metrics import structural_similarity

    from omni.eval.metrics import ssim

    x, y = crops[:2], (crops[:2] + 0.1 * torch.randn_like(crops[:2])).clamp(0, 1)
    ours = ssim(x, y)
    for i in range(2):
        ref = structural_similarity(x[i].double().numpy(), y[i].double().numpy(), gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=0)
        assert abs(float(ours[i]) - ref) < 1e-5


@pytest.mark.slow
def test_short_training_beats_mean_color_baseline_and_uses_the_codebook(tmp_path):
    """About 30 s on real photo crops: held-out PSNR clearly above the mean-color baseline."""
    from omni.eval.tokenizers import ImageEvaluator, eval_images
    from omni.eval.tokenizers import evaluate_image_tokenizer as evaluate
    from omni.media import SkipReport
    from omni.tokenizers.image import VQImageTokenizer
    from omni.tokenizers.image_train import train_image_tokenizer

    model = tiny(channel_multiplier=[1, 2, 2], codebook_size=128, norm_groups=0)  # 4x: 8x8 codes of 32 px
    cfg = ImageTrainConfig(model=model, steps=300, batch_size=8, lr=5e-3, recon_loss="l2",
                           warmup_steps=10, betas=[0.9, 0.99], eval_every=0, save_every=0, eval_crops_per_image=32,
                           log_every=50, threads=1)
    held = eval_images("photos:heldout", 32, 32, 2048, SkipReport(), seed=0)
    torch.manual_seed(cfg.seed)
    before = evaluate(VQImageTokenizer(cfg.model).eval(), held)
    tok = train_image_tokenizer("photos:train", tmp_path / "run", cfg, ImageEvaluator("photos:heldout", cfg),
                                progress=False, log=lambda s: None)
    after = json.loads((tmp_path / "run" / "eval.json").read_text())
    # 300 steps of a tiny model: about +1.5 dB (the few-minute recipe runs reach about +6 dB)
    assert after["psnr"] > after["psnr_mean_color_baseline"] + 1.0, after
    assert after["psnr"] > before["psnr"] + 3.0, (before, after)
    # k-means init and dead-code restarts keep the whole codebook in use on held-out crops
    assert after["codebook_usage"] >= 0.9 and after["code_perplexity"] > 0.5 * after["codebook_size"], after
    assert not tok.training


@pytest.mark.slow
def test_fsq_entropy_loss_fills_the_codebook_on_photos(tmp_path):
    """Plain FSQ on a short run leaves most of its level grid unused (correlated channels); the
    entropy loss fills it on held-out crops at about the same PSNR. (This 300-step tiny model needs
    weight 0.05; the recipe's 2000-step run uses 0.01.)"""
    from omni.eval.tokenizers import ImageEvaluator
    from omni.tokenizers.image_train import train_image_tokenizer

    results = {}
    for weight in (0.0, 0.05):
        model = tiny(channel_multiplier=[1, 2, 2], quantizer="fsq", fsq_levels=[8, 5, 5, 5], norm_groups=0)
        cfg = ImageTrainConfig(model=model, steps=300, batch_size=8, lr=5e-3, recon_loss="l1", warmup_steps=10,
                               betas=[0.9, 0.99], eval_every=0, save_every=0, eval_crops_per_image=64,
                               log_every=50, threads=1, fsq_entropy_weight=weight)
        train_image_tokenizer("photos:train", tmp_path / str(weight), cfg, ImageEvaluator("photos:heldout", cfg),
                              progress=False, log=lambda s: None)
        results[weight] = json.loads((tmp_path / str(weight) / "eval.json").read_text())
    plain, spread = results[0.0], results[0.05]
    assert spread["codebook_usage"] >= 0.9 > plain["codebook_usage"] + 0.3, (plain, spread)  # measured 99% vs 12%
    assert spread["psnr"] > max(plain["psnr"] - 1.0, spread["psnr_mean_color_baseline"]), (plain, spread)


def test_cli_train_on_messy_folder_resume_and_eval(messy_dir, tmp_path):
    """Bad files are skipped and counted, never fatal; an existing run resumes; eval writes JSON."""
    out = tmp_path / "run"
    common = ["tokenizer", "train", "image", "--data", str(messy_dir), "--out", str(out), "--quiet",
              *[f"model.{k}={json.dumps(v).replace(' ', '')}" for k, v in TINY.items()],
              "model.quantizer=fsq", "batch_size=4", "eval_every=0", "log_every=1", "eval_max_images=16",
              "eval_crops_per_image=2", "tensorboard=true"]
    rc, stdout, stderr = run_cli(*common, "steps=2")
    assert rc == 0, stderr
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "data" and log[0]["train"]["skipped"]["corrupt_image"] == 3
    assert "skipped" in stdout and "corrupt_image" in stdout
    assert (out / "run.yaml").is_file() and [p.name for p in out.glob("step_*")] == ["step_000002"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # the run convention's TensorBoard log
    w2 = (out / "model.safetensors").read_bytes()

    rc, stdout, stderr = run_cli(*common, "steps=4")
    assert rc == 0, stderr
    assert "resuming" in stdout and "at step 2" in stdout
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert (out / "model.safetensors").read_bytes() != w2

    rc, stdout, stderr = run_cli("tokenizer", "eval", "image", "--tokenizer", str(out), "--data", str(messy_dir),
                                 "crops_per_image=1", "--out", str(tmp_path / "eval.json"))
    assert rc == 0, stderr
    m = json.loads((tmp_path / "eval.json").read_text())
    for key in ("psnr", "ssim", "codebook_usage", "code_perplexity", "encode_images_per_s", "decode_images_per_s",
                "psnr_mean_color_baseline"):
        assert key in m
    assert m["images"] == 10 and m["data"]["skipped"]["corrupt_image"] == 3  # the tiny image is upscaled here
    # `omni tokenizer eval image` is an alias of the suite `omni eval image-tokenizer` (keys of its image section)
    rc, stdout, stderr = run_cli("eval", "image-tokenizer", "--checkpoint", str(out), "--data", str(messy_dir),
                                 "--out", str(tmp_path / "suite"), "image.crops_per_image=1")
    assert rc == 0, stderr
    suite = json.loads((tmp_path / "suite" / "metrics.json").read_text())
    speed = ("encode_images_per_s", "decode_images_per_s")
    assert {k: v for k, v in suite.items() if k not in speed} == {k: v for k, v in m.items() if k not in speed}
    rc, _, stderr = run_cli("eval", "image-tokenizer", "--checkpoint", str(out), "--data", str(messy_dir),
                            "image.crops=1")
    assert rc == 2 and "image.crops" in stderr and "crops_per_image" in stderr  # keys, not flags
    rc, _, stderr = run_cli("eval", "nope", "--checkpoint", str(out))
    assert rc == 2 and "image-tokenizer" in stderr

    rc, _, stderr = run_cli(*common[:-1], "steps=4", "model.quantizer=vq")
    assert rc == 2 and "another model config" in stderr
    # --no-resume starts over: the discarded run's checkpoints go, so pruning keeps the new run's
    rc, stdout, stderr = run_cli(*common, "steps=1", "--no-resume")
    assert rc == 0, stderr
    assert "earlier checkpoints were discarded" in stdout and [p.name for p in out.glob("step_*")] == ["step_000001"]


def test_rerun_of_a_finished_run_does_nothing_and_says_so(tmp_path, monkeypatch):
    """Issue #20, friction 13: rerunning a finished training neither reads data nor evaluates again
    (its final eval over up to 2048 crops takes minutes); it says the run is finished and exits 0.
    A larger steps= continues the run, --no-resume starts it over. The final eval shows a progress
    bar of the crops encoded. Overrides right after --data are not taken for data."""
    from omni.eval.tokenizers import ImageEvaluator
    from omni.tokenizers import image_train

    out = tmp_path / "run"
    common = ["tokenizer", "train", "image", "--data", "photos:heldout", "steps=2",  # an override after --data
              "--eval-data", "photos:heldout", "eval_crops_per_image=2", "--out", str(out),
              *[f"model.{k}={json.dumps(v).replace(' ', '')}" for k, v in TINY.items()],
              "model.quantizer=fsq", "batch_size=2", "eval_every=0", "log_every=1", "eval_max_images=2"]
    rc, stdout, stderr = run_cli(*common)  # with its progress bars (on stderr)
    assert rc == 0, stderr
    assert "final eval:" in stderr and "crop" in stderr, stderr  # the final eval's bar
    assert f"wrote {out}" in stdout
    eval_file = out / "eval.json"
    first = eval_file.read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in [eval_file, out / "model.safetensors", out / "metrics.jsonl"]}

    calls = []
    monkeypatch.setattr(ImageEvaluator, "__call__", lambda self, tok: calls.append(1) or {})
    monkeypatch.setattr(image_train, "CropSampler", lambda *a, **k: calls.append("data") or 1 / 0)
    rc, stdout, stderr = run_cli(*common, "--quiet")
    assert rc == 0, stderr
    assert "finished already" in stdout and "step 2" in stdout and "--no-resume" in stdout, stdout
    assert "wrote" not in stdout and calls == []
    assert eval_file.read_text() == first
    assert stamps == {p.name: p.stat().st_mtime_ns for p in [eval_file, out / "model.safetensors",
                                                            out / "metrics.jsonl"]}
    monkeypatch.undo()

    # killed after its last checkpoint, before the final eval: the rerun finishes it without training
    eval_file.unlink()
    rc, stdout, stderr = run_cli(*common, "--quiet")
    assert rc == 0 and "its training is done" in stdout and json.loads(eval_file.read_text())["step"] == 2, stdout
    rc, stdout, stderr = run_cli(*common, "--quiet", "steps=3")
    assert rc == 0 and "resuming" in stdout and "at step 2" in stdout, stdout
    assert json.loads(eval_file.read_text())["step"] == 3
    rc, stdout, stderr = run_cli(*common, "--quiet", "--no-resume")
    assert rc == 0 and "earlier checkpoints were discarded" in stdout, stdout
    assert json.loads(eval_file.read_text())["step"] == 2


def test_every_tokenizer_command_takes_several_inputs_both_ways():
    """Issue #20, friction 20: `--data a b` and `--data a --data b` give the same list in every
    tokenizer command (image used to take only the second form, audio only the first)."""
    from omni.cli import build_parser

    parser = build_parser()
    commands = {("tokenizer", "train", "image", "--out", "o"): "data",
                ("tokenizer", "eval", "image", "--tokenizer", "t"): "data",
                ("tokenizer", "train", "audio", "--out", "o"): "data",
                ("tokenizer", "eval", "audio", "--tokenizer", "t"): "data",
                ("tokenizer", "train", "text", "--out", "o"): "input",
                ("data", "preprocess", "--tokenizer", "t", "--out", "o"): "input"}
    for cmd, dest in commands.items():
        flag = f"--{dest}"
        one = parser.parse_args([*cmd, flag, "a", "b"])
        repeated = parser.parse_args([*cmd, flag, "a", flag, "b"])
        assert getattr(one, dest) == getattr(repeated, dest) == ["a", "b"], cmd
    train = parser.parse_args(["tokenizer", "train", "image", "--out", "o", "--data", "x", "--eval-data", "a",
                               "--eval-data", "b", "c"])
    assert train.eval_data == ["a", "b", "c"]


def test_resume_equals_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from omni.tokenizers.image_train import train_image_tokenizer

    def cfg(steps):
        return ImageTrainConfig(model=tiny(quantizer="fsq"), steps=steps, batch_size=2, eval_every=0,
                                save_every=0, eval_crops_per_image=1, eval_max_images=2, log_every=1)

    quiet = dict(progress=False, log=lambda s: None)
    train_image_tokenizer("photos:heldout", tmp_path / "a", cfg(4), **quiet)
    train_image_tokenizer("photos:heldout", tmp_path / "b", cfg(2), **quiet)
    train_image_tokenizer("photos:heldout", tmp_path / "b", cfg(4), **quiet)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_errors_exit_2(tmp_path):
    rc, _, err = run_cli("tokenizer", "train", "image", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "data not found" in err
    rc, _, err = run_cli("tokenizer", "train", "image", "--data", "photos:nope", "--out", str(tmp_path / "o"))
    assert rc == 2 and "photos:train" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    rc, _, err = run_cli("tokenizer", "train", "image", "--data", str(tmp_path / "junk"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "no readable images" in err and "unsupported_format" in err
    rc, _, err = run_cli("tokenizer", "train", "image", "--data", "photos:heldout", "--out", str(tmp_path / "o"),
                         "model.quantizer=pq")
    assert rc == 2 and "model.quantizer='pq' is invalid" in err
    rc, _, err = run_cli("tokenizer", "eval", "image", "--tokenizer", str(tmp_path / "none"), "--data", "photos:heldout")
    assert rc == 2 and "not found" in err


def test_perceptual_loss_and_discriminator_from_local_weights(tmp_path, crops):
    from safetensors.torch import save_file

    from omni.tokenizers.image_train import _VGG16, PerceptualLoss, train_image_tokenizer

    torch.manual_seed(0)
    weights = tmp_path / "vgg_lpips.safetensors"  # random weights under torchvision's and LPIPS's key names
    state, c, i = {}, 3, 0
    for v in _VGG16:
        if v == "M":
            i += 1
            continue
        state[f"features.{i}.weight"] = torch.randn(v, c, 3, 3) * (2 / (9 * c)) ** 0.5
        state[f"features.{i}.bias"] = torch.zeros(v)
        c, i = v, i + 2
    state["lin0.model.1.weight"] = torch.rand(1, 64, 1, 1)
    save_file(state, weights)
    loss = PerceptualLoss([str(weights)])
    x = crops[:2] * 2 - 1
    y = x.clone().requires_grad_(True)
    assert float(loss(x, x)) == 0.0
    d = loss(x, (y + 0.3 * torch.randn_like(y)).clamp(-1, 1))
    d.backward()
    assert d.item() > 0 and y.grad.abs().sum() > 0
    with pytest.raises(OmniError, match="perceptual weight file not found"):
        PerceptualLoss([str(tmp_path / "missing.pth")])

    cfg = ImageTrainConfig(model=tiny(), steps=3, batch_size=2, eval_every=0, save_every=0, eval_crops_per_image=1,
                           eval_max_images=2, log_every=1, perceptual_weight=0.1, perceptual_weights=[str(weights)],
                           disc_weight=0.1, disc_start=1)
    train_image_tokenizer("photos:heldout", tmp_path / "run", cfg, progress=False, log=lambda s: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert "perceptual" in steps[0] and "disc" not in steps[0] and "disc" in steps[1]


def test_shipped_recipes_load_as_image_train_configs():
    from omni.commands.tokenizer_image import load_image_recipe
    from omni.config import recipes_dir

    root = recipes_dir()
    vq = load_image_recipe(str(root / "tokenizers" / "image_vq.yaml"), ["steps=3"])
    fsq = load_image_recipe(str(root / "tokenizers" / "image_fsq.yaml"), [])
    assert vq.steps == 3 and vq.model.quantizer == "vq" and vq.model.codebook_size == 1024
    assert fsq.model.quantizer == "fsq" and fsq.model.n_codes == 1000 and fsq.fsq_entropy_weight == 0.01
    assert vq.model.image_size // vq.model.downsample == 8
    with pytest.raises(ConfigError, match="model.quantizer='pq' is invalid"):
        load_image_recipe(str(root / "tokenizers" / "image_vq.yaml"), ["model.quantizer=pq"])


def test_encoding_never_changes_an_untrained_tokenizer(tmp_path, text_tokenizer):
    """vector-quantize-pytorch k-means-initializes a codebook on its first forward, even in eval mode:
    a bundle's tokenizers must code the same in every process and keep their fingerprint."""
    import omni
    from omni.tokenizers.image import VQImageTokenizer

    image = VQImageTokenizer(tiny(quantizer="vq", kmeans_init=True)).eval()
    tok = omni.UnifiedTokenizer.build(text_tokenizer, image)
    before = tok.fingerprint
    x = omni.Image(torch.rand(3, 32, 32))
    ids = tok.encode(omni.Document([x]))
    assert torch.equal(tok.encode(omni.Document([x])), ids)
    tok.save(tmp_path / "b")
    again = omni.UnifiedTokenizer.load(tmp_path / "b")  # refused if the weights changed after build
    assert again.fingerprint == before
    assert torch.equal(again.encode(omni.Document([x])), ids)


@pytest.mark.parametrize("local", [True, False])
def test_local_encoder_codes_depend_on_their_patch_alone(local):
    """local_encoder: changing every pixel outside patch (0, 0) leaves that patch's latent as it was;
    the usual conv encoder (the control) lets the neighbors in."""
    from omni.tokenizers.image import VQImageTokenizer

    torch.manual_seed(0)
    tok = VQImageTokenizer(tiny(local_encoder=local)).eval()
    f = tok.config.downsample
    a = torch.rand(1, 3, *tok.image_size)
    b = torch.rand(1, 3, *tok.image_size)
    b[..., :f, :f] = a[..., :f, :f]
    with torch.no_grad():
        za, zb = tok.encoder(tok._to_model(a)), tok.encoder(tok._to_model(b))
    assert za.shape == zb.shape == (1, tok.config.latent_channels, *tok.grid)
    assert torch.allclose(za[..., 0, 0], zb[..., 0, 0], atol=1e-5) == local
    assert not torch.allclose(za[..., 1, 1], zb[..., 1, 1])  # other patches did change


def test_fsq_entropy_loss_spreads_a_collapsed_batch_over_the_codebook():
    """MAGVIT-v2's entropy term on FSQ's implicit codebook: a batch of latents bunched on one code
    is pushed apart until most codes are used; with weight 0 (the default) FSQ adds no loss."""
    from omni.tokenizers.image import VQImageTokenizer, fsq_entropy_loss

    torch.manual_seed(0)
    tok = VQImageTokenizer(tiny(quantizer="fsq", fsq_levels=[5, 5, 5])).train()
    q = tok.quantize  # 125 codes; embed_dim 8 -> project_in -> 3 channels
    z = (0.01 * torch.randn(1, 512, 8)).requires_grad_()  # [B,N,embed]: every vector in one code cell

    def codes_used():
        with torch.no_grad():
            return q(z)[1].unique().numel()

    before = codes_used()
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        fsq_entropy_loss(q, z, temperature=0.1).backward()
        opt.step()
    after = codes_used()
    assert before <= 3 and after >= 80, (before, after)  # of 125

    # wired into quantize_latent: weighted in training, absent in eval and when not asked for
    h = torch.randn(2, 16, 4, 4)
    _, _, loss = tok.quantize_latent(h, fsq_entropy=(0.5, 0.1))
    expected = 0.5 * fsq_entropy_loss(q, tok.quant_conv(h).flatten(2).transpose(1, 2), 0.1)
    torch.testing.assert_close(loss, expected)
    assert tok.quantize_latent(h)[2].item() == 0.0
    assert tok.eval().quantize_latent(h, fsq_entropy=(0.5, 0.1))[2].item() == 0.0
    # a training setting: the model's saved config (and so bundle fingerprints) does not change
    with pytest.raises(ConfigError, match="fsq_entropy_temperature=0"):
        ImageTrainConfig(model=tiny(quantizer="fsq"), fsq_entropy_temperature=0)
    with pytest.raises(ConfigError, match="fsq_entropy_weight=0.1 is invalid: expected 0 unless model.quantizer is 'fsq'"):
        ImageTrainConfig(model=tiny(quantizer="vq"), fsq_entropy_weight=0.1)
