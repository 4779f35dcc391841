"""ONNX export of v4hal's own model (`v4hal.model`) built from a config + weights.

`export` traces one fixed-shape prefill, `input_ids [batch, seq] int64 -> logits [batch, seq,
vocab] float32`, from position 0 without a KV cache, with the TorchScript exporter (opset 17; the
dynamo exporter needs onnxscript, which is not a dependency). What it changes, and why:

- ops run on the `cpu_fast` backend (tensor ops, no per-token Python loops);
- routed experts run as gathers of each token's chosen experts: under a trace `ops.moe_forward`
  takes that exchange step itself (`ops.moe.GatheredExperts`), because the grouped GEMM cuts rows
  per expert at sizes read from the routing, which a trace would freeze to the example input's
  routing. It reads one expert per (token, choice): fine for the tiny and small configs this is
  for, not for a full model;
- `aten::rms_norm` gets an ONNX definition (opset 17 has no RMSNormalization).

Nothing else is rewritten, so anything data-dependent left in a trace would freeze too. The
exporter therefore never trusts the trace: it runs the written graph in onnxruntime on the example
input and on fresh random inputs, compares with our model, and refuses (deletes the file, raises
`OnnxExportError`) when logits differ beyond the tolerance.

Limitations: fixed batch and sequence length (onnxruntime rejects other shapes), no KV cache (no
decode), float32 weights (quantized checkpoints are dequantized on load).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

OPSET = 17
BACKEND = "cpu_fast"
# float32 logits after a few layers of float32 GEMMs whose summation order differs (ORT vs torch):
# the error seen is ~3e-7; these leave room for deeper configs and still catch any frozen routing.
MAX_ABS_ERR = 1e-4
MIN_COSINE = 0.99999
FRESH_INPUTS = 3


class OnnxExportError(RuntimeError):
    """The exported graph does not reproduce our model (or cannot be exported); nothing written."""


@dataclass
class Agreement:
    """onnxruntime vs our model on one input."""

    label: str
    max_abs_err: float
    cosine: float

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= MAX_ABS_ERR and self.cosine >= MIN_COSINE

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"FAILS (max abs err <= {MAX_ABS_ERR:g}, cosine >= {MIN_COSINE})"
        return f"{self.label}: max abs err {self.max_abs_err:.3g}, cosine {self.cosine:.8f} {verdict}"


def build_model(preset: str | None = None, config: str | None = None, weights: str = "random", seed: int = 0):
    """(model, args): a float32 v4hal model from a preset name or a config.json (or its
    directory), with weights from a checkpoint directory (any layout `load_checkpoint` reads,
    dequantized) or `random` (seeded `init_random`)."""
    from v4hal.model.config import load_args
    from v4hal.model.loader import load_checkpoint
    from v4hal.model.model import build

    args = load_args(config=config, preset_name=preset)
    model = build(args, dtype=torch.float32)
    if weights == "random":
        model.init_random(seed)
    else:
        load_checkpoint(model, weights, args, keep_quantized=False)
    return model.eval(), args


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    from torch.onnx import symbolic_helper as sh

    node = normalized_shape.node()
    # A traced `x.shape[-1]` reaches here as a list of graph values, not a constant list.
    dims = (len(list(node.inputs())) if node.kind() == "prim::ListConstruct"
            else len(sh._get_const(normalized_shape, "is", "normalized_shape")))
    e = 1.1920928955078125e-07 if sh._is_none(eps) else sh._get_const(eps, "f", "eps")  # torch: finfo eps
    xf = g.op("Cast", x, to_i=1)  # float32 (the only dtype exported)
    mean_sq = g.op("ReduceMean", g.op("Mul", xf, xf), axes_i=list(range(-dims, 0)), keepdims_i=1)
    denom = g.op("Sqrt", g.op("Add", mean_sq, g.op("Constant", value_t=torch.tensor(e, dtype=torch.float32))))
    y = g.op("CastLike", g.op("Div", xf, denom), x)
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


@contextlib.contextmanager
def _export_mode(model):
    """The cpu_fast backend and ONNX's RMSNorm, undone on exit; refuses layers a trace cannot hold."""
    from v4hal.backends import registry
    from v4hal.model.moe import MoE

    for m in model.modules():
        if isinstance(m, MoE) and m.ep_group is not None:
            raise OnnxExportError("expert-parallel MoE layers cannot be exported; build the model on one device")
        if isinstance(m, MoE) and m.experts.gate_up_proj_scale is not None:
            raise OnnxExportError("quantized experts: build the model with dequantized weights")
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, OPSET)
    try:
        with registry.forced(BACKEND):
            # Choosing an op imports its backend modules; do it for every op before the trace,
            # which would record any tensor work an import does (a table, a probe) into its graph.
            for op in registry.ops():
                registry.choose(op)
            yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rms_norm", OPSET)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


def random_ids(vocab_size: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def session(path: str | Path):
    """An onnxruntime CPU session for an exported file."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, ids: torch.Tensor) -> torch.Tensor:
    """Logits of an exported graph (an onnxruntime session) for `input_ids`."""
    return torch.from_numpy(sess.run(["logits"], {"input_ids": ids.numpy()})[0])


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Our model's logits (its own backends, as a user runs it)."""
    with torch.no_grad():
        return model(ids).float()


def compare(model, sess, ids: torch.Tensor, label: str) -> Agreement:
    ref, got = reference_logits(model, ids), run(sess, ids)
    if got.shape != ref.shape:
        return Agreement(label, float("inf"), -1.0)
    err = (got - ref).abs().max()
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(), ref.double().flatten(), 0)
    return Agreement(label, float(err) if torch.isfinite(err) else float("inf"), float(cos))


def export(model, vocab_size: int, path: str | Path, seq_len: int = 16, batch: int = 1,
           fresh_inputs: int = FRESH_INPUTS, seed: int = 0) -> list[Agreement]:
    """Trace `model` for `[batch, seq_len]` prefills, write `path`, check it with onnx.checker and
    against our model in onnxruntime (the example input, then `fresh_inputs` others). Returns the
    agreements; raises OnnxExportError, leaving no file at `path`, when any of them fails."""
    import onnx

    for name, value in (("seq_len", seq_len), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"onnx export: {name} must be a positive int, got {value!r}")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    example = random_ids(vocab_size, batch, seq_len, seed)
    try:
        with _export_mode(model), torch.no_grad(), warnings.catch_warnings():
            # The tracer warns at every Python branch on a size or value; whether any of them
            # matters is what the onnxruntime comparison below decides.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "no signature found", UserWarning)  # ScriptModule
            try:
                traced = torch.jit.trace(_Logits(model), (example,), check_trace=False)
                torch.onnx.export(traced, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                                  input_names=["input_ids"], output_names=["logits"])
            except RuntimeError as exc:  # tracer / exporter failures (torch.onnx errors included)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise OnnxExportError(f"tracing or ONNX conversion failed: {first}") from exc
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
            sess = session(tmp)
        except Exception as exc:  # onnx.checker.ValidationError, onnxruntime's Fail / InvalidGraph
            raise OnnxExportError(f"the exported graph is not valid ONNX for onnxruntime: {exc}") from exc
        checks = [compare(model, sess, example, "example input (traced)")]
        checks += [compare(model, sess, random_ids(vocab_size, batch, seq_len, seed + 1 + i), f"fresh input {i + 1}")
                   for i in range(fresh_inputs)]
        if not all(c.ok for c in checks):
            raise OnnxExportError("onnxruntime logits differ from the v4hal model; nothing written:\n  "
                                  + "\n  ".join(map(str, checks)))
        os.replace(tmp, path)
        return checks
    finally:
        tmp.unlink(missing_ok=True)


def main(args: argparse.Namespace) -> int:
    model, margs = build_model(args.preset, args.config, args.weights, args.seed)
    checks = export(model, margs.vocab_size, args.output, args.seq, args.batch, seed=args.seed)
    print(f"wrote {args.output}: input_ids [{args.batch}, {args.seq}] int64 -> logits "
          f"[{args.batch}, {args.seq}, {margs.vocab_size}] float32, opset {OPSET}; onnx.checker ok")
    for c in checks:
        print(f"onnxruntime vs the v4hal model, {c}")
    return 0
