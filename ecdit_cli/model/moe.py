"""FFN layers: the dense GeLU FFN and the MoE FFN built on DeepSpeed's MoE layer.

`MoEFeedForward` *is a* `deepspeed.moe.layer.MoE`, so `deepspeed.initialize` finds it, creates
its expert-parallel process groups and puts its expert parameters into MoE optimizer groups
(ZeRO-1/2). Inside it, DeepSpeed's `MOELayer` holds our `Router` as its gate (the 0.19.4+
sparse-route contract, see docs/deepspeed.md) and our `GroupedExperts` (stacked expert weights run by
batched matmuls) as its experts. With `ep_size == 1` the layer skips MOELayer and runs the same
parameters through a local path (`dispatch_combine`: a gather, batched matmuls, and a segment
sum that is one CSR sparse matmul on the CPU and `index_add_` elsewhere); tests prove both
paths give the same outputs and gradients.

Routing variants (README "Routing variants") live here too: a shared FFN that every token
passes through beside the routed experts (an ordinary data-parallel module, outside DeepSpeed's
MOELayer, so expert parallelism is untouched), a router that reads its own input (Nucleus-Image's
decoupled [LayerNorm(x), timestep embedding]) instead of the FFN input, gate scaling, and the
debug routers; each is off by default and then leaves the layer bit for bit as it was.

Shape legend: B images, T tokens per image, S = B*T tokens, D width, R router input width,
F expert hidden width, E experts (El local ones), C slots per expert, K routes per token.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ecdit_cli import deepspeed_compat, devices
from ecdit_cli.model.routing import (
    RoutingResult,
    debug_routing,
    expert_choice,
    pad_capacity,
    race,
    scale_gates,
    slots_to_routes,
    token_choice,
)
from ecdit_cli.seeding import hash_seed

DeepSpeedMoE, MOELayer = deepspeed_compat.moe_classes()


class FeedForward(nn.Module):
    """The dense FFN: Linear(D, F) -> GeLU(tanh) -> Linear(F, D), as DiT's Mlp."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class GroupedExperts(nn.Module):
    """El experts of the dense FFN's shape, stacked as (El, D, F) / (El, F, D) weights.

    Called by MOELayer with its dispatch buffer (ep, El, C, D) and by the local fast path with
    (El, C, D). Parameters carry DeepSpeed's expert markers (`allreduce=False`, `group_name`)
    so the engine reduces them over the expert-data-parallel group only.
    """

    def __init__(self, num_local_experts: int, hidden_size: int, mlp_hidden: int, group_name: str,
                 expert_offset: int = 0) -> None:
        super().__init__()
        El, D, Fh = num_local_experts, hidden_size, mlp_hidden
        self.expert_offset = expert_offset  # global id of local expert 0 (ep_rank * El)
        self.w1 = nn.Parameter(torch.empty(El, D, Fh))
        self.b1 = nn.Parameter(torch.zeros(El, Fh))
        self.w2 = nn.Parameter(torch.empty(El, Fh, D))
        self.b2 = nn.Parameter(torch.zeros(El, D))
        for p in self.parameters():
            p.allreduce = False
            p.group_name = group_name
        # One draw from the global RNG whatever El is, so that models with different ep_size
        # consume the global RNG identically (DiT.initialize_weights re-seeds experts anyway).
        self.reset_parameters(seed=int(torch.randint(0, 2**62, ())))
        # DeepSpeed checkpoints experts one file per expert and finds them by the key pattern
        # '...deepspeed_moe.experts.deepspeed_experts.<local id>.<name>' of its own Experts
        # container: expose the stacked weights under that layout, and stack them back on load.
        self.register_state_dict_post_hook(_split_experts_state)
        self.register_load_state_dict_pre_hook(_stack_experts_state)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Xavier-uniform per expert (as nn.Linear gets in DiT), zero biases.

        With `seed`, expert e is drawn from its own generator seeded by (seed, global id), so
        the weights of global expert e are the same whatever the expert-parallel layout.
        """
        for i in range(self.w1.shape[0]):
            gen = None
            if seed is not None:
                gen = torch.Generator().manual_seed(hash_seed(seed, self.expert_offset + i))
            for w in (self.w1, self.w2):
                bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
                w[i].copy_(torch.rand(w.shape[1:], generator=gen) * (2 * bound) - bound)
        self.b1.zero_()
        self.b2.zero_()

    def ffn(self, x_ECD: Tensor) -> Tensor:
        h_ECF = torch.baddbmm(self.b1.unsqueeze(1), x_ECD, self.w1)
        h_ECF = F.gelu(h_ECF, approximate="tanh")
        return torch.baddbmm(self.b2.unsqueeze(1), h_ECF, self.w2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            return self.ffn(x)
        # MOELayer's buffer after the all-to-all: (ep, El, C, D) -> one batch per local expert.
        ep, El, C, D = x.shape
        y = self.ffn(x.transpose(0, 1).reshape(El, ep * C, D))
        return y.reshape(El, ep, C, D).transpose(0, 1)


_EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


def _split_experts_state(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name in _EXPERT_PARAMS:
        stacked = state_dict.pop(prefix + name)
        for i in range(stacked.shape[0]):
            state_dict[f"{prefix}deepspeed_experts.{i}.{name}"] = stacked[i]


def _stack_experts_state(module: GroupedExperts, state_dict: dict, prefix: str, *args) -> None:
    for name in _EXPERT_PARAMS:
        keys = [f"{prefix}deepspeed_experts.{i}.{name}" for i in range(getattr(module, name).shape[0])]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


class Router(nn.Module):
    """Linear router (no bias) + EC, TC or race routing; also DeepSpeed's gate for MOELayer.

    As a gate it follows the 0.19.4+ contract: `forward(x_SD, used_token, sparse_routes,
    use_tutel)` returns (l_aux, capacity, E, indices[K,S], locations[K,S], gates[K,S],
    exp_counts). The full `RoutingResult` of the last call is kept in `self.last` for the MoE
    layer to return to the model (stats and unweighted auxiliary losses).

    `input_size` is the width R of what the router reads: the FFN input (R = D) by default, or
    a separate router input (decoupled: R = 2D) that the MoE layer hands over in `pending_input`
    before DeepSpeed's MOELayer calls the gate with the FFN input alone (its contract has no
    slot for a second input, and `used_token` means something else).
    """

    def __init__(self, hidden_size: int, num_experts: int, routing: str, capacity_factor: float,
                 top_k: int, group_size: int, normalize_top_k: bool, force_balanced: bool = False,
                 routing_group: str = "image", tokens_per_image: int = 0, race_momentum: float = 0.99,
                 race_inference: str = "threshold", race_expert_cap: float = 0.0, *,
                 input_size: int | None = None, route_scale: float = 1.0, renormalize_gates: bool = False,
                 routing_debug: str = "none", debug_seed: int = 0) -> None:
        super().__init__()
        self.wg = nn.Linear(input_size or hidden_size, num_experts, bias=False)
        self.routing = routing
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.top_k = top_k
        self.group_size = group_size  # tokens per routing group (one image unless pooled)
        self.normalize_top_k = normalize_top_k
        self.force_balanced = force_balanced
        self.route_scale = route_scale
        self.renormalize_gates = renormalize_gates
        self.routing_debug = routing_debug
        self.debug_seed = debug_seed  # fixes `random` debug tables (per layer, from the run's seed)
        self.ep_group = None
        self.last: RoutingResult | None = None
        self.pending_input: Tensor | None = None  # (S, R) router input for the next gate call
        self._init_race(routing_group, tokens_per_image, race_momentum, race_inference, race_expert_cap)

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def logits(self, x_SD: Tensor) -> Tensor:
        # Router math in fp32 whatever the activation dtype (docs/paper.md: softmax in fp32).
        logits_SE = F.linear(x_SD.float(), self.wg.weight.float())
        if self.force_balanced:
            # Throughput-only debug switch: random logits spread tokens evenly (no learning signal).
            logits_SE = torch.rand_like(logits_SE).detach()
        return logits_SE

    def route(self, x_SR: Tensor) -> RoutingResult:
        """Route the S rows of `x_SR`, the router's input (the FFN input unless decoupled).

        Debug tables first (they ignore the router's choice), then the routing itself, then gate
        scaling, which acts on whichever slot table came out (race's included)."""
        logits_SE = self.logits(x_SR)
        if self.routing_debug != "none":
            # The config refuses debug tables with race; batch groups shrink to one image in eval.
            r = debug_routing(logits_SE, self.routing_debug, self.routing, self.call_group_size(),
                              self.capacity_factor, self.top_k, self.normalize_top_k, self.debug_seed)
        elif self.routing == "race":
            r = self._route_race(logits_SE)
        elif self.routing == "expert_choice":
            r = expert_choice(logits_SE, self.call_group_size(), self.capacity_factor)
        else:
            r = token_choice(logits_SE, self.group_size, self.capacity_factor, self.top_k, self.normalize_top_k)
        return scale_gates(r, self.renormalize_gates, self.route_scale)

    def forward(self, x_SD: Tensor, used_token: Tensor | None = None, sparse_routes: bool = True,
                use_tutel: bool = False):
        if not sparse_routes or used_token is not None or use_tutel:
            raise RuntimeError("ecdit's router supports only DeepSpeed's sparse-route gate contract (>= 0.19.4)")
        x_SR, self.pending_input = self.pending_input, None
        if self.wg.in_features != x_SD.shape[1] and x_SR is None:
            raise RuntimeError("this router reads a separate input: call its MoE layer with router_input")
        if x_SR is not None and x_SR.shape[0] != x_SD.shape[0]:
            raise RuntimeError(f"router input has {x_SR.shape[0]} rows for {x_SD.shape[0]} tokens")
        r = self.route(x_SD if x_SR is None else x_SR)
        if self.routing == "race":
            r = pad_capacity(r, _max_over_group(r.capacity, self.ep_group))
        self.last = r
        indices_KS, locations_KS, gates_KS = slots_to_routes(r)
        l_aux = r.aux_loss if r.aux_loss is not None else x_SD.new_zeros((), dtype=torch.float32)
        return l_aux, r.capacity, self.num_experts, indices_KS, locations_KS, gates_KS, r.tokens_per_expert_E


    # ------------------------------------------------------------------------------------------
    # Batch-level groups and race routing (Race-DiT, arXiv 2503.16057; DiffMoE).

    def _init_race(self, routing_group: str, tokens_per_image: int, momentum: float, inference: str,
                   expert_cap: float) -> None:
        self.routing_group = routing_group  # "batch": group_size is 0 (the whole local micro-batch)
        self.tokens_per_image = tokens_per_image
        self.race_expert_cap = expert_cap
        self.race_momentum = momentum
        self.race_inference = inference
        if self.routing == "race":
            # The learned inference threshold: an EMA of the k-th largest score, updated by every
            # training forward; -1 = not learned yet (scores are probabilities, never negative).
            # A persistent buffer, so DeepSpeed checkpoints and final/model.pt carry it.
            self.register_buffer("race_threshold", torch.full((), -1.0))

    def call_group_size(self) -> int:
        """Tokens per routing group of this call. Batch-level groups exist in training only: in
        eval mode every image is its own group, so a sample never depends on its batch neighbours."""
        if self.routing_group == "batch" and not self.training:
            return self.tokens_per_image
        return self.group_size

    def _route_race(self, logits_SE: Tensor) -> RoutingResult:
        learned = bool(self.race_threshold >= 0)
        if not self.training and self.race_inference == "threshold" and learned:
            # The cap (if any) applies per image here: a per-image budget keeps images independent.
            r = race(logits_SE, self.tokens_per_image, self.capacity_factor, threshold=float(self.race_threshold),
                     expert_cap=self.race_expert_cap)
        else:
            # Training, `race_inference: topk`, or a threshold never learned: the group's top-k.
            r = race(logits_SE, self.call_group_size(), self.capacity_factor, expert_cap=self.race_expert_cap)
            if self.training and r.threshold_score is not None:
                self._update_threshold(r.threshold_score)
        r.stat_values["race_threshold"] = self.race_threshold.detach().clone()  # the buffer moves on
        return r

    @torch.no_grad()
    def _update_threshold(self, kth: Tensor) -> None:
        kth = kth.detach().float().reshape(())
        # Every data-parallel rank sees other images: average their k-th scores so that all ranks
        # hold one threshold (a checkpoint stores rank 0's; a resumed rank must agree with it).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                kth = kth.clone()
                torch.distributed.all_reduce(kth)
                kth /= world
        if self.race_threshold < 0:
            self.race_threshold.copy_(kth)
        else:
            self.race_threshold.mul_(self.race_momentum).add_(kth, alpha=1.0 - self.race_momentum)

    def _apply(self, fn, recurse: bool = True):
        # Keep the threshold in fp32 through .to(bf16) / .half(): an EMA with momentum 0.99 in
        # bf16 (8 mantissa bits) would round every update away.
        thr = self._buffers.get("race_threshold")
        out = super()._apply(fn, recurse)
        if thr is not None:
            self._buffers["race_threshold"] = thr.to(self._buffers["race_threshold"].device)
        return out


def _max_over_group(value: int, group) -> int:
    """The largest `value` over the processes of `group` (itself when there is no other process)."""
    dist = torch.distributed
    if group is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


def dispatch_combine_reference(x_SD: Tensor, r: RoutingResult, experts: GroupedExperts) -> Tensor:
    """The plain local MoE path: gather each slot's token, run all experts by bmm, index_add back.

    out[s] = sum over slots (e, c) holding s of weight[e, c] * Expert_e(x[s]); a token no slot
    holds gets exactly zero. Unused slots read a zero pad row and carry weight 0. This is the
    reference the faster `dispatch_combine` is tested against (outputs and gradients).
    """
    S, D = x_SD.shape
    x_pad = torch.cat([x_SD, x_SD.new_zeros(1, D)])  # row S is the pad row
    E, C = r.token_idx_EC.shape
    flat_EC = r.token_idx_EC.reshape(-1)
    x_ECD = x_pad.index_select(0, flat_EC).view(E, C, D)
    y_ECD = experts.ffn(x_ECD)
    # Combine in fp32 (the weights are fp32 affinities), then back to the activation dtype.
    y_ECD = y_ECD.float() * r.weight_EC.unsqueeze(-1)
    out = torch.zeros(S + 1, D, dtype=y_ECD.dtype, device=x_SD.device)
    out.index_add_(0, flat_EC, y_ECD.view(E * C, D))
    return out[:S].to(x_SD.dtype)


@dataclass
class SlotPlan:
    """Index bookkeeping of one slot table, built once per layer call and shared by the dispatch
    and combine steps in both directions (J = E * C slots, U used slots).

    Dispatch (token -> slot) is a gather; its adjoint, like the combine (slot -> token), is a
    segment sum over the slots of each token. On the CPU the segment sum is one sparse CSR
    matmul (S x J matrix, row s = the slots holding token s, sorted by slot): a single pass,
    where `index_add_` runs through `scatter_add_` and costs several times more on a loaded
    machine (profiled: 2 x 117 ms of a 770 ms fwd+bwd at 2 threads). Elsewhere (CUDA)
    `index_add_` is an atomic add and stays the implementation.
    """

    num_tokens: int  # S
    token_J: Tensor  # (J,) long, token of each slot; S marks an unused slot
    gather_J: Tensor  # (J,) long, token_J clamped into [0, S): unused slots read any row (weight 0)
    unused_J: Tensor  # (J,) bool
    csr_col_U: Tensor | None = None  # (U,) used slots sorted by token (stable: expert order within a token)
    csr_crow: Tensor | None = None  # (S + 1,) row pointers into csr_col_U

    @classmethod
    def build(cls, token_idx_EC: Tensor, num_tokens: int, use_csr: bool | None = None,
              counts_S: Tensor | None = None) -> SlotPlan:
        """`counts_S`: slots per token if already known (RoutingResult.experts_per_token_S)."""
        S = num_tokens
        tok = token_idx_EC.reshape(-1)
        plan = cls(S, tok, tok.clamp(max=S - 1), tok == S)
        # CSR on the CPU only, where its host read of the slot count (crow[-1]) is free (but under
        # torch.compile a graph break: the compiled graph takes the index_add path).
        if use_csr if use_csr is not None else (devices.syncs_are_free(tok.device)
                                                and not torch.compiler.is_compiling()):
            order = torch.argsort(tok, stable=True)
            if counts_S is None:
                counts_S = torch.bincount(tok, minlength=S + 1)[:S]
            crow = torch.zeros(S + 1, dtype=torch.long, device=tok.device)
            torch.cumsum(counts_S, 0, out=crow[1:])
            plan.csr_crow = crow
            plan.csr_col_U = order[: int(crow[-1])]
        return plan


def segment_sum(src_JD: Tensor, plan: SlotPlan, weight_J: Tensor | None = None) -> Tensor:
    """out[s] = sum over the slots j of token s of weight[j] * src[j]  ->  (S, D).

    Unused slots contribute nothing (whatever their rows hold). Accumulates in src's dtype,
    except that CPU half types are summed in fp32 (the CSR kernels are fp32/fp64 only).
    """
    S, D = plan.num_tokens, src_JD.shape[1]
    if plan.csr_crow is not None:
        dtype = src_JD.dtype
        src = src_JD if dtype in (torch.float32, torch.float64) else src_JD.float()
        col = plan.csr_col_U
        values = weight_J.index_select(0, col).to(src.dtype) if weight_J is not None else \
            torch.ones(col.shape[0], dtype=src.dtype, device=src.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            mat = torch.sparse_csr_tensor(plan.csr_crow, col, values, (S, src.shape[0]), check_invariants=False)
            out = torch.sparse.mm(mat, src)
        return out if out.dtype == dtype else out.to(dtype)
    if weight_J is not None:
        src_JD = src_JD * weight_J.unsqueeze(-1).to(src_JD.dtype)
    out = torch.zeros(S + 1, D, dtype=src_JD.dtype, device=src_JD.device)
    out.index_add_(0, plan.token_J, src_JD)
    return out[:S]


class _Dispatch(torch.autograd.Function):
    """x (S, D) -> slot rows (J, D); backward: the segment sum of the slot gradients."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, plan: SlotPlan) -> Tensor:
        ctx.plan = plan
        return x_SD.index_select(0, plan.gather_J)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_JD: Tensor):
        return segment_sum(grad_JD, ctx.plan), None


class _Combine(torch.autograd.Function):
    """Slot outputs (J, D) and combine weights (J,) -> tokens (S, D), weighting fused into the sum.

    backward: grad_y[j] = w[j] * grad_out[token j] (a gather) and grad_w[j] = <grad_out[token j],
    y[j]>, exactly the gradients of the reference's multiply + index_add.
    """

    @staticmethod
    def forward(ctx, y_JD: Tensor, w_J: Tensor, plan: SlotPlan) -> Tensor:
        ctx.save_for_backward(y_JD, w_J)
        ctx.plan = plan
        return segment_sum(y_JD, plan, w_J)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_SD: Tensor):
        y_JD, w_J = ctx.saved_tensors
        plan = ctx.plan
        g_JD = grad_SD.index_select(0, plan.gather_J)  # fresh tensor: safe to scale in place
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g_JD * y_JD).sum(-1).masked_fill_(plan.unused_J, 0.0)  # faster than vecdot on CPU
        grad_y = g_JD.mul_(w_J.unsqueeze(-1)) if ctx.needs_input_grad[0] else None
        return grad_y, grad_w, None


def dispatch_combine(x_SD: Tensor, r: RoutingResult, experts: GroupedExperts, use_csr: bool | None = None) -> Tensor:
    """The local MoE path (same result as `dispatch_combine_reference`, fewer passes over memory).

    Gather each slot's token, run all experts by bmm, and sum each token's weighted slot outputs
    (fp32 combine, as the reference). Unused slots read an arbitrary token row instead of a zero
    pad row: their combine weight is 0 and they are left out of the sum, so neither outputs nor
    gradients change, and x is never copied into a padded buffer. `use_csr` picks the segment
    sum (default: CSR on the CPU, index_add_ elsewhere).
    """
    S, D = x_SD.shape
    E, C = r.token_idx_EC.shape
    plan = SlotPlan.build(r.token_idx_EC, S, use_csr, r.experts_per_token_S)
    x_ECD = _Dispatch.apply(x_SD, plan).view(E, C, D)
    y_JD = experts.ffn(x_ECD).view(E * C, D)
    out = _Combine.apply(y_JD.float(), r.weight_EC.reshape(-1), plan)
    return out.to(x_SD.dtype)


class MoEFeedForward(DeepSpeedMoE):
    """An MoE FFN block (EC or TC) that DeepSpeed's engine recognises as its MoE layer.

    We bypass `DeepSpeedMoE.__init__` (it would build a TopKGate and deep-copy one expert per
    slot) and set the attributes the engine and `set_deepspeed_parallelism` rely on
    (deepspeed >= 0.19.4, < 0.20): ep_size, expert_group_name, num_experts,
    num_local_experts, enable_expert_tensor_parallelism, use_residual, deepspeed_moe.

    `mlp_hidden` is each routed expert's hidden width; `shared_hidden` > 0 adds a shared FFN of
    that width (all shared experts as one FFN: a sum of FFNs on the same input is one FFN with
    their hidden units side by side). Its parameters are ordinary data-parallel ones: it sits
    beside `deepspeed_moe`, not inside it. `router_input_size` gives the router its own input
    (forward's `router_input`); the remaining keywords are the Router's.
    """

    def __init__(self, hidden_size: int, mlp_hidden: int, num_experts: int, routing: str,
                 capacity_factor: float, top_k: int, group_size: int, normalize_top_k: bool = True,
                 ep_size: int = 1, use_deepspeed_layer: bool = False, force_balanced: bool = False,
                 ep_rank: int = 0, routing_group: str = "image", tokens_per_image: int = 0,
                 race_momentum: float = 0.99, race_inference: str = "threshold",
                 race_expert_cap: float = 0.0, *, shared_hidden: int = 0, router_input_size: int | None = None,
                 route_scale: float = 1.0, renormalize_gates: bool = False, routing_debug: str = "none",
                 debug_seed: int = 0) -> None:
        nn.Module.__init__(self)
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = deepspeed_compat.expert_group_name(ep_size)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        gate = Router(hidden_size, num_experts, routing, capacity_factor, top_k, group_size, normalize_top_k,
                      force_balanced, routing_group, tokens_per_image or group_size, race_momentum, race_inference,
                      race_expert_cap, input_size=router_input_size, route_scale=route_scale,
                      renormalize_gates=renormalize_gates, routing_debug=routing_debug, debug_seed=debug_seed)
        experts = GroupedExperts(self.num_local_experts, hidden_size, mlp_hidden, self.expert_group_name,
                                 expert_offset=ep_rank * self.num_local_experts)
        self.deepspeed_moe = MOELayer(gate, experts, self.expert_group_name, ep_size, self.num_local_experts)
        self.use_deepspeed_layer = use_deepspeed_layer or ep_size > 1
        # Named so that no key contains "expert": DeepSpeed's checkpoint drops every key of an MoE layer
        # that does (it saves those per expert), which would lose a data-parallel shared FFN.
        self.shared = FeedForward(hidden_size, shared_hidden) if shared_hidden > 0 else None

    @property
    def router(self) -> Router:
        return self.deepspeed_moe.gate

    @property
    def experts(self) -> GroupedExperts:
        return self.deepspeed_moe.experts

    def forward(self, x_BTD: Tensor, router_input: Tensor | None = None  # type: ignore[override]
                ) -> tuple[Tensor, RoutingResult]:
        """x_BTD (B, T, D) -> (y_BTD, routing). Groups are consecutive tokens of the flattened batch.

        `router_input` (B, T, R): what the router reads instead of x (decoupled routing)."""
        B, T, D = x_BTD.shape
        x_SR = None if router_input is None else router_input.reshape(B * T, -1)
        if self.use_deepspeed_layer:
            # MOELayer flattens x to (B*T, D) in the same order, so row s of x_SR is its token s.
            self.router.pending_input = x_SR
            try:
                y = self.deepspeed_moe(x_BTD, None)
            finally:
                self.router.pending_input = None
            r = self.router.last
            self.router.last = None  # do not keep the graph alive past this step
        else:
            x_SD = x_BTD.reshape(B * T, D)
            r = self.router.route(x_SD if x_SR is None else x_SR)
            y = dispatch_combine(x_SD, r, self.experts).view(B, T, D)
        if self.shared is not None:
            y = y + self.shared(x_BTD)
        return y, r
