"""msmodelslim W8A8 dynamic checkpoints, as `v4hal convert run --to w8a8` writes them, loaded by
our model loader end to end: tiny transformers DeepSeek V3 / V3.2 / V4 models saved with
`save_pretrained`, converted by the CLI, loaded kept quantized (int8 in memory, `int8_matmul`) and
dequantized, logits against our model loaded from the float source; and the refusals (non-zero
offset, description mismatches, missing or mis-shaped scales)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_util import cli, save_hf
from v4hal.model.config import ModelArgs
from v4hal.model.loader import LoadError, _PER_EXPERT, canonical_name, load_checkpoint
from v4hal.model.model import build

DESC = "quant_model_description.json"
# Error budget for logits, as DeepGEMM's figure of merit 1 - 2<a,b>/(|a|^2+|b|^2) (about half the
# squared relative rms error). Symmetric per-row int8 rounds each weight by at most s/2 with
# s = amax_row / 127; for these Gaussian rows (amax about 3 sigma) that is a relative rms error near
# 3 / 254 / sqrt(3) = 0.7% per GEMM, the same again for per-token int8 activations when kept
# quantized. About ten quantized GEMMs in series (two layers of attention and MoE) compound to at
# most ~3% rms, diff ~5e-4; 1e-3 allows that plus the logits' BF16 rounding. Measured: 3e-5 to 7e-5,
# and 4.4e-4 for V3.2 dequantized, where one token's top-2 expert choice flips. One linear's scale
# doubled gives 2.8e-2 to 4.8e-2, every scale vector reversed 2.4e-2 (test_corrupted_scale_fails_the_budget).
BUDGET = 1e-3


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(1 - 2 * (a * b).sum() / (a.square().sum() + b.square().sum()))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """kind -> (float source dir, W8A8 dir), built once per kind."""
    made = {}

    def get(kind: str):
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            save_hf(kind, root / "bf16")
            assert cli("run", "--to", "w8a8", "--no-progress", root / "bf16", root / "w8a8") == 0
            made[kind] = root / "bf16", root / "w8a8"
        return made[kind]

    return get


def ids_for(args: ModelArgs) -> torch.Tensor:
    # 12 tokens: within index_topk (16), so int8 noise cannot flip a V3.2 indexer choice
    return torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def loaded(directory, keep: bool = True):
    args = ModelArgs.from_json(directory)
    model = build(args)
    report = load_checkpoint(model, directory, args, keep_quantized=keep)
    return model, args, report


def logits(model, args) -> torch.Tensor:
    with torch.no_grad():
        return model(ids_for(args)).float()


def w8a8_weights(directory) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """raw weight name -> (int8 codes, scale [N, 1], offset [N, 1]) for every W8A8_DYNAMIC weight."""
    tensors = load_file(str(directory / "model.safetensors"))
    desc = json.loads((directory / DESC).read_text())
    return {k: (t, tensors[k + "_scale"], tensors[k + "_offset"]) for k, t in tensors.items()
            if k.endswith(".weight") and desc[k] == "W8A8_DYNAMIC"}


def rewrite(directory, edit) -> None:
    """Apply `edit(tensors, description)` to a copied W8A8 checkpoint, in place."""
    path = directory / "model.safetensors"
    tensors, desc = load_file(str(path)), json.loads((directory / DESC).read_text())
    edit(tensors, desc)
    save_file(tensors, str(path))
    (directory / DESC).write_text(json.dumps(desc))


def copy_of(converted, kind, tmp_path):
    out = tmp_path / "w8a8"
    shutil.copytree(converted(kind)[1], out)
    return out


@pytest.mark.parametrize("kind", ["v3", "v32", "v4"])
def test_w8a8_logits_within_int8_budget_of_the_float_source(converted, kind):
    src, w8 = converted(kind)
    ref, args, _ = loaded(src)
    want = logits(ref, args)
    n_quant = len(w8a8_weights(w8))
    kept, _, report = loaded(w8, keep=True)
    assert report.formats["int8"] == n_quant
    assert report.dequantized == 0  # MLA's kv_b_proj and V4's grouped o_a_proj stay int8 too
    got_kept = logits(kept, args)
    deq, _, report = loaded(w8, keep=False)
    assert report.dequantized == n_quant
    got_deq = logits(deq, args)
    assert diff(got_deq, want) < BUDGET and diff(got_kept, want) < BUDGET, (diff(got_deq, want), diff(got_kept, want))
    # int8 activations add error on top of the int8 weights: the kept model is not the dequantized one
    assert not torch.equal(got_kept, got_deq)


@pytest.mark.parametrize("kind", ["v3", "v4"])
def test_dequantized_load_is_exactly_q_minus_offset_times_scale(converted, kind, tmp_path):
    """keep_quantized=False: bitwise the model loaded from a float checkpoint holding
    (weight - weight_offset) * weight_scale, and every FLOAT tensor bitwise the source's."""
    src, w8 = converted(kind)
    twin = tmp_path / "twin"
    shutil.copytree(w8, twin)
    quant = w8a8_weights(w8)

    def to_float(tensors, desc):
        for k, (q, s, off) in quant.items():
            tensors[k] = (q.float() - off) * s
            del tensors[k + "_scale"], tensors[k + "_offset"]
        desc.clear()
    rewrite(twin, to_float)
    (twin / DESC).unlink()
    deq, args, _ = loaded(w8, keep=False)
    dense, _, _ = loaded(twin)
    ids = ids_for(args)
    with torch.no_grad():
        assert torch.equal(deq(ids), dense(ids))
    ref, _, _ = loaded(src)
    v4 = args.is_v4
    quant_targets = {_fused(canonical_name(k, v4)) for k in quant}
    ref_state, deq_state = ref.state_dict(), deq.state_dict()
    for name, t in ref_state.items():
        if name not in quant_targets:
            assert torch.equal(deq_state[name], t), name


def _fused(name: str) -> str:
    m = _PER_EXPERT.match(name)
    if m is None:
        return name
    return f"{m.group('prefix')}.{'down_proj' if m.group('proj') == 'down_proj' else 'gate_up_proj'}"


def test_shards_in_any_order(converted, tmp_path):
    """Scales and offsets in other shards than their weights, before or after them (with an index)."""
    _, w8 = converted("v4")
    split = tmp_path / "split"
    shutil.copytree(w8, split)
    tensors = load_file(str(split / "model.safetensors"))
    (split / "model.safetensors").unlink()
    names = sorted(tensors, reverse=True)  # `P.weight_scale` and `P.weight_offset` before `P.weight`
    weight_map = {}
    for i in range(3):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        part = names[i::3]
        save_file({k: tensors[k] for k in part}, str(split / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (split / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for keep in (True, False):
        one, args, _ = loaded(w8, keep)
        three, _, report = loaded(split, keep)
        assert report.files == 3
        assert torch.equal(logits(three, args), logits(one, args))


@pytest.mark.parametrize("kind", ["v3", "v4"])
def test_kept_quantized_weights_stay_int8_in_memory(converted, kind):
    _, w8 = converted(kind)
    model, args, _ = loaded(w8, keep=True)
    int8_bytes = 0
    for key, (q, s, _) in w8a8_weights(w8).items():
        name = canonical_name(key, args.is_v4)
        m = _PER_EXPERT.match(name)
        if m is not None:
            experts = model.get_submodule(m.group("prefix"))
            e, proj = int(m.group("e")), m.group("proj")
            fused = experts.down_proj if proj == "down_proj" else experts.gate_up_proj
            scales = experts.down_proj_scale if proj == "down_proj" else experts.gate_up_proj_scale
            rows = slice(0, q.shape[0]) if proj != "up_proj" else slice(q.shape[0], 2 * q.shape[0])
            assert fused.dtype == torch.int8 and scales.dtype == torch.float32, key
            assert torch.equal(fused[e, rows], q) and torch.equal(scales[e, rows], s.squeeze(1)), key
        else:
            linear = model.get_submodule(name[: -len(".weight")])
            assert linear.weight.dtype == torch.int8 and torch.equal(linear.weight, q), key
            assert linear.weight_scale_inv.shape == (q.shape[0],) and torch.equal(linear.weight_scale_inv, s.squeeze(1)), key
        int8_bytes += q.numel()
    assert int8_bytes > 0
    assert sum(t.numel() for t in model.state_dict().values() if t.dtype == torch.int8) == int8_bytes


def _double_one(tensors):
    key = "model.layers.1.self_attn.o_proj.weight_scale"
    tensors[key] = tensors[key] * 2  # an exponent off by one


def _reverse_all(tensors):
    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        tensors[key] = tensors[key].flip(0)  # every row scaled by another row's scale


@pytest.mark.parametrize("corrupt", [_double_one, _reverse_all])
@pytest.mark.parametrize("keep", [True, False])
def test_corrupted_scale_fails_the_budget(converted, tmp_path, keep, corrupt):
    """The budget can fail: scales that are wrong but well-formed load and run, and miss it."""
    src, _ = converted("v3")
    w8 = copy_of(converted, "v3", tmp_path)
    rewrite(w8, lambda t, d: corrupt(t))
    ref, args, _ = loaded(src)
    bad, _, _ = loaded(w8, keep=keep)
    assert diff(logits(bad, args), logits(ref, args)) > BUDGET


@pytest.mark.parametrize("keep", [True, False])
def test_nonzero_offset_is_rejected_by_name(converted, tmp_path, keep):
    w8 = copy_of(converted, "v4", tmp_path)
    key = "model.layers.1.attn.wq_b.weight_offset"
    rewrite(w8, lambda t, d: t[key].__setitem__(3, 2.0))
    args = ModelArgs.from_json(w8)
    with pytest.raises(LoadError, match=rf"{key}: non-zero weight offset \(max \|offset\| 2\)"):
        load_checkpoint(build(args), w8, args, keep_quantized=keep)


def test_missing_weight_scale(converted, tmp_path):
    w8 = copy_of(converted, "v3", tmp_path)
    name = "model.layers.0.mlp.gate_proj.weight"

    def drop(t, d):
        del t[name + "_scale"], d[name + "_scale"]
    rewrite(w8, drop)
    args = ModelArgs.from_json(w8)
    with pytest.raises(LoadError, match=rf"{name}: quantized \(torch.int8\) but no scale tensor .*weight_scale"):
        load_checkpoint(build(args), w8, args)


def test_misshaped_weight_scale(converted, tmp_path):
    w8 = copy_of(converted, "v3", tmp_path)
    key = "model.layers.1.mlp.experts.2.up_proj.weight_scale"
    rewrite(w8, lambda t, d: t.__setitem__(key, t[key][:-1]))
    args = ModelArgs.from_json(w8)
    with pytest.raises(LoadError, match=r"mis-shaped .*experts.2.up_proj.weight: int8 weight \[32, 64\] needs one scale "
                                        r"per output row \(\[32\] or \[32, 1\]\); its scale is \[31, 1\]"):
        load_checkpoint(build(args), w8, args)


@pytest.mark.parametrize("case", ["float-says-int8", "int8-says-float", "scale-not-float", "unnamed", "absent", "other-type"])
def test_description_mismatch_is_named(converted, tmp_path, case):
    w8 = copy_of(converted, "v3", tmp_path)
    q, norm = "model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.input_layernorm.weight"

    def edit(t, d):
        if case == "float-says-int8":
            d[norm] = "W8A8_DYNAMIC"
        elif case == "int8-says-float":
            d[q] = "FLOAT"
        elif case == "scale-not-float":
            t[q + "_scale"] = t[q + "_scale"].to(torch.int32)
        elif case == "unnamed":
            del d[q + "_offset"]
        elif case == "absent":
            d["model.layers.1.self_attn.q_b_proj.bias"] = "FLOAT"
        else:
            d[q] = d[q + "_scale"] = "W8A8"  # msmodelslim's static scheme: deq_scale, input_scale, ...
    rewrite(w8, edit)
    want = {"float-says-int8": rf"{norm}: {DESC} says W8A8_DYNAMIC but it is stored as BF16, not int8",
            "int8-says-float": rf"{q}: {DESC} says FLOAT but it is stored as int8",
            "scale-not-float": rf"{q}_scale: {DESC} says W8A8_DYNAMIC but this scale / offset is stored as I32, not float",
            "unnamed": rf"{q}_offset: not named in {DESC}",
            "absent": rf"model.layers.1.self_attn.q_b_proj.bias: named in {DESC} but not in the checkpoint",
            "other-type": rf"only W8A8_DYNAMIC and FLOAT quantization can be loaded; 2 entr\(ies\) name another type \({q}: 'W8A8'"}[case]
    args = ModelArgs.from_json(w8)
    with pytest.raises(LoadError, match=want):
        load_checkpoint(build(args), w8, args)
