"""Document types: media from files, short reprs, Document.text, writing images and audio back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image as PILImage

import omni
from omni.document import to_pixels
from omni.errors import OmniError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def png(tmp_path) -> tuple[Path, np.ndarray]:
    rgb = np.random.default_rng(0).integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
    path = tmp_path / "square.png"
    PILImage.fromarray(rgb).save(path)
    return path, rgb


def test_image_from_a_path(png, tmp_path):
    path, rgb = png
    want = to_pixels(rgb)
    for given in (str(path), path):  # str and os.PathLike, read as the CLI reads them
        img = omni.Image(given)
        assert img.pixels.shape == (3, 10, 14)
        torch.testing.assert_close(img.pixels, want, atol=0, rtol=0)
    rgba = tmp_path / "clear.png"  # transparency onto white, omni.media's rule
    PILImage.new("RGBA", (6, 5), (0, 0, 0, 0)).save(rgba)
    assert torch.equal(omni.Image(rgba).pixels, torch.ones(3, 5, 6))


def test_images_a_few_pixels_high_keep_their_layout(tmp_path):
    # A file or PIL image is [H,W,3]; 1, 3 or 4 pixels high it used to be taken for [C,H,W].
    pil = PILImage.new("RGB", (5, 3), (255, 0, 0))  # 5 wide, 3 high
    pil.save(tmp_path / "strip.png")
    red = torch.zeros(3, 3, 5)
    red[0] = 1
    assert torch.equal(omni.Image(pil).pixels, red)
    assert torch.equal(omni.Image(tmp_path / "strip.png").pixels, red)


def test_image_refusals_name_the_input(tmp_path):
    with pytest.raises(OmniError, match=f"image file not found: {tmp_path / 'missing.png'}$"):
        omni.Image(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(OmniError, match=r"cannot read image .*bad.png: UnidentifiedImageError"):
        omni.Image(tmp_path / "bad.png")
    accepted = r"give a file path \(str or os.PathLike\), a PIL image, a numpy array or a torch tensor"
    with pytest.raises(OmniError, match=f"Image cannot take a dict; {accepted}"):
        omni.Image({"pixels": [1, 2]})
    with pytest.raises(OmniError, match=f"Image cannot take a list not holding numbers; {accepted}"):
        omni.Image(["a.png", "b.png"])
    assert omni.Image([[0.0, 1.0], [1.0, 0.0]]).pixels.shape == (3, 2, 2)  # nested numbers still are an array


def test_audio_from_a_path(tmp_path):
    t = np.arange(2205) / 22050
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 220 * t)], 1).astype(np.float32)
    path = tmp_path / "tone.wav"
    sf.write(path, stereo, 22050, subtype="FLOAT")
    clip = omni.Audio(str(path))
    assert clip.sample_rate == 22050  # the file's rate, not the 16000 of a bare wave
    torch.testing.assert_close(clip.wave, torch.from_numpy(stereo.mean(1)))  # mono: the channels' mean
    assert omni.Audio(path, 22050).sample_rate == 22050  # agreeing is fine
    with pytest.raises(OmniError, match=r"tone.wav is at 22050 Hz but sample_rate=16000 was given"):
        omni.Audio(path, 16000)
    with pytest.raises(OmniError, match=f"audio file not found: {tmp_path / 'missing.wav'}$"):
        omni.Audio(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF nonsense")
    with pytest.raises(OmniError, match=r"cannot read audio .*bad.wav: .*\(supported: wav, flac, ogg\)"):
        omni.Audio(tmp_path / "bad.wav")
    with pytest.raises(OmniError, match=r"Audio cannot take a dict; give a file path .*a numpy array or a torch tensor"):
        omni.Audio({"wave": [0.1]})
    assert omni.Audio(np.zeros(8, np.float32)).sample_rate == 16000  # a bare wave's default


def test_short_reprs():
    img = omni.Image(torch.rand(3, 64, 64))
    clip = omni.Audio(torch.zeros(19680), 16000)
    long = "a red circle to the left of a blue square " * 5
    assert repr(img) == "Image(3x64x64)"
    assert repr(clip) == "Audio(1.23 s at 16000 Hz)"
    assert repr(omni.Text("a red circle")) == "Text('a red circle')"
    assert repr(omni.Text(long)) == f"Text({long[:60]!r}... {len(long)} chars)"
    doc = omni.Document([omni.Text("a red circle"), img, clip], dropped=["1 text id dropped"])
    assert repr(doc) == ("Document([Text('a red circle'), Image(3x64x64), Audio(1.23 s at 16000 Hz)], "
                         "dropped=['1 text id dropped'])")
    assert str(doc) == repr(doc)  # print(doc): one line, no tensor values


def test_document_text_separates_text_runs_at_media(tokenizer):
    img = omni.Image(torch.rand(3, 16, 16))
    doc = omni.Document([omni.Text("a red circle"), img, omni.Text("then a blue square")])
    assert doc.text == "a red circle\nthen a blue square"
    # adjacent Text segments are one run of text ids: they join as typed, as decoding joins them
    assert omni.Document([omni.Text("a red"), omni.Text(" circle")]).text == "a red circle"
    assert omni.Document([img, omni.Text("x"), img, img, omni.Text("y"), img]).text == "x\ny"
    assert omni.Document([img]).text == ""
    back = tokenizer.decode(tokenizer.encode(doc))
    assert [type(s).__name__ for s in back] == ["Text", "Image", "Text"] and back.text == doc.text


def test_image_to_pil_and_save(png, tmp_path):
    path, rgb = png
    img = omni.Image(path)
    pil = img.to_pil()
    assert pil.mode == "RGB" and pil.size == img.size == (14, 10)
    assert np.array_equal(np.asarray(pil), rgb)  # uint8 -> float -> uint8 is exact
    out = img.save(tmp_path / "again.png")
    assert out == tmp_path / "again.png" and torch.equal(omni.Image(out).pixels, img.pixels)
    assert omni.Image(img.save(tmp_path / "lossy.jpg")).pixels.shape == (3, 10, 14)
    with pytest.raises(OmniError, match=r"cannot save an image as .*x.svg: unknown extension; valid: jpg, jpeg, png"):
        img.save(tmp_path / "x.svg")
    with pytest.raises(OmniError, match=r"folder .*nowhere does not exist"):
        img.save(tmp_path / "nowhere" / "x.png")


def test_audio_save(tmp_path):
    clip = omni.Audio(0.5 * torch.sin(torch.arange(4000) / 7.0), 8000)
    for ext in ("wav", "flac"):
        back = omni.Audio(clip.save(tmp_path / f"clip.{ext}"))
        assert back.sample_rate == 8000
        torch.testing.assert_close(back.wave, clip.wave, atol=1 / 32768, rtol=0)  # 16-bit PCM
    loud = omni.Audio(torch.tensor([2.0, -2.0, 0.5]), 8000)  # clipped, not wrapped around
    assert omni.Audio(loud.save(tmp_path / "loud.wav")).wave[:2].tolist() == pytest.approx([1.0, -1.0], abs=1e-4)
    with pytest.raises(OmniError, match=r"cannot save audio as .*clip.mp3: unknown extension; valid: wav, flac, ogg"):
        clip.save(tmp_path / "clip.mp3")
