"""`convert run --to fp8` and the config's `quantization_config.scale_fmt`, which also sets how the
model quantizes its activations at run time (ue8m0: power-of-two scales): converting a checkpoint
keeps what it computes. A ue8m0 source stays ue8m0 (its FP8 weights copied as shipped), an fp32
one stays fp32, and asking fp32 of a ue8m0 source is refused before anything is written."""

import json

import pytest
import torch
from safetensors.torch import load_file

from convert_util import cli
from test_model_loader import _quantize_dir
from test_model_logits import make_pair
from v4hal.model.config import ModelArgs
from v4hal.model.loader import load_checkpoint
from v4hal.model.model import build

# Tensors _quantize_dir leaves in float that the fp8 target would quantize: kept, so every tensor
# of the output is the source's.
KEEP = ["--keep", r"wo_a|compressor\."]


def v4_fp8(path, scale_fmt: str | None) -> None:
    """The tiny V4 with FP8 weights and ue8m0 block scales (float8_e8m0fnu, as V4 ships them), its
    config saying `scale_fmt` (None: no scale_fmt, as V3's configs)."""
    path.mkdir()
    make_pair("v4-mixed", path)
    _quantize_dir(path, ".scale", ue8m0=True)
    config = json.loads((path / "config.json").read_text())
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    config["quantization_config"] = quant if scale_fmt is None else {**quant, "scale_fmt": scale_fmt}
    (path / "config.json").write_text(json.dumps(config))


def our_logits(path) -> torch.Tensor:
    args = ModelArgs.from_json(path)
    model = build(args)
    load_checkpoint(model, path, args)
    ids = torch.randint(0, args.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids)


def tensors(path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("source_fmt,asked,written", [("ue8m0", None, "ue8m0"), ("ue8m0", "ue8m0", "ue8m0"),
                                                      ("fp32", None, "fp32"), (None, None, "fp32")],
                         ids=["ue8m0-default", "ue8m0-asked", "fp32-default", "unstated-default"])
def test_fp8_target_keeps_the_source_scale_fmt_and_its_logits(tmp_path, source_fmt, asked, written):
    v4_fp8(tmp_path / "src", source_fmt)
    extra = ["--scale-fmt", asked] if asked else []
    assert cli("run", "--to", "fp8", *extra, *KEEP, "--no-progress", tmp_path / "src", tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["scale_fmt"] == written
    src, out = tensors(tmp_path / "src"), tensors(tmp_path / "out")
    assert src.keys() == out.keys()
    for name, t in src.items():  # FP8 weights and their e8m0 scales copied as shipped
        assert out[name].dtype == t.dtype and torch.equal(out[name].view(torch.uint8), t.view(torch.uint8)), name
    assert torch.equal(our_logits(tmp_path / "out"), our_logits(tmp_path / "src"))
    assert cli("verify", tmp_path / "out", "--source", tmp_path / "src") == 0


def test_fp32_scales_of_a_ue8m0_source_are_refused(tmp_path, capsys):
    v4_fp8(tmp_path / "src", "ue8m0")
    assert cli("run", "--to", "fp8", "--scale-fmt", "fp32", "--no-progress", tmp_path / "src", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "--scale-fmt fp32" in err and "scale_fmt 'ue8m0'" in err and "activations" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_ue8m0_asked_of_an_fp32_source_requantizes_and_says_so(tmp_path):
    """An explicit re-quantization to power-of-two scales (e.g. for hardware that needs them): the
    weights are re-encoded, and the config says ue8m0, so activations are scaled so too."""
    v4_fp8(tmp_path / "src", "fp32")
    assert cli("run", "--to", "fp8", "--scale-fmt", "ue8m0", *KEEP, "--no-progress", tmp_path / "src", tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    out = tensors(tmp_path / "out")
    scale = out["model.layers.0.attn.wq_b.scale"]
    assert scale.dtype == torch.float32 and bool((torch.frexp(scale)[0] == 0.5).all())
    assert cli("verify", tmp_path / "out", "--source", tmp_path / "src") == 0
