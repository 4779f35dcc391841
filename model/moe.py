"""`MoE`: one DeepSeek V3 / V3.2 / V4 mixture-of-experts layer holding its weights under
transformers' tensor names, run with `v4hal.ops.moe_forward`.

Tensor names (relative to the layer's `mlp.`), as transformers' `DeepseekV4SparseMoeBlock` and
`DeepseekV3MoE` name them:

    gate.weight                      [E, H]       router
    gate.e_score_correction_bias     [E] fp32     top-k layers (noaux_tc); absent on hash layers
    gate.tid2eid                     [vocab, k]   V4 hash layers only
    experts.gate_up_proj             [E, 2I, H]   gate rows then up rows
    experts.down_proj                [E, H, I]
    experts.gate_up_proj_scale       quantized experts only: [E, 2I/128, H/128] (FP8),
    experts.down_proj_scale            [E, N, K/32] (MXFP4, packed uint8 weights [E, N, K/2]),
                                       [E, N] (int8)
    shared_experts.{gate,up,down}_proj.weight (+ .weight_scale_inv when quantized; `MLP`)

Build it with plain numbers (the model builder passes its config's fields):

    MoE(hidden_size=4096, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=6, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
        swiglu_limit=10.0)                                   # V4-Flash top-k layer
    MoE(..., hash_vocab_size=129280)                         # V4-Flash hash layer (first 3)
    MoE(7168, 2048, 256, 1, 8, scoring_func="sigmoid", n_group=8, topk_group=4,
        routed_scaling_factor=2.5)                           # V3.2

From a parsed config: `MoE.from_config(model_args, layer_index)`.

Quantized experts: `set_expert_weights(gate_up, down, gate_up_scale, down_scale)` swaps in FP8 /
FP4 / int8 tensors (the checkpoint loader fills the same `*_scale` slots); `grouped_matmul` runs
them through the quant contracts. Expert parallelism: pass `ep_group` (a torch.distributed
group); the layer then holds only its `E / world` experts and exchanges tokens per forward
(`model.expert_parallel.AllToAll`, the exchange step of `ops.moe_forward`).
"""

from __future__ import annotations

import torch
from torch import nn

from v4hal import ops
from v4hal.model.collectives import SOLO, Collectives
from v4hal.model.expert_parallel import AllToAll, LocalExperts, expert_range
from v4hal.model.layers import Linear
from v4hal.model.parallel import Layout, Parallel
from v4hal.ops.moe import SCORING_FUNCS, ExpertWeights, SharedExpertWeights


class Router(nn.Module):
    def __init__(self, hidden_size: int, n_experts: int, topk: int, hash_vocab_size: int | None,
                 correction_bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size, dtype=dtype, device=device), requires_grad=False)
        if hash_vocab_size is not None:
            self.register_buffer("tid2eid", torch.zeros(hash_vocab_size, topk, dtype=torch.long, device=device))
        elif correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32, device=device))


class Experts(nn.Module):
    """Stacked routed experts; the `*_scale` slots stay None for float weights; `act_scale_fmt`
    as `model.layers.Linear`'s."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden_size, dtype=dtype, device=device),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate, dtype=dtype, device=device),
                                      requires_grad=False)
        self.register_buffer("gate_up_proj_scale", None)
        self.register_buffer("down_proj_scale", None)
        self.act_scale_fmt = "fp32"

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.gate_up_proj, self.down_proj, self.gate_up_proj_scale, self.down_proj_scale,
                             self.act_scale_fmt)


def set_act_scale_fmt(module: nn.Module, fmt: str) -> None:
    """Every FP8 product under `module` (`Linear` layers, stacked `Experts`) scales its
    activations in `fmt` ("fp32" or "ue8m0", `ModelArgs.act_scale_fmt`)."""
    for m in module.modules():
        if isinstance(m, (Linear, Experts)):
            m.act_scale_fmt = fmt


class MLP(nn.Module):
    """SwiGLU MLP under transformers' names (`gate_proj`, `up_proj`, `down_proj`, any
    `ops.linear` format): the shared experts of a MoE layer, and V3's dense layers."""

    def __init__(self, hidden_size: int, intermediate_size: int, swiglu_limit: float | None = None,
                 dtype: torch.dtype = torch.bfloat16, device=None, reduce: Collectives = SOLO):
        """intermediate_size: the columns held here (a tensor-parallel rank's share, the partial
        output summed over `reduce`)."""
        super().__init__()
        self.swiglu_limit = swiglu_limit
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size, reduce=reduce)
        self.to(dtype=dtype, device=device)

    def weights(self) -> SharedExpertWeights:
        return SharedExpertWeights(self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                                   self.gate_proj.weight_scale_inv, self.up_proj.weight_scale_inv,
                                   self.down_proj.weight_scale_inv, self.gate_proj.act_scale_fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return self.down_proj(ops.swiglu(gate_up, self.swiglu_limit))


class MoE(nn.Module):
    """One MoE layer. Arguments are the config's numbers:

    hidden_size, moe_intermediate_size (expert width I), n_routed_experts (E), n_shared_experts
    (their width is n_shared * I; 0 for none), num_experts_per_tok (top-k), scoring_func
    ("softmax" | "sigmoid" | "sqrtsoftplus"), n_group / topk_group (group-limited routing, 1 = off),
    routed_scaling_factor, norm_topk_prob (renormalize the top-k weights; V4 always does),
    swiglu_limit (V4's clamp, None = off; applies to shared experts too, as in V4), hash_vocab_size
    (set on V4 hash layers: routes by `gate.tid2eid[input_ids]`), correction_bias (the noaux_tc
    `e_score_correction_bias`, on by default for top-k layers), dtype / device of the float
    weights, ep_group (torch.distributed group for expert parallelism over processes that each
    route their own tokens, None = all experts here), parallel (a `model.parallel.Parallel`: the
    layout of a tensor + expert parallel model, instead of ep_group).
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int, n_shared_experts: int,
                 num_experts_per_tok: int, scoring_func: str = "sqrtsoftplus", n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True, swiglu_limit: float | None = None,
                 hash_vocab_size: int | None = None, correction_bias: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device=None, ep_group=None, parallel: Parallel | None = None):
        super().__init__()
        if scoring_func not in SCORING_FUNCS:
            raise ValueError(f"MoE: scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
        self.n_routed_experts, self.topk = n_routed_experts, num_experts_per_tok
        self.scoring_func, self.n_group, self.topk_group = scoring_func, n_group, topk_group
        self.routed_scaling_factor, self.norm_topk_prob = float(routed_scaling_factor), bool(norm_topk_prob)
        self.swiglu_limit = None if swiglu_limit is None else float(swiglu_limit)
        self.is_hash = hash_vocab_size is not None
        if parallel is None:
            world = 1 if ep_group is None else torch.distributed.get_world_size(ep_group)
            parallel = (Parallel(Layout(ep=world, dp=world), ep_group=ep_group, ep_rank=torch.distributed.get_rank(ep_group))
                        if world > 1 else Parallel(Layout()))
        # The routed experts' partial sums (width split or local experts) and the shared experts'
        # (column then row parallel) are completed by one all-reduce over `tp`.
        self.tp, ep, self.ep_group = parallel.tp, parallel.layout.ep, parallel.ep_group
        # How routed rows reach the experts (`ops.moe_forward`'s exchange step): None = all here.
        self.exchange = {"all_to_all": lambda: AllToAll(parallel.ep_group),
                         "local": lambda: LocalExperts(ep, parallel.ep_rank)}.get(parallel.experts, lambda: None)()
        start, end = expert_range(n_routed_experts, ep, parallel.ep_rank)
        width = moe_intermediate_size // (self.tp.size if parallel.experts == "width" else 1)
        self.gate = Router(hidden_size, n_routed_experts, num_experts_per_tok, hash_vocab_size, correction_bias, dtype, device)
        self.experts = Experts(end - start, hidden_size, width, dtype, device)
        self.shared_experts = (MLP(hidden_size, moe_intermediate_size * n_shared_experts // self.tp.size,
                                   self.swiglu_limit, dtype, device) if n_shared_experts else None)

    @classmethod
    def from_config(cls, args, layer: int, dtype: torch.dtype | None = None, device=None, ep_group=None,
                    parallel: Parallel | None = None) -> "MoE":
        """Layer `layer` of a `model.config.ModelArgs` (the model builds its MoE layers here): V4
        layers always renormalize and clamp with swiglu_limit, its `hash_moe` layers route by
        `tid2eid`; V3 / V3.2 follow `norm_topk_prob`; every top-k layer has the correction bias, as
        in transformers (zero unless the checkpoint sets it); FP8 experts scale activations as `args.act_scale_fmt` says.
        dtype: of the float weights, `args.torch_dtype` when None."""
        v4 = args.is_v4
        is_hash = v4 and args.mlp_layer_types[layer] == "hash_moe"
        moe = cls(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts, args.n_shared_experts,
                  args.num_experts_per_tok, scoring_func=args.scoring_func, n_group=args.n_group,
                  topk_group=args.topk_group, routed_scaling_factor=args.routed_scaling_factor,
                  norm_topk_prob=v4 or args.norm_topk_prob, swiglu_limit=args.swiglu_limit if v4 else None,
                  hash_vocab_size=args.vocab_size if is_hash else None,
                  dtype=dtype or getattr(torch, args.torch_dtype), device=device, ep_group=ep_group,
                  parallel=parallel)
        set_act_scale_fmt(moe, args.act_scale_fmt)
        return moe

    def set_expert_weights(self, gate_up: torch.Tensor, down: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
                           down_scale: torch.Tensor | None = None) -> None:
        """Adopt stacked expert weights in any grouped_matmul format (quantized ones stay so)."""
        self.experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        self.experts.down_proj = nn.Parameter(down, requires_grad=False)
        self.experts.gate_up_proj_scale = gate_up_scale
        self.experts.down_proj_scale = down_scale

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_hash and input_ids is None:
            raise ValueError("MoE: this is a hash-routed layer; forward needs the input_ids")
        kw = dict(scoring=self.scoring_func, bias=getattr(self.gate, "e_score_correction_bias", None),
                  n_group=self.n_group, topk_group=self.topk_group, renormalize=self.norm_topk_prob,
                  routed_scaling_factor=self.routed_scaling_factor,
                  input_ids=input_ids if self.is_hash else None,
                  tid2eid=self.gate.tid2eid if self.is_hash else None, swiglu_limit=self.swiglu_limit,
                  shared=None if self.shared_experts is None else self.shared_experts.weights())
        out = ops.moe_forward(hidden, self.gate.weight, self.experts.weights(), self.topk, exchange=self.exchange, **kw)
        return self.tp.all_reduce(out)

    def extra_repr(self) -> str:
        return (f"experts={self.n_routed_experts}, topk={self.topk}, scoring={self.scoring_func}, "
                f"groups={self.n_group}/{self.topk_group}, hash={self.is_hash}, "
                f"format={ops.expert_format(self.experts.gate_up_proj)}")
