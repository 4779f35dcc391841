"""The converter's fast paths (conversion/formats.py, io.py, output.py) against what they replace:
the FP8 decode and int8 encode must give the quant contracts' bits exactly (every e4m3 code,
subnormal products, NaN codes, ragged shapes) both through the compiled kernels
(conversion/_kernels.c) and through the torch path they fall back to, and the background reader / writer must hash and
write exactly the bytes a plain sequential pass would, failing loudly and leaving no file."""

import blake3
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v4hal.backends import registry
from v4hal.checkpoint_files import CheckpointError
from v4hal.conversion import formats, io, kernels, output
from v4hal.ops import quant
from v4hal.ops._check import OpInputError


MODES = {"compiled": "1", "compiled-portable": "portable", "torch": "0"}


@pytest.fixture(scope="module", params=list(MODES), autouse=True)
def decode_path(request):
    """Every test here runs through the compiled kernels (with their AVX2 loops where the CPU has
    them, and with the portable ones) and through the torch path."""
    before = os.environ.get("V4HAL_CONVERT_KERNELS")
    os.environ["V4HAL_CONVERT_KERNELS"] = MODES[request.param]
    assert kernels.enabled() == (request.param != "torch"), kernels.describe()
    yield request.param
    if before is None:
        del os.environ["V4HAL_CONVERT_KERNELS"]
    else:
        os.environ["V4HAL_CONVERT_KERNELS"] = before


def deepseek_dequant(q: torch.Tensor, s: torch.Tensor, out_dtype) -> torch.Tensor:
    """float32(e4m3) * fp32 block scale, rounded once to out_dtype (DeepSeek's weight_dequant)."""
    n, k = q.shape
    full = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return (q.to(torch.float32) * full).to(out_dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN (payloads are not part of the contract)."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    ints = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return torch.equal(a[~nan].view(ints), b[~nan].view(ints))


def every_code(n: int, k: int, gen) -> torch.Tensor:
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
    m = min(256, n * k)
    codes.view(-1)[:m] = torch.arange(m, dtype=torch.uint8)
    return codes.view(torch.float8_e4m3fn)


def spread_scales(n: int, k: int, gen) -> torch.Tensor:
    """Scales from 2**-40 (products far below float32's normal range) to just under 2**8,
    with a zero."""
    shape = (math.ceil(n / 128), math.ceil(k / 128))
    s = torch.rand(shape, generator=gen) * torch.exp2(torch.randint(-40, 8, shape, generator=gen).float())
    s.view(-1)[0] = 0.0
    return s


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (129, 7), (1, 1)])
def test_fp8_decode_is_bit_exact_on_every_code(shape, out_dtype):
    gen = torch.Generator().manual_seed(shape[0])
    q, s = every_code(*shape, gen), spread_scales(*shape, gen)
    got = formats.decode_rows("fp8", q, s, 0, out_dtype)
    assert got.dtype == out_dtype and got.shape == shape
    assert same_bits(got, deepseek_dequant(q, s, out_dtype))
    with registry.forced("cpu"):  # the reference contract
        assert same_bits(got, quant.dequantize_fp8(q, s, out_dtype=out_dtype))
    nan_codes = (q.view(torch.uint8) & 0x7F) == 0x7F
    assert bool(got[nan_codes].isnan().all()) and not bool(got[~nan_codes].isnan().any())


def test_fp8_decode_of_a_later_row_chunk_uses_its_block_rows():
    gen = torch.Generator().manual_seed(1)
    q, s = every_code(640, 300, gen), spread_scales(640, 300, gen)
    whole = deepseek_dequant(q, s, torch.bfloat16)
    assert same_bits(formats.decode_rows("fp8", q[256:512], s, 256, torch.bfloat16), whole[256:512])
    assert same_bits(formats.decode_rows("fp8", q[512:], s, 512, torch.bfloat16), whole[512:])


def test_subnormal_codes_and_products_are_exact():
    codes = torch.tensor([[0x00, 0x80, 0x01, 0x81, 0x07, 0x87, 0x08, 0x7E, 0xFE]], dtype=torch.uint8)
    q = codes.view(torch.float8_e4m3fn)
    expect = torch.tensor([0.0, -0.0, 2.0**-9, -(2.0**-9), 7 * 2.0**-9, -7 * 2.0**-9, 2.0**-6, 448.0, -448.0])
    for scale, out_dtype in [(1.0, torch.float32), (2.0**-120, torch.float32), (2.0**-130, torch.bfloat16)]:
        got = formats.decode_rows("fp8", q, torch.tensor([[scale]]), 0, out_dtype)
        assert same_bits(got[0], (expect * scale).to(out_dtype))  # expect * scale is exact in float32
    assert torch.equal(formats.decode_rows("fp8", q[:, :2], torch.ones(1, 1), 0).view(torch.int32),
                       torch.tensor([[0, -2**31]], dtype=torch.int32))  # +0 and -0 keep their sign


def test_bf16_ties_round_to_even():
    # 1 + 2**-8 puts a product of a power-of-two code exactly halfway between two BF16 values;
    # 1 + 3 * 2**-8 too, with the other parity: one rounds down, the other up, as torch rounds.
    q = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(2, 128)
    for scale in (1 + 2.0**-8, 1 + 3 * 2.0**-8, 2.0**-100 * (1 + 2.0**-8)):
        s = torch.tensor([[scale]])
        assert same_bits(formats.decode_rows("fp8", q, s, 0, torch.bfloat16), deepseek_dequant(q, s, torch.bfloat16))
    one = torch.tensor([[0x38]], dtype=torch.uint8).view(torch.float8_e4m3fn)  # 1.0
    assert formats.decode_rows("fp8", one, torch.tensor([[1 + 2.0**-8]]), 0, torch.bfloat16).item() == 1.0
    assert formats.decode_rows("fp8", one, torch.tensor([[1 + 3 * 2.0**-8]]), 0, torch.bfloat16).item() == 1 + 2.0**-6


def test_scales_out_of_the_fast_range_go_to_the_contract():
    gen = torch.Generator().manual_seed(2)
    q = every_code(128, 256, gen)
    s = torch.tensor([[300.0, 1.0]])
    assert same_bits(formats.decode_rows("fp8", q, s, 0, torch.bfloat16), deepseek_dequant(q, s, torch.bfloat16))
    for bad in (float("inf"), float("nan"), -1.0):  # refused, as every backend's dequantize_fp8 refuses them
        with pytest.raises(OpInputError, match="dequantize_fp8.*'scale'.*non-negative"):
            formats.decode_rows("fp8", q, torch.tensor([[bad, 1.0]]), 0, torch.bfloat16)
    with pytest.raises(OpInputError, match="dequantize_fp8.*scale"):  # a wrong scale shape still names op and argument
        formats.decode_rows("fp8", q, torch.ones(1, 3), 0, torch.bfloat16)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 300), seed=st.integers(0, 2**16), bf16=st.booleans())
def test_fp8_decode_matches_the_reference_for_any_shape(n, k, seed, bf16):
    gen = torch.Generator().manual_seed(seed)
    q, s = every_code(n, k, gen), spread_scales(n, k, gen)
    out_dtype = torch.bfloat16 if bf16 else torch.float32
    assert same_bits(formats.decode_rows("fp8", q, s, 0, out_dtype), deepseek_dequant(q, s, out_dtype))


@pytest.mark.parametrize("backend", ["cpu", "cpu_fast"])
@pytest.mark.parametrize("shape", [(300, 7168), (5, 3), (1, 1)])
def test_int8_encode_equals_the_contract(backend, shape):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-20, 20, (shape[0], 1), generator=gen).float())
    x[0] = 0.0  # an all-zero row: scale clamps to 1e-8 / 127
    if shape[1] >= 4:  # amax 127 makes the scale exactly 1: x / scale lands on .5, which rounds to even
        x[-1] = x[-1].clamp(-1, 1)
        x[-1, :4] = torch.tensor([127.0, 2.5, 3.5, -2.5])
    q, s, off = formats.encode_rows("int8", x, {})
    with registry.forced(backend):
        q_ref, s_ref = quant.quantize_int8(x)
    assert q.dtype == torch.int8 and torch.equal(q, q_ref)
    assert torch.equal(s, s_ref.unsqueeze(1)) and torch.equal(off, torch.zeros_like(off))
    if shape[1] >= 4:
        assert q[-1, :4].tolist() == [127, 2, 4, -2]


def two_step_w8a8(q: torch.Tensor, s: torch.Tensor):
    """The W8A8 path before fusion: FP8 -> float32 chunk (the contract), then the int8 contract."""
    with registry.forced("cpu"):
        return quant.quantize_int8(quant.dequantize_fp8(q, s, out_dtype=torch.float32))


def power_of_two_scales(n: int, k: int, gen) -> torch.Tensor:
    """ue8m0 scales (powers of two stored as float32), products from normal down to subnormal."""
    shape = (math.ceil(n / 128), math.ceil(k / 128))
    return torch.exp2(torch.randint(-140, 8, shape, generator=gen).float())


@pytest.mark.parametrize("scales", [spread_scales, power_of_two_scales])
@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (129, 7), (1, 1), (2, 7168)])
def test_fused_fp8_to_int8_equals_decode_then_encode_on_every_code(shape, scales):
    gen = torch.Generator().manual_seed(shape[1])
    q = every_code(*shape, gen)
    q = torch.where((q.view(torch.uint8) & 0x7F) == 0x7F, q.view(torch.uint8) & 0xF0, q.view(torch.uint8)).view(q.dtype)
    s = scales(*shape, gen)
    q.view(torch.uint8)[-1, :] = 0  # an all-zero row: its scale clamps to 1e-8 / 127
    out = torch.full(shape, 99, dtype=torch.int8)
    q8, scale, offset = formats.convert_rows("fp8", "int8", q, s, 0, {}, out)
    q_ref, s_ref = two_step_w8a8(q, s)
    assert q8.data_ptr() == out.data_ptr()  # computed in the caller's buffer
    assert torch.equal(q8, q_ref) and torch.equal(scale, s_ref.unsqueeze(1)) and not offset.any()
    assert torch.equal(formats.fp8_to_int8_rows(q, s)[0], q_ref)  # and without one


def test_fused_fp8_to_int8_of_a_later_row_chunk_uses_its_block_rows():
    gen = torch.Generator().manual_seed(7)
    q = every_code(640, 300, gen)
    q = torch.where((q.view(torch.uint8) & 0x7F) == 0x7F, q.view(torch.uint8) ^ 0x01, q.view(torch.uint8)).view(q.dtype)
    s = spread_scales(640, 300, gen)
    q_ref, s_ref = two_step_w8a8(q, s)
    for r0, r1 in ((0, 256), (256, 512), (512, 640)):
        got, scale, _ = formats.convert_rows("fp8", "int8", q[r0:r1], s, r0, {})
        assert torch.equal(got, q_ref[r0:r1]) and torch.equal(scale[:, 0], s_ref[r0:r1])


def test_w8a8_of_nan_codes_or_out_of_range_scales_takes_the_two_step_path():
    gen = torch.Generator().manual_seed(8)
    q = every_code(128, 256, gen)  # holds the NaN codes 0x7F and 0xFF
    assert formats.fp8_to_int8_rows(q, torch.ones(1, 2)) is None
    with pytest.raises(OpInputError, match="quantize_int8.*x"):  # refused as the contract refuses NaN
        formats.convert_rows("fp8", "int8", q, torch.ones(1, 2), 0, {})
    q = torch.where((q.view(torch.uint8) & 0x7F) == 0x7F, q.view(torch.uint8) & 0xF0, q.view(torch.uint8)).view(q.dtype)
    s = torch.tensor([[300.0, 1.0]])  # beyond the bit trick's range: decoded by the contract
    assert formats.fp8_to_int8_rows(q, s) is None
    got, scale, _ = formats.convert_rows("fp8", "int8", q, s, 0, {})
    q_ref, s_ref = two_step_w8a8(q, s)
    assert torch.equal(got, q_ref) and torch.equal(scale[:, 0], s_ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_int8_encode_rejects_non_finite_values_like_the_contract(bad):
    x = torch.randn(600, 700)
    x[450, 3] = bad
    with pytest.raises(OpInputError, match="quantize_int8.*x"):
        formats.encode_rows("int8", x, {})


def test_fp8_decode_restores_the_callers_thread_count():
    # A count of its own: the decode drops to 1 thread, and CI runs the tests with 1 already.
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        formats.decode_rows("fp8", torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.ones(1, 1), 0)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("algo", ["blake3", "sha256", None])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("announce", ["exact", "wrong", "none"])
def test_hashing_reader_hashes_every_byte_in_order(tmp_path, monkeypatch, algo, direct, announce):
    monkeypatch.setattr(io, "READ_CHUNK", 1000)  # many gap reads through the background hasher
    if not direct:  # a filesystem without O_DIRECT: reads through the page cache
        monkeypatch.setattr(io, "_open_direct_read", lambda opened: None)
    gen = torch.Generator().manual_seed(4)
    from safetensors.torch import save_file

    tensors = {f"t{i}": torch.randn(50 + i, 33, generator=gen) for i in range(6)}
    tensors["odd"] = torch.randint(0, 255, (37, 3), dtype=torch.uint8, generator=gen)  # later tensors start off 4-byte alignment
    tensors["t9"] = torch.randn(9, 5, dtype=torch.float64, generator=gen)
    save_file(tensors, str(tmp_path / "a.safetensors"))
    infos, _, _ = io.read_header(tmp_path / "a.safetensors")
    reader = io.HashingReader(str(tmp_path / "a.safetensors"), algo=algo)
    wanted = ("t1", "t3", "t0", "t9")  # t0 sits before t1: read out of the stream
    chunks = [(name, r, min(r + 7, infos[name].shape[0])) for name in wanted for r in range(0, infos[name].shape[0], 7)]
    reads = [(infos[n].start + r0 * infos[n].row_bytes, (r1 - r0) * infos[n].row_bytes) for n, r0, r1 in chunks]
    if announce == "wrong":  # one read differs from the announcement: the rest is read as asked
        reads[3] = (reads[3][0], reads[3][1] + 1)
    if announce != "none":
        reader.expect(reads)
    for name in wanted:  # skipping t2 and the others: the hash must still cover them
        got = torch.cat([reader.rows(infos[name], r0, r1) for n, r0, r1 in chunks if n == name])
        assert torch.equal(got, tensors[name])
    expected = io.HASHES[algo]((tmp_path / "a.safetensors").read_bytes()).hexdigest() if algo else None
    assert reader.finish() == expected


def test_hashing_reader_names_a_file_truncated_under_it(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "a.safetensors"))
    infos, _, _ = io.read_header(tmp_path / "a.safetensors")
    reader = io.HashingReader(str(tmp_path / "a.safetensors"))
    os.truncate(tmp_path / "a.safetensors", infos["w"].start + 100)
    with pytest.raises(CheckpointError, match="a.safetensors.*truncated"):
        reader.rows(infos["w"], 0, 64)


@pytest.mark.parametrize("direct, sync_file_range", [(True, True), (False, True), (False, False)])
def test_shard_writer_writes_and_hashes_exactly_the_bytes_given(tmp_path, monkeypatch, direct, sync_file_range):
    monkeypatch.setattr(output, "WRITE_BEHIND", 4096)  # exercise the writeback kicks on a small file,
    monkeypatch.setattr(output, "STAGE", 2 * output.ALIGN)  # and O_DIRECT's full-stage writes and padded tail
    if not sync_file_range:  # the fallback where libc lacks it
        monkeypatch.setattr(output, "_SYNC_FILE_RANGE", None)
    gen = torch.Generator().manual_seed(5)
    parts = [torch.randn(100, 37, generator=gen).bfloat16(), torch.randint(-128, 127, (3000,), dtype=torch.int8, generator=gen)]
    specs = [output.OutSpec("a", torch.bfloat16, (100, 37)), output.OutSpec("b", torch.int8, (3000,))]
    for fsync in (True, False):
        path = tmp_path / f"out{fsync}.safetensors"
        w = output.ShardWriter(path, specs, {"format": "pt"}, fsync=fsync, direct=direct)
        assert direct or not w.direct
        w.write(parts[0][:40])
        w.write(parts[0][40:].t().contiguous().t())  # a non-contiguous piece is written in row order
        w.write(parts[1])
        sha, size = w.close()
        data = path.read_bytes()
        assert size == len(data) and sha == blake3.blake3(data).hexdigest()
        assert data == output.header_bytes(specs, {"format": "pt"}) + b"".join(p.contiguous().view(torch.uint8).numpy().tobytes() for p in parts)
        assert not output.partial_name(path).exists()


@pytest.mark.parametrize("direct", [True, False])
def test_shard_writer_buffers_go_to_the_file_in_order_whatever_their_alignment(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(output, "STAGE", 3 * io.ALIGN)  # stage flushes between and inside placed writes
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(1000, 37, generator=gen).bfloat16()
    b = torch.randint(-128, 127, (3001,), dtype=torch.int8, generator=gen)
    specs = [output.OutSpec("a", torch.bfloat16, (1000, 37)), output.OutSpec("b", torch.int8, (3001,))]
    w = output.ShardWriter(tmp_path / "o.safetensors", specs, {"format": "pt"}, direct=direct)

    def placed(t):
        buf = w.buffer(t.nbytes)
        assert buf.dtype == torch.uint8 and buf.numel() == t.nbytes
        if w.direct:  # where its first byte will sit in the file, within an aligned block
            assert buf.data_ptr() % io.ALIGN == w.written % io.ALIGN
        out = buf.view(t.dtype).reshape(t.shape)
        out.copy_(t)
        return out

    w.write(placed(a[:301]))           # after the (unaligned) header
    w.buffer(100)                      # a buffer never written: the next write is an ordinary one
    w.write(a[301:302])                # a few bytes, gathered
    w.write(placed(a[302:900]))        # placed again, at another offset in its block
    stale = w.buffer(a[900:].nbytes)
    w.write(placed(a[900:950]))        # the other buffer was made for this offset, not this one
    stale.view(torch.bfloat16).reshape(100, 37).copy_(a[900:])
    w.write(stale.view(torch.bfloat16).reshape(100, 37)[50:])  # made for an earlier offset: copied
    w.write(placed(b))                 # under a block: gathered
    digest, size = w.close()
    data = (tmp_path / "o.safetensors").read_bytes()
    assert data == output.header_bytes(specs, {"format": "pt"}) + a.view(torch.uint8).numpy().tobytes() + b.numpy().tobytes()
    assert size == len(data) and digest == blake3.blake3(data).hexdigest()


def test_unhashed_writer_and_the_disk_benchmark_write_the_same_bytes(tmp_path, monkeypatch):
    from v4hal.bench.conversion import disk_write

    monkeypatch.setattr(output, "STAGE", 2 * output.ALIGN)
    specs = [output.OutSpec("a", torch.int8, (3 * output.ALIGN + 5,))]
    part = torch.randint(-128, 127, (3 * output.ALIGN + 5,), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    w = output.ShardWriter(tmp_path / "x.safetensors", specs, algo=None)
    w.write(part)
    sha, size = w.close()
    data = (tmp_path / "x.safetensors").read_bytes()
    assert sha is None and size == len(data) and data == output.header_bytes(specs) + part.numpy().tobytes()
    assert disk_write(tmp_path, 5 * output.ALIGN + 7) > 0
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # the benchmark cleans up


def test_a_failing_background_write_surfaces_and_leaves_no_file(tmp_path, monkeypatch):
    specs = [output.OutSpec("a", torch.float32, (1000,))]
    w = output.ShardWriter(tmp_path / "x.safetensors", specs)

    def broken(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w, "_put", broken)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(20):  # the failure is raised by a later write or by close
            w.write(torch.zeros(50))
        w.close()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_close_refuses_a_short_file(tmp_path):
    w = output.ShardWriter(tmp_path / "x.safetensors", [output.OutSpec("a", torch.float32, (10,))])
    w.write(torch.zeros(5))
    with pytest.raises(RuntimeError, match="got .* planned"):
        w.close()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_the_kernel_switch_refuses_unknown_values(monkeypatch):
    monkeypatch.setenv("V4HAL_CONVERT_KERNELS", "fast")
    with pytest.raises(ValueError, match="V4HAL_CONVERT_KERNELS: expected one of 1, portable, 0, got 'fast'"):
        kernels.enabled()


def test_the_compiled_kernels_are_built():
    # Built by `pip install` where a C compiler is at hand (CI's machines have one); without it
    # conversions fall back to the torch path, and this test says why.
    assert kernels._kernels is not None, kernels.UNAVAILABLE


@pytest.mark.parametrize("target", ["bf16", "w8a8"])
def test_conversion_output_is_the_same_bytes_with_and_without_the_kernels(decode_path, target, tmp_path):
    from convert_util import cli, expert_shards, file_bytes

    src = expert_shards(tmp_path / "src", seed=5)
    for switch, out in (("1", "compiled"), ("portable", "portable"), ("0", "torch")):
        os.environ["V4HAL_CONVERT_KERNELS"] = switch
        assert cli("run", "--to", target, "--no-progress", "--workers", "1", src, tmp_path / out) == 0
    os.environ["V4HAL_CONVERT_KERNELS"] = MODES[decode_path]
    assert file_bytes(tmp_path / "compiled") == file_bytes(tmp_path / "portable") == file_bytes(tmp_path / "torch")


@pytest.mark.parametrize("bad, match", [
    (lambda q, s, o: (q.t(), s, o), "q: expected a contiguous 2-d float8_e4m3fn"),
    (lambda q, s, o: (q.view(torch.uint8), s, o), "q: expected a contiguous 2-d float8_e4m3fn"),
    (lambda q, s, o: (q, s[:, :1], o), r"s: expected float32 \(2, 2\)"),
    (lambda q, s, o: (q, s.double(), o), r"s: expected float32"),
    (lambda q, s, o: (q, s, o[:, :10]), "out: expected a contiguous"),
    (lambda q, s, o: (q, s, o.half()), "out: expected"),
])
def test_kernel_arguments_are_checked_before_the_c_code_sees_them(bad, match):
    if kernels._kernels is None:
        pytest.fail(kernels.UNAVAILABLE)
    q = torch.zeros(200, 200, dtype=torch.float8_e4m3fn)
    args = bad(q, torch.ones(2, 2), torch.empty(200, 200, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=match):
        kernels.dequant_fp8(*args)
    with pytest.raises(ValueError, match="row_scale: expected contiguous float32"):
        kernels.fp8_to_int8(q, torch.ones(2, 2), torch.empty(200, 200, dtype=torch.int8), torch.empty(199))
