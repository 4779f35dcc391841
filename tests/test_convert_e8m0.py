"""FP8 checkpoints whose 128x128 block scales are stored as float8_e8m0fnu, as DeepSeek ships V4
(ue8m0 scales): every target converts them to exactly what the same checkpoint with float32
scales of the same values converts to, a copy keeps them as shipped, and e8m0's NaN byte is
refused naming the tensor."""

import pytest
import torch
from safetensors.torch import load_file

from convert_util import cli, file_bytes, write_shards
from v4hal.conversion import formats
from v4hal.ops import quant

WEIGHT = "layers.0.attn.wq_b"    # resharded along dim 0
OUTPUT = "layers.0.attn.wo"      # resharded along dim 1
EXPERT = "layers.0.ffn.experts.1.w2"  # goes whole to rank 1 of 2
SPLIT_DIM = {WEIGHT: 0, OUTPUT: 1}


def v4_fp8(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three V4-named FP8 weights (every e4m3 code but NaN, ragged tails) with e8m0 scale bytes
    from 0 (2**-127: subnormal products) to 134 (2**7, the top of the fast decode's range)."""
    gen = torch.Generator().manual_seed(seed)
    shard = {"layers.0.attn_norm.weight": torch.randn(200, generator=gen).bfloat16()}
    for name, (n, k) in ((WEIGHT, (256, 200)), (OUTPUT, (300, 256)), (EXPERT, (260, 384))):
        codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
        codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
        codes = torch.where((codes & 0x7F) == 0x7F, codes & 0xF0, codes)  # no NaN codes
        exps = torch.randint(100, 135, quant.scale_shape((n, k), quant.WEIGHT_BLOCK), dtype=torch.uint8, generator=gen)
        exps.view(-1)[0] = 0
        shard[f"{name}.weight"], shard[f"{name}.scale"] = codes.view(torch.float8_e4m3fn), exps.view(torch.float8_e8m0fnu)
    return shard


def with_float32_scales(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same checkpoint with its scales as float32 2**(byte - 127), computed in float64."""
    return {k: torch.exp2(v.view(torch.uint8).double() - 127).float() if v.dtype == torch.float8_e8m0fnu else v
            for k, v in shard.items()}


def shards(path) -> dict[str, bytes]:
    return {k: v for k, v in file_bytes(path).items() if k.endswith(".safetensors")}


@pytest.mark.parametrize("target,extra", [("bf16", []), ("w8a8", []), ("fp8", ["--scale-fmt", "ue8m0"]),
                                          ("mxfp8", []), ("bf16", ["--mp", "2"])],
                         ids=["bf16", "w8a8", "fp8-ue8m0", "mxfp8", "bf16-mp2"])
def test_e8m0_scales_convert_as_float32_scales_do(tmp_path, target, extra):
    e8m0 = v4_fp8()
    assert e8m0[f"{WEIGHT}.scale"].view(torch.uint8).min() == 0
    write_shards(tmp_path / "e8m0", [e8m0])
    write_shards(tmp_path / "f32", [with_float32_scales(e8m0)])
    for name in ("e8m0", "f32"):
        assert cli("run", "--to", target, *extra, "--no-progress", tmp_path / name, tmp_path / f"{name}-out") == 0
    assert shards(tmp_path / "e8m0-out") == shards(tmp_path / "f32-out")  # byte for byte
    assert len(shards(tmp_path / "e8m0-out")) == (2 if "--mp" in extra else 1)
    assert cli("verify", tmp_path / "e8m0-out", "--source", tmp_path / "e8m0") == 0


def test_e8m0_scales_take_the_fast_fp8_decode(tmp_path, monkeypatch):
    write_shards(tmp_path / "src", [v4_fp8(1)])
    monkeypatch.setattr(quant, "dequantize_fp8", lambda *a, **k: pytest.fail("the contract's decode ran"))
    monkeypatch.setattr(formats, "_dequant_fp8", counted := _Counted(formats._dequant_fp8))
    assert cli("run", "--to", "bf16", "--no-progress", tmp_path / "src", tmp_path / "out") == 0
    assert counted.calls >= 2
    assert cli("run", "--to", "w8a8", "--no-progress", tmp_path / "src", tmp_path / "w8a8") == 0  # the one-pass W8A8


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("extra", [[], ["--mp", "2"]])
def test_copy_keeps_e8m0_scales_as_shipped(tmp_path, extra):
    src = v4_fp8(2)
    write_shards(tmp_path / "src", [src])
    assert cli("run", "--to", "copy", *extra, "--no-progress", tmp_path / "src", tmp_path / "out") == 0
    ranks = [load_file(str(p)) for p in sorted((tmp_path / "out").glob("*.safetensors"))]
    for name, t in src.items():
        parts = [r[name].view(torch.uint8) for r in ranks if name in r]
        assert all(r[name].dtype == t.dtype for r in ranks if name in r)
        dim = SPLIT_DIM.get(name.rsplit(".", 1)[0])
        whole = torch.cat(parts, dim) if dim is not None and len(ranks) > 1 else parts[-1]
        assert torch.equal(whole, t.view(torch.uint8)), name
    assert cli("verify", tmp_path / "out", "--source", tmp_path / "src") == 0


@pytest.mark.parametrize("target", ["bf16", "w8a8", "fp8", "mxfp8"])
def test_an_e8m0_nan_scale_is_refused_naming_the_tensor(tmp_path, capsys, target):
    src = v4_fp8(3)
    src[f"{EXPERT}.scale"].view(torch.uint8)[1, 2] = 0xFF
    write_shards(tmp_path / "src", [src])
    extra = ["--scale-fmt", "ue8m0"] if target == "fp8" else []
    assert cli("run", "--to", target, *extra, "--no-progress", tmp_path / "src", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"tensor '{EXPERT}.scale'" in err and "0xFF (NaN)" in err and "[1, 2]" in err


def test_verify_refuses_an_e8m0_nan_scale_in_the_source(tmp_path, capsys):
    src = v4_fp8(4)
    write_shards(tmp_path / "src", [src])
    assert cli("run", "--to", "bf16", "--no-progress", tmp_path / "src", tmp_path / "out") == 0
    src[f"{WEIGHT}.scale"].view(torch.uint8)[0, 0] = 0xFF
    write_shards(tmp_path / "src", [src])
    capsys.readouterr()
    assert cli("verify", "--no-hash", tmp_path / "out", "--source", tmp_path / "src") != 0
    captured = capsys.readouterr()
    assert f"tensor '{WEIGHT}.scale'" in captured.out + captured.err and "0xFF (NaN)" in captured.out + captured.err


def test_float_scale_is_exact_for_every_byte():
    data = torch.arange(255, dtype=torch.uint8).view(torch.float8_e8m0fnu).reshape(15, 17)
    got = formats.float_scale(data, None)
    assert got.dtype == torch.float32
    want = torch.exp2(torch.arange(255, dtype=torch.float64) - 127).reshape(15, 17)
    assert torch.equal(got.double(), want) and got.view(torch.int32)[0, 0] == 0x00400000  # 2**-127: subnormal
    plain = torch.rand(2, 3)
    assert formats.float_scale(plain, None) is plain
