"""A synthetic study directory for the collect / fit / plot / report tests.

`make_study(root)` writes what `ecdit sweep` + `ecdit train` would leave behind: manifest.csv
and runs/<run_id>/{config.yaml, metrics.jsonl, summary.json, eval.json}. Final validation
losses follow a known saturating power law in activated parameters, L = E + A N^-alpha, per
routing, so fits can be checked against the truth. On top of the done runs the default study
has one running run (its metrics end in a truncated line), one failed run and one pending run.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ecdit_cli.config import ModelConfig, MoEConfig, RunConfig, TrainConfig

# (hidden_size, depth) per size name, smallest first.
SIZES: dict[str, tuple[int, int]] = {
    "S": (64, 4),
    "M": (96, 6),
    "L": (128, 8),
    "XL": (192, 10),
    "XXL": (256, 12),
}
ROUTINGS = ("dense", "token_choice", "expert_choice")
ABBREV = {"dense": "dense", "token_choice": "tc", "expert_choice": "ec"}
# True law of the final validation loss in activated parameters: (E, A, alpha).
TRUE_LAW: dict[str, tuple[float, float, float]] = {
    "dense": (0.25, 8.0, 0.30),
    "token_choice": (0.25, 8.5, 0.31),
    "expert_choice": (0.25, 9.5, 0.33),
}
NUM_EXPERTS = 8
STEPS = 200
BATCH = 32
TOKENS = 64  # tokens per image (32x32 pixels, patch 4)
LOG_EVERY = 10
VAL_EVERY = 50
VAL_T = [(i + 0.5) / 8 for i in range(8)]
EVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MANIFEST_COLUMNS = [
    "run_id", "size", "routing", "num_experts", "capacity_factor", "top_k", "steps", "lr", "seed",
    "params_total", "params_active", "flops_per_image", "train_flops",
]  # fmt: skip


@dataclass
class StudyFixture:
    root: Path
    run_ids: dict[tuple[str, str], str] = field(default_factory=dict)  # (size, routing) -> run_id
    done: list[str] = field(default_factory=list)
    running: str | None = None
    failed: str | None = None
    pending: str | None = None
    truncated: str | None = None


def run_id(size: str, routing: str) -> str:
    return f"{size}-{ABBREV[routing]}" + (f"-e{NUM_EXPERTS}" if routing != "dense" else "") + "-s0"


def param_counts(size: str, routing: str) -> tuple[int, int]:
    """(total, activated) parameters: 12 d^2 per block, MoE in every other block."""
    hidden, depth = SIZES[size]
    ffn = 8 * hidden * hidden
    dense = depth * 12 * hidden * hidden + 40_000  # + embedders and the text encoder
    if routing == "dense":
        return dense, dense
    moe_layers = depth // 2
    # Each MoE layer holds E experts; with f = 2 (or top-2) a token costs one extra FFN on average.
    return dense + moe_layers * (NUM_EXPERTS - 1) * ffn, dense + moe_layers * ffn


def final_loss(size: str, routing: str) -> float:
    e, a, alpha = TRUE_LAW[routing]
    return e + a * param_counts(size, routing)[1] ** -alpha


def _config(size: str, routing: str) -> RunConfig:
    hidden, depth = SIZES[size]
    return RunConfig(
        name=run_id(size, routing),
        preset=size,
        model=ModelConfig(hidden_size=hidden, depth=depth, num_heads=hidden // 32, num_kv_heads=1),
        moe=MoEConfig(routing=routing, num_experts=NUM_EXPERTS),
        train=TrainConfig(steps=STEPS, batch_size=BATCH, log_every=LOG_EVERY, val_every=VAL_EVERY),
    )


def _val_at(final: float, step: int) -> float:
    # Decays as step^-0.6 towards the final value reached at STEPS.
    return final + 0.3 * ((step / STEPS) ** -0.6 - 1.0)


def _t_profile(loss: float) -> list[float]:
    # Velocity MSE is larger near the data end (small t); mean over t equals `loss`.
    w = np.array([1.6 - 1.2 * t for t in VAL_T])
    return list(loss * w / w.mean())


def _records(size: str, routing: str, last_step: int, rng: np.random.Generator, noise: float) -> list[dict]:
    total, active = param_counts(size, routing)
    fpi = 2 * active * TOKENS
    final = final_loss(size, routing) * (1.0 + noise)
    out = []
    for step in range(LOG_EVERY, last_step + 1, LOG_EVERY):
        images = step * BATCH
        frac = step / STEPS
        train = _val_at(final, step) + 0.01 + rng.normal(0, 0.004)
        rec = {
            "kind": "train", "step": step, "images_seen": images, "flops": 3 * fpi * images,
            "train_loss": train, "loss": train, "aux_loss": 0.0, "z_loss": 0.0,
            "lr": 1e-3 * min(1.0, step / 50), "grad_norm": 1.0 / math.sqrt(step),
            "images_per_s": 900.0 * 64 / SIZES[size][0], "wall_time_s": step * 0.05,
        }  # fmt: skip
        big = SIZES[size][0] / 64  # larger models route more unevenly
        if routing == "expert_choice":
            rec.update(
                ec_experts_per_token_mean=2.0,
                ec_experts_per_token_std=0.3 + 0.2 * big * frac,
                ec_experts_per_token_max=4.0 + 1.0 * big * frac,
                ec_unrouted_frac=0.04 + 0.02 * big * frac,
            )
        elif routing == "token_choice":
            rec.update(
                tc_dropped_frac=0.08 * (1 - frac) + 0.01 * big, tc_load_imbalance=1.8 - 0.5 * frac + 0.1 * big
            )
            rec["aux_loss"] = 1.0 + 0.1 * (1 - frac)
            rec["loss"] = train + 0.01 * rec["aux_loss"]
        out.append(rec)
        if step % VAL_EVERY == 0:
            val = _val_at(final, step)
            vrec = {
                "kind": "val",
                "step": step,
                "images_seen": images,
                "flops": 3 * fpi * images,
                "val_loss": val,
            }
            vrec.update({f"val_loss_t{i}": v for i, v in enumerate(_t_profile(val))})
            vrec["val_t"] = VAL_T
            out.append(vrec)
            # train.eval_every records: GenEval of the in-training subset, rising as the loss falls.
            g = float(np.clip(0.9 - 1.5 * val, 0, 1))
            out.append({"kind": "eval", "step": step, "images_seen": images, "flops": 3 * fpi * images,
                        "geneval_overall": g, **{f"geneval_{t}": g for t in EVAL_TASKS},
                        "eval_images": 48, "eval_seconds": 1.0})
    return out


def _write_run(root: Path, size: str, routing: str, status: str, rng: np.random.Generator) -> str:
    rid = run_id(size, routing)
    d = root / "runs" / rid
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(_config(size, routing).to_yaml())
    if status == "pending":
        return rid
    last = {"done": STEPS, "running": 100, "failed": 120}[status]
    recs = _records(size, routing, last, rng, noise=rng.normal(0, 0.003))
    lines = [json.dumps(r) for r in recs]
    if status == "running":
        lines.append(
            json.dumps(_records(size, routing, last + LOG_EVERY, rng, 0.0)[-1])[:37]
        )  # cut mid-write
    (d / "metrics.jsonl").write_text("\n".join(lines) + ("\n" if status != "running" else ""))
    total, active = param_counts(size, routing)
    last_train = [r for r in recs if r["kind"] == "train"][-1]
    last_val = [r for r in recs if r["kind"] == "val"][-1]
    summary = {
        "status": status, "run_id": rid, "step": last, "steps": STEPS, "images_seen": last * BATCH,
        "final_train_loss": last_train["train_loss"], "final_val_loss": last_val["val_loss"],
        "final_val_loss_t": [last_val[f"val_loss_t{i}"] for i in range(len(VAL_T))], "val_t": VAL_T,
        "wall_time_s": last * 0.05, "params_total": total, "params_active": active,
        "flops_per_image": 2 * active * TOKENS, "train_flops": 3 * 2 * active * TOKENS * STEPS * BATCH,
        "error": None,
    }  # fmt: skip
    if status == "running":
        summary.update(final_train_loss=None, final_val_loss=None, final_val_loss_t=None)
    if status == "failed":
        summary["error"] = "non-finite loss at step 121 (train.max_bad_steps=0)"
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    if status == "done":
        # Scores rise with size and are best for expert choice.
        base = 0.9 - 1.5 * summary["final_val_loss"]
        tasks = {
            t: float(np.clip(base + 0.05 * (3 - i) + rng.normal(0, 0.01), 0, 1))
            for i, t in enumerate(EVAL_TASKS)
        }
        ev = {
            "overall": float(np.mean(list(tasks.values()))),
            "tasks": tasks,
            "prompts_with_any_correct": min(1.0, base + 0.2),
            "settings": {"num_steps": 50, "cfg_scale": 4.0, "images_per_prompt": 4},
        }
        (d / "eval.json").write_text(json.dumps(ev, indent=2))
    return rid


def make_study(
    root: str | Path,
    sizes: tuple[str, ...] = ("S", "M", "L", "XL"),
    routings: tuple[str, ...] = ROUTINGS,
    extras: bool = True,
    seed: int = 0,
) -> StudyFixture:
    """Write a study at `root`. With `extras`, the largest size's token-choice run failed, its
    expert-choice run is still running (truncated last metrics line) and a dense XXL run is pending."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fx = StudyFixture(root=root)
    points: list[tuple[str, str, str]] = []
    for size in sizes:
        for routing in routings:
            status = "done"
            if extras and size == sizes[-1] and routing == "token_choice":
                status = "failed"
            elif extras and size == sizes[-1] and routing == "expert_choice":
                status = "running"
            points.append((size, routing, status))
    if extras:
        points.append(("XXL", "dense", "pending"))
    rows = []
    for size, routing, status in points:
        rid = _write_run(root, size, routing, status, rng)
        fx.run_ids[(size, routing)] = rid
        if status == "done":
            fx.done.append(rid)
        elif status == "running":
            fx.running = fx.truncated = rid
        elif status == "failed":
            fx.failed = rid
        else:
            fx.pending = rid
        total, active = param_counts(size, routing)
        moe = routing != "dense"
        rows.append({
            "run_id": rid, "size": size, "routing": routing,
            "num_experts": NUM_EXPERTS if moe else "", "capacity_factor": 2.0 if moe else "",
            "top_k": 2 if routing == "token_choice" else "", "steps": STEPS, "lr": 1e-3, "seed": 0,
            "params_total": total, "params_active": active, "flops_per_image": 2 * active * TOKENS,
            "train_flops": 3 * 2 * active * TOKENS * STEPS * BATCH,
        })  # fmt: skip
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (root / "study.yaml").write_text("name: fixture\n")
    return fx
