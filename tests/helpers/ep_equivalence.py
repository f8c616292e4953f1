"""Run under a launcher (torchrun / deepspeed) or alone: one forward/backward of a fixed global
batch through the DeepSpeed engine; rank 0 writes the loss and full gradients (experts gathered)
to OUT. Used by tests/test_deepspeed.py to compare ep_size=2 on 2 processes with 1 process."""

import sys
import zlib

import torch

# Routing variants by name: (routing, extra overrides). A plain routing name is itself.
VARIANTS = {
    "ec_shared": ("expert_choice", ["moe.shared_experts=1", "moe.shared_expert_width_mult=0.5",
                                    "moe.capacity_factor=1.5"]),
    "ec_fine": ("expert_choice", ["moe.num_experts=16", "moe.expert_width_mult=0.5", "moe.capacity_factor=4"]),
    "ec_decoupled": ("expert_choice", ["moe.router_input=decoupled", "moe.renormalize_gates=true",
                                       "moe.route_scale=2.5"]),
    "ec_schedule": ("expert_choice", ["model.depth=4", "moe.capacity_schedule=[4,1]"]),
    "ec_balanced": ("expert_choice", ["moe.routing_debug=balanced"]),
    "tc_random": ("token_choice", ["moe.routing_debug=random", "moe.shared_experts=1"]),
    # Race with the variants it supports: shared expert, decoupled router, scaled gates, a schedule.
    "race_mix": ("race", ["model.depth=4", "moe.capacity_schedule=[3,1.5]", "moe.shared_experts=1",
                          "moe.shared_expert_width_mult=0.5", "moe.router_input=decoupled", "moe.route_scale=2"]),
}


def perturb(model, ep: int, ep_rank: int, scale: float = 0.05, router_gain: float = 25.0) -> None:
    """Move every parameter off its initialisation by noise that depends on its name only (an expert
    tensor: on its global expert ids), so 1 and 2 processes hold the same model, then sharpen the
    routers. At adaLN-Zero's initialisation every block is the identity and only the final layer
    would get gradients; with near-uniform routers the routing decisions would hardly reach them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if getattr(p, "allreduce", True) is False:  # expert weights: (local experts, ...)
                El = p.shape[0]
                p.add_(torch.randn((El * ep, *p.shape[1:]), generator=g)[ep_rank * El:(ep_rank + 1) * El] * scale)
            else:
                p.add_(torch.randn(p.shape, generator=g) * scale)
            if name.endswith("gate.wg.weight"):
                p.mul_(router_gain)


def run(out: str, ep: int, name: str, zero: int) -> None:
    from ecdit_cli.config import resolve_config
    from ecdit_cli.data.scenes import vocabulary
    from ecdit_cli.model.rectified_flow import interpolate
    from ecdit_cli.model.t2i import TextToImage
    from ecdit_cli.train.engine import build_engine, setup_distributed
    from ecdit_cli.train.weights import gather_experts

    # NAME@batch: batch-level routing groups. They are the local micro-batch of each process,
    # so one process reproduces two by routing the two halves of the batch as separate groups.
    base, _, group = name.partition("@")
    routing, extra = VARIANTS.get(base, (base, []))
    cfg = resolve_config(preset="debug", overrides=[f"moe.routing={routing}", f"moe.ep_size={ep}",
                                                    f"moe.routing_group={group or 'image'}",
                                                    "train.batch_size=4", f"train.zero_stage={zero}",
                                                    "train.grad_clip=0", *extra])
    dist = setup_distributed(cfg)
    torch.manual_seed(cfg.train.seed)
    model = TextToImage(cfg, vocabulary(), ep_rank=dist.rank % ep)
    perturb(model, ep, dist.rank % ep)
    engine = build_engine(cfg, model, "fp32", dist.world_size)
    g = torch.Generator().manual_seed(123)
    x0 = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.rand(4, generator=g)
    captions = ["a red circle", "two squares", "a blue square left of a green triangle", "a white circle"]
    text, mask = model.tokenize(captions)
    per = 4 // dist.world_size
    sl = slice(dist.rank * per, (dist.rank + 1) * per)
    x_t, v = interpolate(x0[sl], noise[sl], t[sl])
    if group == "batch" and dist.world_size == 1:
        halves = [engine(x_t[h], t[sl][h], text[sl][h], mask[sl][h]) for h in (slice(0, 2), slice(2, 4))]
        velocity, routings = torch.cat([o.velocity for o in halves]), [o.routing for o in halves]
    else:
        out_ = engine(x_t, t[sl], text[sl], mask[sl])
        velocity, routings = out_.velocity, [out_.routing]
    loss = (velocity - v).square().mean()
    # Each process weights the mean auxiliary loss of its own micro-batch; the halves do the same.
    aux = [torch.stack([r.aux_loss for r in rs]).mean() for rs in routings if rs[0].aux_loss is not None]
    if aux:
        loss = loss + 0.01 * torch.stack(aux).mean()
    engine.backward(loss)
    losses = [torch.zeros(1) for _ in range(dist.world_size)]
    torch.distributed.all_gather(losses, loss.detach().reshape(1))
    grads = {}
    for name, p in engine.module.named_parameters():
        gr = p.grad if p.grad is not None else torch.zeros_like(p)
        grads[name] = gather_experts(gr.detach().clone(), ep) if getattr(p, "allreduce", True) is False else gr.detach().clone()
    if dist.rank == 0:
        torch.save({"loss": float(torch.cat(losses).mean()), "grads": grads}, out)


if __name__ == "__main__":
    # ep_equivalence.py OUT_PREFIX EP NAME[,NAME...] [ZERO]: writes OUT_PREFIX-NAME.pt (a routing or a VARIANTS
    # name, optionally with @batch)
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    for routing in args[2].split(","):
        run(f"{args[0]}-{routing}.pt", int(args[1]), routing, int(args[3]) if len(args) > 3 else 0)
