"""The dtypes a decoded scale may have, and that none is misread. ue8m0 scales stored as uint8
exponent bytes read as the float8_e8m0fnu of the same bytes where the runtime reads them so (V4.1's
Engram tables: `ops.engram_lookup`, and vLLM's loader keeps a uint8 scale's bytes; MXFP4 expert
scales: `ops.dequantize_fp4`); a dtype nothing reads, such as uint8 beside an FP8 weight (whose
128x128 scales `fp8_matmul` takes only as floats), is refused before anything is written, naming
the tensor, the dtypes expected and the one found."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_util import cli, file_bytes, random_fp8, write_shards

TABLE = "layers.1.engram.embed"
FP4 = "layers.0.ffn.experts.1.w1"
FP8 = "layers.0.attn.wq_b"


def engram_shard(scale_dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A float8 Engram table (every e4m3 code but NaN) with its ue8m0 scale bytes (0 .. 246) stored
    as `scale_dtype`, and an MXFP4 expert weight whose scale bytes are stored so too."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (300, 64), dtype=torch.uint8, generator=gen)
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    codes = torch.where((codes & 0x7F) == 0x7F, codes & 0xF0, codes)
    table_exps = torch.randint(100, 150, (300, 2), dtype=torch.uint8, generator=gen)
    table_exps.view(-1)[:3] = torch.tensor([0, 127, 246], dtype=torch.uint8)  # past 246 BF16 may overflow: refused
    fp4_exps = torch.randint(110, 140, (64, 4), dtype=torch.uint8, generator=gen)
    return {f"{TABLE}.weight": codes.view(torch.float8_e4m3fn), f"{TABLE}.scale": table_exps.view(scale_dtype),
            f"{FP4}.weight": torch.randint(-128, 128, (64, 64), dtype=torch.int8, generator=gen),
            f"{FP4}.scale": fp4_exps.view(scale_dtype)}


def shards(path) -> dict[str, bytes]:
    return {k: v for k, v in file_bytes(path).items() if k.endswith(".safetensors")}


@pytest.mark.parametrize("target", ["copy", "bf16", "mxfp8"])
def test_uint8_exponent_bytes_decode_as_e8m0_ones(tmp_path, target):
    for dtype in (torch.float8_e8m0fnu, torch.uint8):
        name = str(dtype).rsplit(".", 1)[1]
        write_shards(tmp_path / name, [engram_shard(dtype)])
        assert cli("run", "--to", target, "--engram-tables", "bf16", "--no-progress",
                   tmp_path / name, tmp_path / f"{name}-out") == 0
        assert cli("verify", tmp_path / f"{name}-out", "--source", tmp_path / name) == 0
    out, ref = (load_file(str(next((tmp_path / d).glob("*.safetensors")))) for d in ("uint8-out", "float8_e8m0fnu-out"))
    assert out.keys() == ref.keys()
    for name, t in ref.items():  # the same bytes (a kept scale in its own dtype)
        assert torch.equal(out[name].view(torch.uint8), t.view(torch.uint8)), name
    src = engram_shard(torch.uint8)
    # the exact product rounded once (byte 0 reaches BF16's underflow)
    exact = src[f"{TABLE}.weight"].double() * torch.exp2(src[f"{TABLE}.scale"].double() - 127).repeat_interleave(32, 1)
    assert out[f"{TABLE}.weight"].dtype == torch.bfloat16 and torch.equal(out[f"{TABLE}.weight"], exact.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.bfloat16])
def test_an_engram_table_scale_of_another_dtype_is_refused(tmp_path, capsys, dtype):
    src = engram_shard(torch.uint8)
    src[f"{TABLE}.scale"] = src[f"{TABLE}.scale"].to(dtype)  # 2**e stored as a number would be; e as one is here
    write_shards(tmp_path / "src", [src])
    assert cli("run", "--to", "copy", "--engram-tables", "bf16", "--no-progress", tmp_path / "src", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"tensor '{TABLE}.scale'" in err and "float8_e8m0fnu" in err and f"got {dtype}" in err, err
    assert not (tmp_path / "out").exists() or not shards(tmp_path / "out")


@pytest.mark.parametrize("target,extra", [("bf16", []), ("w8a8", []), ("mxfp8", []), ("fp8", ["--scale-fmt", "ue8m0"])])
def test_uint8_fp8_block_scales_are_refused_naming_the_tensor(tmp_path, capsys, target, extra):
    q, s = random_fp8(256, 256, torch.Generator().manual_seed(1))
    exps = torch.log2(s).round().to(torch.int64).add(127).to(torch.uint8)
    write_shards(tmp_path / "src", [{f"{FP8}.weight": q, f"{FP8}.scale": exps}])
    assert cli("run", "--to", target, *extra, "--no-progress", tmp_path / "src", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"tensor '{FP8}.scale'" in err and "float8_e8m0fnu" in err and "got torch.uint8" in err, err
    assert not (tmp_path / "out").exists() or not shards(tmp_path / "out")


def test_an_mxfp8_checkpoint_with_uint8_scales_is_refused_by_the_loader(tmp_path):
    """`--to mxfp8` writes float8_e8m0fnu scales; the same bytes as uint8 (which `.float()` would
    read as the integers 0-255) are refused on load, naming the tensor, not dequantized wrong."""
    from convert_util import save_hf
    from v4hal.model.config import ModelArgs
    from v4hal.model.loader import LoadError, load_checkpoint
    from v4hal.model.model import build

    save_hf("v3", tmp_path / "bf16")
    assert cli("run", "--to", "fp8", "--no-progress", tmp_path / "bf16", tmp_path / "fp8") == 0
    assert cli("run", "--to", "mxfp8", "--no-progress", tmp_path / "fp8", tmp_path / "mx") == 0
    (path,) = (tmp_path / "mx").glob("*.safetensors")
    tensors = load_file(str(path))
    e8m0 = sorted(k for k, v in tensors.items() if v.dtype == torch.float8_e8m0fnu)
    assert e8m0
    save_file({k: v.view(torch.uint8) if k in e8m0 else v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    args = ModelArgs.from_json(tmp_path / "mx" / "config.json")
    with pytest.raises(LoadError) as caught:
        load_checkpoint(build(args), tmp_path / "mx", args)
    message = str(caught.value)
    weight = e8m0[0].rsplit(".", 1)[0] + ".weight"
    assert weight in message and "MXFP8 scale stored as torch.uint8" in message and "float8_e8m0fnu" in message, message
