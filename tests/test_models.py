"""Model loading (local weights without pickle, config files, clear offline errors) and text encoding."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from traitloc.models.clip import ModelLoadError, load_clip, resolve_device
from traitloc.models.localize import ConceptLocalizer, input_size_for, preprocess_image
from traitloc.models.text import PromptError, TextEncoder, check_prompt

open_clip = pytest.importorskip("open_clip")
safetensors_torch = pytest.importorskip("safetensors.torch")

CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    cfg = d / "modeltest_tiny.json"
    cfg.write_text(json.dumps(CFG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(3)
    m = open_clip.create_model("modeltest_tiny", pretrained=None)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    st = d / "w.safetensors"
    safetensors_torch.save_file(sd, str(st))
    pt = d / "w.pt"
    torch.save(sd, pt)
    return {"cfg": cfg, "st": st, "pt": pt, "state": sd}


def test_load_local_weights_safetensors_and_pt(files):
    for w in ("st", "pt"):
        b = load_clip(str(files["cfg"]), str(files[w]), "cpu")
        for k, v in files["state"].items():
            torch.testing.assert_close(b.model.state_dict()[k], v)
        assert b.pretrained_sha256 and len(b.pretrained_sha256) == 64
        assert b.image_size == (64, 64)
        assert not any(p.requires_grad for p in b.model.parameters())
        assert b.describe()["pretrained_sha256"] == b.pretrained_sha256


class Evil:
    """Any non-tensor object in a checkpoint needs full unpickling, which weights_only=True refuses."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(files, tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({**files["state"], "x": Evil()}, bad)
    with pytest.raises(ModelLoadError, match="could not load weights"):
        load_clip(str(files["cfg"]), str(bad), "cpu")


def test_clear_errors(files, tmp_path):
    with pytest.raises(ModelLoadError, match="weights file not found"):
        load_clip(str(files["cfg"]), str(tmp_path / "missing.safetensors"), "cpu")
    with pytest.raises(ModelLoadError, match="unknown open_clip model"):
        load_clip("ViT-Nope-1", None, "cpu")
    with pytest.raises(ModelLoadError, match="model config file not found"):
        load_clip(str(tmp_path / "nope.json"), None, "cpu")
    wrong = tmp_path / "wrong.safetensors"
    safetensors_torch.save_file({"a": torch.zeros(2)}, str(wrong))
    with pytest.raises(ModelLoadError, match="could not load weights"):
        load_clip(str(files["cfg"]), str(wrong), "cpu")
    with pytest.raises(ValueError, match="unknown device|CUDA is not available"):
        resolve_device("cuda:0" if not torch.cuda.is_available() else "tpu")


def test_offline_tag_names_the_file_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="--pretrained /path/to/file"):
        load_clip("ViT-B-16", "laion400m_e32", "cpu")


def test_text_encoder_templates_cache_and_truncation(files):
    b = load_clip(str(files["cfg"]), str(files["st"]), "cpu")
    enc = TextEncoder(b)
    v = enc.encode(["red wing", "bird"])
    assert v.shape == (2, 32)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2))
    direct = torch.nn.functional.normalize(b.model.encode_text(b.tokenizer(["red wing"])), dim=-1)[0]
    torch.testing.assert_close(v[0], direct)
    torch.testing.assert_close(enc.encode(["  red   wing "])[0], v[0])  # whitespace-normalized cache hit
    ens = TextEncoder(b, templates=["a photo of {}.", "a bird with {}."]).encode(["red wing"])[0]
    manual = torch.nn.functional.normalize(
        torch.nn.functional.normalize(
            b.model.encode_text(b.tokenizer(["a photo of red wing.", "a bird with red wing."])), dim=-1
        ).mean(0),
        dim=-1,
    )
    torch.testing.assert_close(ens, manual)
    long = " ".join(["word"] * 200)
    with pytest.warns(UserWarning, match="truncated"):
        enc.encode([long])
    assert enc.truncated == [long]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["short prompt"])
    with pytest.raises(PromptError, match="empty prompt"):
        enc.encode(["   "])
    with pytest.raises(PromptError, match="placeholder"):
        TextEncoder(b, templates=["no placeholder"])
    assert check_prompt(" a  b ") == "a b"


def test_preprocess_and_input_sizes(files):
    from PIL import Image

    b = load_clip(str(files["cfg"]), str(files["st"]), "cpu")
    assert input_size_for((640, 480), (224, 224), "stretch", 16) == (224, 224)
    h, w = input_size_for((640, 320), (224, 224), "aspect", 16)
    assert h % 16 == 0 and w % 16 == 0 and abs(w / h - 2.0) < 0.2
    with pytest.raises(ValueError, match="resize mode"):
        input_size_for((1, 1), (224, 224), "crop", 16)
    im = Image.new("RGB", (64, 64), (255, 0, 0))
    t = preprocess_image(im, (64, 64), b.mean, b.std)
    assert t.shape == (3, 64, 64)
    torch.testing.assert_close(t[0, 0, 0], torch.tensor((1.0 - b.mean[0]) / b.std[0]))
    loc = ConceptLocalizer(b, resize="aspect")
    res = loc.explain([Image.new("RGB", (130, 60), (0, 128, 0))], ["red wing"], base="bird", gamma=0.5)
    assert res[0].map(0).shape == (60, 130)
    assert res[0].size == (60, 130)
    with pytest.raises(ValueError, match="unknown method"):
        ConceptLocalizer(b, "gradcam++")
