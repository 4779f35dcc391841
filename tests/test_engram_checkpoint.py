"""DeepSeek-V4.1 checkpoints and their Engram token map: the map built from the tokenizer saved
beside the shards (what the released model does), else from a saved `engram_token_map.json`, by
the loader and `v4hal generate`; clear errors when neither is there or the map does not fit."""

import json
import re

import pytest
import torch

from test_model_v41 import IMAGE, _ids, tiny_v41
from v4hal.cli import main
from v4hal.model.engram import TOKEN_MAP_FILE
from v4hal.model.generate import generate
from v4hal.model.loader import LoadError, load_checkpoint
from v4hal.model.model import build
from v4hal.model.save import save_checkpoint


def word_tokenizer(distinct: int = 300, upper: int = 212):
    """A WordLevel tokenizer: `w0 .. w{distinct-1}`, then `W0 .. W{upper-1}` (the same words in
    capitals, so they share the lower-case words' compressed ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(distinct)] + [f"W{i}" for i in range(upper)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def expected_map(distinct: int = 300, upper: int = 212) -> list[int]:
    """What `word_tokenizer` compresses to, worked by hand: w_i -> i, W_i -> i, the image dead."""
    ids = list(range(distinct)) + list(range(upper)) + [-1] * (512 - distinct - upper)
    ids[IMAGE] = -1
    return ids


def checkpoint(tmp_path, token_map=None):
    """A tiny V4.1 checkpoint in `tmp_path / "ckpt"` (random weights, float64) and its model."""
    model = build(tiny_v41(), dtype=torch.float64).init_random(0)
    if token_map is not None:
        model.set_engram_token_map(token_map)
    save_checkpoint(model, model.args, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def load(directory, **kw):
    model = build(tiny_v41(), dtype=torch.float64)
    return model, load_checkpoint(model, directory, model.args, **kw)


def test_the_loader_builds_the_map_from_the_checkpoints_tokenizer(tmp_path):
    _, ckpt = checkpoint(tmp_path)
    assert not (ckpt / TOKEN_MAP_FILE).exists()  # saved without a map
    word_tokenizer().save_pretrained(ckpt)
    model, report = load(ckpt)
    assert report.engram_token_map == "tokenizer.json" and "Engram token map from tokenizer.json" in report.summary()
    assert model.model.engram_hashing.token_map.tolist() == expected_map()
    explicit = build(tiny_v41(), dtype=torch.float64)
    load_checkpoint(explicit, ckpt, explicit.args, engram_token_map=ckpt / "tokenizer.json")
    assert torch.equal(explicit.model.engram_hashing.token_map, model.model.engram_hashing.token_map)
    assert explicit.model.engram_hashing.pad_id == 2  # "w2"


def test_a_tokenizer_shorter_than_the_padded_vocabulary_marks_the_rest_dead(tmp_path):
    _, ckpt = checkpoint(tmp_path)
    word_tokenizer(300, 100).save_pretrained(ckpt)
    model, _ = load(ckpt)
    assert model.model.engram_hashing.token_map.tolist() == expected_map(300, 100)


def test_the_loader_falls_back_to_the_saved_map_and_generate_uses_it(tmp_path, capsys):
    token_map = torch.randint(0, 300, (512,), generator=torch.Generator().manual_seed(4))
    original, ckpt = checkpoint(tmp_path, token_map)
    saved = json.loads((ckpt / TOKEN_MAP_FILE).read_text())["token_map"]
    assert saved == original.model.engram_hashing.token_map.tolist() and saved[IMAGE] == -1
    model, report = load(ckpt)
    assert report.engram_token_map == TOKEN_MAP_FILE
    assert torch.equal(model.model.engram_hashing.token_map, original.model.engram_hashing.token_map)
    ids = _ids(12)
    with torch.no_grad():
        assert torch.equal(model(ids), original(ids))
    prompt = [3, 40, 7, IMAGE, 9]
    expected = generate(original, [prompt], 4).tokens[0]
    assert main(["generate", "--config", str(ckpt / "config.json"), "--weights", str(ckpt),
                 "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"Engram token map from {TOKEN_MAP_FILE}" in out and f"generated: {expected}" in out


def test_generate_takes_the_tokenizer_over_the_saved_map_and_an_explicit_file_over_both(tmp_path, capsys):
    _, ckpt = checkpoint(tmp_path, torch.zeros(512, dtype=torch.long))
    word_tokenizer().save_pretrained(ckpt)
    from_tokenizer, _ = load(ckpt)
    assert from_tokenizer.model.engram_hashing.token_map.tolist() == expected_map()
    explicit = tmp_path / "map.json"
    explicit.write_text(json.dumps({"token_map": list(range(300)) + [1] * 212}))
    model, report = load(ckpt, engram_token_map=explicit)
    assert report.engram_token_map == "map.json" and model.model.engram_hashing.token_map[:300].tolist() == list(range(300))
    assert main(["generate", "--config", str(ckpt / "config.json"), "--weights", str(ckpt), "--prompt-ids", "1,2",
                 "--max-new-tokens", "2", "--engram-token-map", str(explicit)]) == 0
    assert "Engram token map from map.json" in capsys.readouterr().out


def test_no_map_and_maps_that_do_not_fit_are_named(tmp_path, capsys):
    _, ckpt = checkpoint(tmp_path)
    model, report = load(ckpt)  # the loader leaves it unset; a forward says so
    assert report.engram_token_map is None
    with pytest.raises(RuntimeError, match="no compressed token map"):
        model(_ids(12))
    assert main(["generate", "--config", str(ckpt / "config.json"), "--weights", str(ckpt), "--prompt-ids", "1,2"]) == 2
    assert ("V4.1's Engram needs the compressed token map, and the folder holds neither a tokenizer.json nor an "
            "engram_token_map.json; pass --engram-token-map FILE") in capsys.readouterr().err
    (ckpt / TOKEN_MAP_FILE).write_text(json.dumps({"token_map": [0] * 100}))
    with pytest.raises(LoadError, match=r"engram_token_map.json: Engram: argument 'token_map' expected one compressed "
                                        r"id per token of the vocabulary \(512\), got shape \(100,\)"):
        load(ckpt)
    (ckpt / TOKEN_MAP_FILE).write_text("[1, 2")
    with pytest.raises(LoadError, match=r"engram_token_map.json: expected \{\"token_map\""):
        load(ckpt)
    word_tokenizer(301, 211).save_pretrained(ckpt)  # 301 compressed ids, the config says 300
    with pytest.raises(LoadError, match=r"tokenizer.json: Engram: argument 'tokenizer' expected 300 compressed ids "
                                        r"\(engram_compressed_vocab_size\), got 301"):
        load(ckpt)
    word_tokenizer(300, 213).save_pretrained(ckpt)  # 513 tokens for a 512-entry vocabulary
    with pytest.raises(LoadError, match=r"tokenizer.json: .* expected one compressed id per token of the "
                                        r"vocabulary \(512\), got shape \(513,\)"):
        load(ckpt)
    with pytest.raises(LoadError, match="Engram token map .*absent.json: no such file"):
        load(ckpt, engram_token_map=tmp_path / "absent.json")
    dead_pad = torch.zeros(512, dtype=torch.long)
    dead_pad[2] = -1  # engram_pad_token_id
    with pytest.raises(ValueError, match="argument 'token_map' expected a compressed id for engram_pad_token_id 2"):
        model.set_engram_token_map(dead_pad)


@pytest.mark.parametrize("target", ["copy", "bf16"])
def test_convert_re_encodes_float8_tables_as_bf16_exactly(target, tmp_path, capsys):
    """`convert run --engram-tables bf16` (for Ascend A2 / A3, which cannot read float8): each
    table decoded exactly (e4m3 value times its ue8m0 power of two: the tiny model's scale bytes,
    124 .. 126, are inside 3 .. 246, where BF16 holds every product; the next test covers the
    rest), its scale gone; the lookups and the model's logits are those of the float8 tables."""
    from safetensors.torch import load_file

    from test_model_v41 import tiny_model
    from v4hal import ops
    from v4hal.model.config import ModelArgs

    model = tiny_model(quantized=True)
    save_checkpoint(model, model.args, tmp_path / "src")
    assert main(["convert", "run", "--to", target, "--engram-tables", "bf16", "--no-progress", "--workers", "1",
                 str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert main(["convert", "verify", "--source", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    source, out = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for i in (1, 3):
        weight, scale = source[f"model.layers.{i}.engram.embed.weight"], source[f"model.layers.{i}.engram.embed.scale"]
        rows = torch.randint(0, weight.shape[0], (5, 7, 4), generator=torch.Generator().manual_seed(i))  # every row
        table = out[f"model.layers.{i}.engram.embed.weight"]
        assert table.dtype == torch.bfloat16 and f"model.layers.{i}.engram.embed.scale" not in out
        exponents = scale.view(torch.uint8)
        assert 3 <= int(exponents.min()) and int(exponents.max()) <= 246
        exact = weight.double() * torch.exp2(exponents.double() - 127).repeat_interleave(32, 1)
        assert torch.equal(table.double(), exact)
        assert torch.equal(ops.engram_lookup(rows, table, dtype=torch.float64),
                           ops.engram_lookup(rows, weight, scale, dtype=torch.float64))
    args = ModelArgs.from_json(tmp_path / "out" / "config.json")
    assert bool(args.quantization_config) == (target == "copy")  # copy keeps it: the loader adopts the bf16 table
    converted = build(args, dtype=torch.float64)
    report = load_checkpoint(converted, tmp_path / "out", args)
    assert report.engram_token_map == TOKEN_MAP_FILE  # carried along by the conversion
    embed = converted.model.layers[1].engram.embed
    # copy: a float8-built table adopts the bf16 one as stored; bf16: built float, in the model's dtype
    assert embed.weight.dtype == (torch.bfloat16 if target == "copy" else torch.float64) and embed.scale is None
    ids = _ids(12)
    with torch.no_grad():
        if target == "copy":
            assert torch.equal(converted(ids), model(ids))
        else:  # the other weights in bf16: close
            torch.testing.assert_close(converted(ids), model(ids), rtol=0.05, atol=0.05)
    capsys.readouterr()
    assert main(["convert", "run", "--to", "mindspore", "--engram-tables", "bf16", str(tmp_path / "src"),
                 str(tmp_path / "ms")]) == 2
    assert "--engram-tables re-encodes in safetensors targets" in capsys.readouterr().err


def test_bf16_tables_are_exact_wherever_bf16_holds_the_product(tmp_path):
    """Every e4m3 code under every scale byte 0 .. 246: the BF16 table is the exact product rounded
    once to nearest-even, so exact for bytes 3 .. 246; below, products under 2^-126 keep only
    BF16's subnormal steps of 2^-133 (2^-134 or less: 0). (Bytes 247 .. 254: the next test.)"""
    from safetensors.torch import load_file

    from convert_util import cli, write_shards

    codes = torch.arange(256, dtype=torch.uint8)
    codes = torch.where((codes & 0x7F) == 0x7F, 0, codes).expand(247, 256)  # the NaN codes as 0
    exponents = torch.arange(247, dtype=torch.uint8)[:, None].expand(247, 8)
    name = "layers.1.engram.embed"
    write_shards(tmp_path / "src", [{f"{name}.weight": codes.contiguous().view(torch.float8_e4m3fn),
                                     f"{name}.scale": exponents.contiguous().view(torch.float8_e8m0fnu)}])
    assert cli("run", "--to", "copy", "--engram-tables", "bf16", "--no-progress", tmp_path / "src", tmp_path / "out") == 0
    assert cli("verify", "--source", tmp_path / "src", tmp_path / "out") == 0
    (path,) = (tmp_path / "out").glob("*.safetensors")
    out = load_file(str(path))[f"{name}.weight"]
    exact = codes.view(torch.float8_e4m3fn).double() * torch.exp2(exponents.double() - 127).repeat_interleave(32, 1)
    assert out.dtype == torch.bfloat16 and torch.equal(out, exact.to(torch.bfloat16)) and bool(out.isfinite().all())
    inexact = out.double() != exact
    assert inexact.any(1).nonzero().flatten().tolist() == [0, 1, 2]
    lost, magnitude = out[inexact].double(), exact[inexact].abs()
    assert bool((magnitude < 2.0**-126).all()) and torch.equal(lost == 0, magnitude <= 2.0**-134)


def test_bf16_tables_whose_products_overflow_are_refused_and_verify_flags_inf(tmp_path, capsys):
    """Scale bytes 247 .. 254 times e4m3 codes whose product reaches 2^128 would be +-inf in BF16:
    `convert run --engram-tables bf16` refuses the table, naming it and the first such scale. A
    block under byte 254 whose products stay below 2^128 converts exactly. `convert verify` flags
    an output holding inf where the source's value is finite (inf equals inf after rounding)."""
    from safetensors.torch import load_file, save_file

    from convert_util import cli, write_shards
    from v4hal.conversion.verify import verify

    name = "layers.1.engram.embed"
    one, tiny, largest = 0x38, 0x01, 0x7E  # e4m3 1.0, 2^-9, 448
    codes = torch.full((4, 64), one, dtype=torch.uint8)
    exponents = torch.full((4, 2), 127, dtype=torch.uint8)
    codes[3, :32], exponents[3, 0] = tiny, 254  # 2^-9 * 2^127: finite
    exponents[2, 1], exponents[1, 1] = 247, 250  # 1.0 * 2^120 and 2^123: finite ...
    codes[2, 40], codes[1, 35] = largest, 0xB8 | largest  # ... but +-448 * 2^120 / 2^123 are not

    def source(directory, weight, scale):
        write_shards(directory, [{f"{name}.weight": weight.view(torch.float8_e4m3fn),
                                  f"{name}.scale": scale.view(torch.float8_e8m0fnu)}])

    source(tmp_path / "bad", codes, exponents)
    assert cli("run", "--to", "copy", "--engram-tables", "bf16", "--no-progress", tmp_path / "bad", tmp_path / "x") != 0
    err = capsys.readouterr().err
    assert f"{name}.weight" in err and "overflow BF16" in err
    assert "first under scale [1, 1] (byte 250)" in err, err

    fine = codes.clone()
    fine[2, 40], fine[1, 35] = one, one
    source(tmp_path / "src", fine, exponents)
    assert cli("run", "--to", "copy", "--engram-tables", "bf16", "--no-progress", tmp_path / "src", tmp_path / "out") == 0
    (path,) = (tmp_path / "out").glob("*.safetensors")
    out = load_file(str(path))
    assert out[f"{name}.weight"][3, 0].item() == 2.0**118 and out[f"{name}.weight"][2, 40].item() == 2.0**120
    # what an unchecked conversion of the bad source wrote: verify (hashes aside) must flag it
    (src_path,) = (tmp_path / "src").glob("*.safetensors")
    save_file({f"{name}.weight": codes.view(torch.float8_e4m3fn), f"{name}.scale": exponents.view(torch.float8_e8m0fnu)},
              str(src_path))
    table = out[f"{name}.weight"].clone()
    table[2, 40], table[1, 35] = float("inf"), float("-inf")
    _patch_tensor(path, f"{name}.weight", table)
    problems = verify(tmp_path / "out", tmp_path / "src", check_hash=False)
    assert len(problems) == 1 and "2 element(s)" in problems[0] and "first at [1, 35]: -inf for a finite source value" in problems[0], problems


def _patch_tensor(path, name: str, tensor: torch.Tensor) -> None:
    """Overwrite `name`'s bytes in the safetensors file `path` in place (its size unchanged)."""
    with open(path, "r+b") as f:
        header = int.from_bytes(f.read(8), "little")
        start = json.loads(f.read(header))[name]["data_offsets"][0]
        f.seek(8 + header + start)
        f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def _with_table_scales(src, dst, change) -> list[str]:
    """`src` copied to `dst` with `change` applied to every Engram table scale; their names."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    scales = sorted(k for k in state if k.endswith(".engram.embed.scale"))
    assert scales and all(state[k].dtype == torch.float8_e8m0fnu for k in scales)
    save_file({k: change(v) if k in scales else v for k, v in state.items()}, dst / "model.safetensors")
    return scales


@pytest.mark.parametrize("built", ["float8", "float"])
def test_table_scales_stored_as_uint8_load_as_the_same_exponent_bytes(built, tmp_path):
    """V4.1 Engram table scales stored as uint8 hold the ue8m0 exponent bytes (as `engram_lookup`
    and vLLM's V4.1 loader read them): a table built float8 takes them as float8_e8m0fnu, one built
    float (a config without quantization_config) adopts them so, and the logits equal, bit for
    bit, those of the same checkpoint with float8_e8m0fnu scales."""
    from test_model_v41 import tiny_model

    model = tiny_model(quantized=True)
    save_checkpoint(model, model.args, tmp_path / "e8m0")
    _with_table_scales(tmp_path / "e8m0", tmp_path / "uint8", lambda s: s.view(torch.uint8))
    ids, logits = _ids(12), {}
    for stored in ("e8m0", "uint8"):
        fresh = build(tiny_v41(quantized=built == "float8"), dtype=torch.float64)
        load_checkpoint(fresh, tmp_path / stored, fresh.args)
        table = fresh.model.layers[1].engram.embed
        assert table.weight.dtype == torch.float8_e4m3fn and table.scale.dtype == torch.float8_e8m0fnu
        with torch.no_grad():
            logits[stored] = fresh(ids)
    assert torch.equal(logits["uint8"], logits["e8m0"])
    if built == "float8":
        with torch.no_grad():
            assert torch.equal(logits["uint8"], model(ids))


@pytest.mark.parametrize("built", ["float8", "float"])
def test_table_scales_with_byte_0xff_or_another_dtype_are_refused_naming_them(built, tmp_path):
    from test_model_v41 import tiny_model

    model = tiny_model(quantized=True)
    save_checkpoint(model, model.args, tmp_path / "ckpt")

    def nan_byte(scale):
        scale = scale.view(torch.uint8).clone()
        scale[3, 0] = 0xFF
        return scale

    bad = {"nan": nan_byte, "f16": lambda s: s.float().to(torch.float16)}
    expected = {"nan": r"1 Engram table scale byte\(s\) 0xFF, e8m0's NaN \(stored as torch.uint8",
                "f16": r"Engram table scale stored as torch.float16: expected torch.uint8 or torch.float8_e8m0fnu "
                       r"or torch.float32"}
    for kind, change in bad.items():
        scales = _with_table_scales(tmp_path / "ckpt", tmp_path / kind, change)
        fresh = build(tiny_v41(quantized=built == "float8"), dtype=torch.float64)
        with pytest.raises(LoadError) as caught:
            load_checkpoint(fresh, tmp_path / kind, fresh.args)
        message = str(caught.value)
        assert "missing" not in message, message
        for name in scales:
            assert re.search(f"{re.escape(name)}: {expected[kind]}", message), message


@pytest.mark.parametrize("built", ["float8", "float"])
def test_float32_table_scales_that_are_not_powers_of_two_load_exactly(built, tmp_path):
    """float32 table scales are factors as stored (`engram_lookup` reads them exactly): a table
    built float8 or float keeps them, not rounded to the float8_e8m0fnu the model builds, and the
    logits equal those of the model whose tables hold the same float32 factors."""
    from test_model_v41 import tiny_model

    from v4hal.model.engram import EngramTable

    model = tiny_model(quantized=True)
    save_checkpoint(model, model.args, tmp_path / "ckpt")
    scales = _with_table_scales(tmp_path / "ckpt", tmp_path / "f32", lambda s: s.float() * 0.75)
    tables = [m for m in model.modules() if isinstance(m, EngramTable)]
    assert len(tables) == len(scales)
    for table in tables:
        table.scale = torch.nn.Parameter(table.scale.float() * 0.75, requires_grad=False)
    fresh = build(tiny_v41(quantized=built == "float8"), dtype=torch.float64)
    load_checkpoint(fresh, tmp_path / "f32", fresh.args)
    for mine, theirs in zip((m for m in fresh.modules() if isinstance(m, EngramTable)), tables):
        assert mine.scale.dtype == torch.float32 and torch.equal(mine.scale, theirs.scale)
    ids = _ids(12)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
