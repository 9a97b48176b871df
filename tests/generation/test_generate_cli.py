"""`omni generate` on the command line (issue #20): the checkpoint's own settings, one prompt syntax
with `omni tokenizer encode`, streamed output, --device, --out checks, config-key typos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import omni
from conftest import run_cli
from omni.config.generate import GenerateConfig, SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only spin-wait


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer, tiny_model_config) -> Path:
    """A plain checkpoint folder (no run.yaml) of a random-init tiny model."""
    from omni.checkpoint import save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt", omni.OmniDecoder(tiny_model_config).eval(),
                           tokenizer=tokenizer)


@pytest.fixture(scope="module")
def img(tmp_path_factory) -> Path:
    from PIL import Image as PILImage

    path = tmp_path_factory.mktemp("img") / "img.png"
    PILImage.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(path)
    return path


def _gen(ckpt, out, *args):
    return run_cli("generate", "--checkpoint", ckpt, "--out", out, *args)


def _prompt_md(out_html: Path) -> str:
    """The prompt part of the Markdown twin of a one-prompt page."""
    md = out_html.with_suffix(".md").read_text()
    return md.split("**prompt**", 1)[1].split("**output**", 1)[0]


def test_cli_refuses_min_images_that_cannot_fit(tmp_path, ckpt, tokenizer):
    """Bug 5, the up-front half: a budget that cannot hold min_images is refused, naming the numbers."""
    n = tokenizer.image.tokens_per_image
    rc, out, err = _gen(ckpt, tmp_path / "x.html", "--prompt", "a red circle", "max_new_tokens=10", "min_images=1")
    assert rc == 2 and "Traceback" not in err, err
    assert (f"max_new_tokens=10 cannot hold min_images=1 image block(s) of {n + 2} tokens (<boi> + {n} codes + "
            f"<eoi>): at least {n + 2} new tokens are needed") in err
    assert not (tmp_path / "x.html").exists()


def _run_folder(root: Path, tokenizer, model_config, **generate) -> Path:
    """A training run folder whose step_000001/ holds run.yaml with ``generate`` settings."""
    from omni.checkpoint import save_checkpoint
    from omni.config import RunConfig
    from omni.run import write_checkpoint

    torch.manual_seed(0)
    model = omni.OmniDecoder(model_config).eval()
    write_checkpoint(root, 1, lambda d: save_checkpoint(d, model, tokenizer=tokenizer),
                     config=RunConfig(generate=GenerateConfig(**generate)))
    return root


def test_cli_applies_the_checkpoint_generate_settings(tmp_path, ckpt, tokenizer, tiny_model_config):
    """Friction 9: run.yaml's generate section is the base, --config's goes over it, key=value over both;
    one stderr line names each setting that differs from its default and where it came from."""
    n = tokenizer.image.tokens_per_image
    run = _run_folder(tmp_path / "run", tokenizer, tiny_model_config, max_new_tokens=n + 2, allow_text=False,
                      allow_audio=False, min_images=1, max_images=1)
    saved = str(run / "step_000001" / "run.yaml")
    rc, out, err = _gen(run, tmp_path / "a.html", "--prompt", "a red circle")
    assert rc == 0 and "1 image(s)" in out, err
    assert f"checkpoint: {run / 'step_000001'}" in err  # the run folder resolved to its step
    assert f"min_images=1 ({saved})" in err and f"allow_text=False ({saved})" in err

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("generate:\n  min_images: 0\n  max_images: 0\n")
    rc, out, err = _gen(run, tmp_path / "b.html", "--prompt", "a red circle", "--config", recipe)
    assert rc == 0 and "0 image(s)" in out, err
    assert "max_images=0 (--config)" in err and f"allow_text=False ({saved})" in err and "min_images=" not in err

    rc, out, err = _gen(run, tmp_path / "c.html", "--prompt", "a red circle", "--config", recipe,
                        "max_images=2", "min_images=2", f"max_new_tokens={2 * n + 4}")
    assert rc == 0 and "2 image(s)" in out, err
    assert "min_images=2 (command line)" in err and "max_images=2 (command line)" in err

    rc, out, err = _gen(ckpt, tmp_path / "d.html", "--prompt", "a", "max_new_tokens=4")
    assert rc == 0 and f"{ckpt} has no run.yaml" in err and "max_new_tokens=4 (command line)" in err, err


def test_prompt_segments_are_shared_with_tokenizer_encode(tmp_path, ckpt, tokenizer, img):
    """Friction 10: --prompt takes the segments `omni tokenizer encode` takes, one per --prompt;
    typed special names stay text."""
    rc, out, err = _gen(ckpt, tmp_path / "a.html", "--prompt", "a photo of", "--prompt", f"@image:{img}",
                        "--prompt", "and", "max_new_tokens=4", "--quiet")
    assert rc == 0, err
    prompt = _prompt_md(tmp_path / "a.html")
    assert prompt.index("a photo of") < prompt.index("![image 1]") < prompt.index("and")

    rc, out, err = _gen(ckpt, tmp_path / "b.html", "--prompt", f"describe @image:{img}", "max_new_tokens=4")
    assert rc == 2 and "give each file as its own segment" in err and "Traceback" not in err, err

    bundle = tokenizer.save(tmp_path / "tok")
    sp = tokenizer.vocab.specials
    rc, out, err = run_cli("tokenizer", "encode", "--tokenizer", bundle, "draw", f"@image:{img}")
    assert rc == 0, err
    ids = json.loads(out)["ids"]
    assert sp["<boi>"] in ids and sp["<eoi>"] in ids
    rc, out, err = run_cli("tokenizer", "encode", "--tokenizer", bundle, "draw <boi> and <eos> please")
    ids = json.loads(out)["ids"]
    assert rc == 0 and ids[0] == sp["<bos>"] and not set(ids[1:]) & set(sp.values()), ids
    assert tokenizer.decode(ids).text == "draw <boi> and <eos> please"
    rc, out, err = run_cli("tokenizer", "encode", "--tokenizer", bundle, f"see @audio:{tmp_path / 'x.wav'}")
    assert rc == 2 and "give each file as its own segment" in err


def test_batch_paths_resolve_against_the_jsonl_folder(tmp_path, ckpt, img):
    """--batch: "image" and @image: segments of "prompt" are relative to the JSONL's folder."""
    folder = tmp_path / "prompts"
    (folder / "pics").mkdir(parents=True)
    (folder / "pics" / "i.png").write_bytes(img.read_bytes())
    batch = folder / "p.jsonl"
    batch.write_text(json.dumps({"prompt": ["look", "@image:pics/i.png", "then"], "image": "pics/i.png"}) + "\n")
    rc, out, err = _gen(ckpt, tmp_path / "out" / "b.html", "--batch", batch, "max_new_tokens=4", "--quiet")
    assert rc == 0 and "1 document(s)" in out, err
    assert _prompt_md(tmp_path / "out" / "b.html").count("![image") == 2
    batch.write_text(json.dumps({"prompt": 3}) + "\n")
    rc, out, err = _gen(ckpt, tmp_path / "b.html", "--batch", batch)
    assert rc == 2 and 'p.jsonl:1: "prompt" must be a string or a list of strings' in err, err
    batch.write_text(json.dumps({"prompt": "x", "image": "pics/missing.png"}) + "\n")
    rc, out, err = _gen(ckpt, tmp_path / "b.html", "--batch", batch)
    assert rc == 2 and f"image file not found: {folder / 'pics' / 'missing.png'}" in err, err


def test_streamed_text_equals_the_generated_text(tmp_path, ckpt, tokenizer):
    """Friction 18: one prompt's text is streamed to stdout as it comes, exactly the document's text;
    image blocks show a bar on stderr; --quiet leaves only the last line."""
    from omni.generation.stream import TerminalStream

    model, tok = omni.load(ckpt)
    greedy = SamplingConfig(temperature=0.0)
    cfg = GenerateConfig(max_new_tokens=30, allow_images=False, allow_audio=False, text=greedy)
    expected = omni.generate(model, tok, "the", cfg).text
    assert expected
    rc, out, err = _gen(ckpt, tmp_path / "a.html", "--prompt", "the", "max_new_tokens=30", "allow_images=false",
                        "allow_audio=false", "text.temperature=0")
    assert rc == 0, err
    assert out == expected + "\n" + f"wrote {tmp_path / 'a.html'} (1 document(s), 0 image(s), 0 audio clip(s))\n"

    rc, out, err = _gen(ckpt, tmp_path / "b.html", "--prompt", "the", "max_new_tokens=40", "min_images=1",
                        "text.temperature=0", "allow_audio=false")
    n = tokenizer.image.tokens_per_image
    assert rc == 0 and "1 image(s)" in out and "image 1: 100%" in err and f"{n}/{n}" in err, err

    rc, out, err = _gen(ckpt, tmp_path / "c.html", "--prompt", "the", "max_new_tokens=30", "--quiet")
    assert rc == 0 and out.count("\n") == 1 and out.startswith("wrote ") and err == "", (out, err)

    # the stream itself, text around image and audio blocks, sampled: the text of the document
    import io

    cfg = GenerateConfig(max_new_tokens=80, max_audio_tokens=4, seed=5)
    for prompts in (["a"], ["a", "b"]):
        text, bars = io.StringIO(), io.StringIO()
        stream = TerminalStream(tok, cfg, rows=len(prompts), text_out=text, progress_out=bars)
        docs = omni.generate(model, tok, prompts, cfg, on_token=stream.on_token)
        stream.close()
        if len(prompts) == 1:
            assert docs[0].segments and text.getvalue() == docs[0].text + "\n" * bool(docs[0].text)
        else:  # a batch: no text, one bar over the tokens
            assert text.getvalue() == "" and "generating 2 rows" in bars.getvalue()


def test_compile_says_it_compiles(tmp_path, ckpt, monkeypatch):
    """compile=true says the first call compiles (the compiling itself is faked here: it takes a minute)."""
    monkeypatch.setattr("omni.generation.generator.compiled_decoder", lambda model: model)
    rc, out, err = _gen(ckpt, tmp_path / "a.html", "--prompt", "a", "max_new_tokens=3", "compile=true")
    assert rc == 0 and "compiling the decoder (first call, about a minute on a CPU)" in err, err


def test_device_is_checked_before_loading(tmp_path, ckpt):
    """Friction 19: --device; an unknown or absent device is one line naming the valid ones."""
    rc, out, err = _gen(ckpt, tmp_path / "a.html", "--prompt", "a", "--device", "cpu", "max_new_tokens=3")
    assert rc == 0, err
    for device, needle in (("banana", "'banana' is not a device name"), ("cuda:99", "'cuda:99' is not available")):
        rc, out, err = _gen(tmp_path / "no_checkpoint", tmp_path / "b.html", "--prompt", "a", "--device", device)
        assert rc == 2 and needle in err and "cpu" in err.split("valid")[-1], err
        assert err.count("\n") == 1  # one line, before the (missing) checkpoint is looked at


def test_out_is_checked_before_loading(tmp_path, ckpt):
    """Friction 20 and bug 4: --out must be an .html page in a folder that can be written; refused
    in one line before the checkpoint is read (here it does not even exist)."""
    missing = tmp_path / "no_checkpoint"
    (tmp_path / "file.txt").write_text("a regular file")
    (tmp_path / "adir.html").mkdir()
    cases = [
        (tmp_path / "g" / "x.png", "--out must end in .html (its suffix is '.png')"),
        (tmp_path / "x.md", "--out must end in .html (its suffix is '.md')"),
        (tmp_path / "x", "--out must end in .html (it has no suffix)"),
        (tmp_path / "file.txt" / "x.html", "cannot write into"),
        (tmp_path / "adir.html", "is a folder"),
    ]
    for out_path, needle in cases:
        rc, out, err = _gen(missing, out_path, "--prompt", "a")
        assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, (out_path, err)
    rc, out, err = _gen(ckpt, tmp_path / "new" / "deep" / "x.html", "--prompt", "a", "max_new_tokens=3", "--quiet")
    assert rc == 0 and (tmp_path / "new" / "deep" / "x.md").is_file(), err


def test_generate_keys_typos_and_both_key_forms(tmp_path, ckpt):
    """Friction 16: a misspelt key gets 'did you mean'; keys work relative to the generate section and
    in full (generate.text.temperature)."""
    import re

    rc, out, err = _gen(ckpt, tmp_path / "a.html", "--prompt", "a", "max_new_token=5")
    # the suggestion may be relative or in full: both forms are accepted as keys (below)
    assert rc == 2 and re.search(r"unknown config key 'generate\.max_new_token'\. Did you mean "
                                 r"'(generate\.)?max_new_tokens'\?", err), err
    rc, out, err = _gen(ckpt, tmp_path / "a.html", "--prompt", "a", "text.temprature=0")
    assert rc == 2 and re.search(r"Did you mean '(generate\.text\.)?temperature'\?", err), err
    for key in ("text.temperature=0", "generate.text.temperature=0"):
        rc, out, err = _gen(ckpt, tmp_path / "b.html", "--prompt", "a", key, "max_new_tokens=3")
        assert rc == 0 and "text.temperature=0.0 (command line)" in err, (key, err)
