"""Run under a launcher (torchrun / deepspeed) or alone: one forward/backward of a fixed global
batch through the DeepSpeed engine; rank 0 writes the loss and full gradients (experts gathered)
to OUT. Used by tests/test_deepspeed.py to compare ep_size=2 on 2 processes with 1 process."""

import sys

import torch


def run(out: str, ep: int, routing: str, zero: int) -> None:
    from ecdit_cli.config import resolve_config
    from ecdit_cli.data.scenes import vocabulary
    from ecdit_cli.model.rectified_flow import interpolate
    from ecdit_cli.model.t2i import TextToImage
    from ecdit_cli.train.engine import build_engine, setup_distributed
    from ecdit_cli.train.weights import gather_experts

    # ROUTING@batch: batch-level routing groups. They are the local micro-batch of each process,
    # so one process reproduces two by routing the two halves of the batch as separate groups.
    routing, _, group = routing.partition("@")
    cfg = resolve_config(preset="debug", overrides=[f"moe.routing={routing}", f"moe.ep_size={ep}",
                                                    f"moe.routing_group={group or 'image'}",
                                                    "train.batch_size=4", f"train.zero_stage={zero}",
                                                    "train.grad_clip=0"])
    dist = setup_distributed(cfg)
    torch.manual_seed(cfg.train.seed)
    model = TextToImage(cfg, vocabulary(), ep_rank=dist.rank % ep)
    # Leave the identity init (adaLN-Zero gates, zero output layers) and sharpen the routers, so
    # that the routing decisions reach the loss and gradients: at init the MoE output is gated off.
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name or "cross_attn.proj" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif name.endswith("gate.wg.weight"):
                p.mul_(25.0)
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
    # ep_equivalence.py OUT_PREFIX EP ROUTING[,ROUTING...] [ZERO]: writes OUT_PREFIX-ROUTING.pt
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    for routing in args[2].split(","):
        run(f"{args[0]}-{routing}.pt", int(args[1]), routing, int(args[3]) if len(args) > 3 else 0)
