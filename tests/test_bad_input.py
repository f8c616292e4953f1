"""The bad-input catalogue: every entry gets exactly one clear line, exit code 2, no traceback,
and leaves the files it was given exactly as they were."""

import hashlib
import shutil

import pytest

from ecdit_cli.cli import main

SPEC = """name: s
grid:
  size: [debug]
  routing: [dense, expert_choice]
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory, ec_run):
    """A workspace with specs, configs, tables, a finished run, an empty study and odd directories."""
    root = tmp_path_factory.mktemp("ws")
    (root / "spec.yaml").write_text(SPEC)
    (root / "malformed.yaml").write_text("name: s\ngrid: {size: [debug]\n")
    for name, text in {
        "unknown_key.yaml": SPEC + "mach: backbone\n",
        "unknown_axis.yaml": SPEC.replace("size:", "sizes:"),
        "empty_axis.yaml": SPEC.replace("[dense, expert_choice]", "[]"),
        "wrong_type.yaml": SPEC + "  steps: [many]\n",
        "unknown_preset.yaml": SPEC.replace("[debug]", "[huge]"),
        "bad_capacity.yaml": SPEC + "  capacity_factor: [0]\n",
        "list.yaml": "- 1\n- 2\n",
    }.items():
        (root / name).write_text(text)
    (root / "run.yaml").write_text("preset: debug\nmodel: {depth: 2}\n")
    (root / "table.csv").write_text("n,loss,routing\n1e3,3.1,dense\n1e4,2.5,dense\n1e5,2.2,dense\n1e6,2.05,dense\n")
    (root / "empty.csv").write_text("n,loss\n")
    (root / "negative.csv").write_text("n,loss\n1e3,3.1\n-1e4,2.5\n1e5,2.2\n")
    (root / "empty_dir").mkdir()
    run = root / "run"
    shutil.copytree(ec_run, run)
    old = root / "old_run"
    shutil.copytree(ec_run, old)
    cfg = (old / "config.yaml").read_text().replace("format_version: 1", "format_version: 99")
    (old / "config.yaml").write_text(cfg)
    (root / "unfinished").mkdir()
    (root / "unfinished" / "config.yaml").write_text((ec_run / "config.yaml").read_text())
    main_ok(["sweep", str(root / "spec.yaml"), "-o", str(root / "study")])
    main_ok(["export", str(run), "-o", str(root / "export")])
    return root


def main_ok(args):
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, f"{args} failed"


CASES = [
    # sweep
    ("sweep", ["sweep", "{ws}/malformed.yaml"], "is not valid YAML at line 3"),
    ("sweep", ["sweep", "{ws}/unknown_key.yaml"], "unknown key 'mach' (did you mean 'match'?)"),
    ("sweep", ["sweep", "{ws}/unknown_axis.yaml"], "unknown axis 'grid.sizes' (did you mean 'size'?)"),
    ("sweep", ["sweep", "{ws}/empty_axis.yaml"], "axis 'grid.routing' is empty"),
    ("sweep", ["sweep", "{ws}/wrong_type.yaml"], "train.steps='many' is invalid: expected an integer"),
    ("sweep", ["sweep", "{ws}/unknown_preset.yaml"], "unknown preset 'huge'"),
    ("sweep", ["sweep", "{ws}/bad_capacity.yaml"], "moe.capacity_factor=0.0 is invalid: must be > 0"),
    ("sweep", ["sweep", "{ws}/list.yaml"], "must hold a mapping of keys to values"),
    ("sweep", ["sweep", "{ws}/missing.yaml"], "study spec file not found"),
    # train
    ("train", ["train", "{ws}/run.yaml", "--set", "train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    ("train", ["train", "{ws}/run.yaml", "--set", "model.depth=two"], "model.depth='two' is invalid: expected an integer"),
    ("train", ["train", "debug", "--set", "model.num_heads=3"], "model.num_heads=3 is invalid: must divide model.hidden_size=32"),
    ("train", ["train", "debug", "--set", "model.patch_size=5"], "model.patch_size=5 is invalid: must divide model.input_size=32"),
    ("train", ["train", "debug", "--set", "moe.routing=expert_choice", "--set", "moe.num_experts=6", "--ep", "4"],
     "moe.ep_size=4 is invalid: must divide moe.num_experts=6"),
    ("train", ["train", "debug", "--set", "moe.routing=token_choice", "--set", "moe.top_k=9"],
     "moe.top_k=9 is invalid: must be <= moe.num_experts=8"),
    ("train", ["train", "debug", "--set", "train.lr=-1"], "train.lr=-1.0 is invalid: must be > 0"),
    ("train", ["train", "{ws}/missing.yaml"], "config file not found"),
    ("train", ["train", "--sweep", "{ws}/nowhere"], "study directory not found"),
    ("train", ["train", "--sweep", "{ws}/empty_dir"], "is not a study directory (no manifest.csv)"),
    ("train", ["train", "debug", "--set", "moe.routing=expert_choice", "-o", "{ws}/old_run"], "run format version 99"),
    ("train", ["train", "debug", "--set", "model.depth=3", "-o", "{ws}/run"], "holds a run with a different config"),
    ("train", ["train", "debug", "--set", "moe.routing=expert_choice", "--set", "model.hidden_size=48",
               "--set", "train.init_from={ws}/run", "-o", "{ws}/upcycled"], "train.init_from: model.hidden_size 32 in"),
    ("train", ["train", "debug", "--set", "train.init_from={ws}/run", "-o", "{ws}/upcycled"],
     "a dense run cannot start from it"),
    ("train", ["train", "debug", "--set", "moe.routing=expert_choice", "--set", "train.init_from={ws}/unfinished",
               "-o", "{ws}/upcycled"], "train.init_from: {ws}/unfinished has no final weights"),
    ("train", ["train", "debug", "--set", "train.init_noise=0.01"],
     "train.init_noise=0.01 is invalid: needs train.init_from"),
    # prepare, and the keys of your own data
    ("prepare", ["prepare", "{ws}/run.yaml", "-o", "{ws}/cache"], "is a '.yaml' file; give a folder of images"),
    ("prepare", ["prepare", "{ws}/empty_dir", "-o", "{ws}/cache"], "holds no images"),
    ("prepare", ["prepare", "{ws}/table.csv", "-o", "{ws}/cache"], "needs a header with 'path' and 'caption'"),
    ("prepare", ["prepare", "{ws}/empty_dir", "-o", "{ws}/cache", "--vae", "{ws}/empty_dir"], "has no config.json"),
    ("prepare", ["prepare", "{ws}/empty_dir", "-o", "{ws}/cache", "--image-size", "0"], "--image-size must be >= 1"),
    ("train", ["train", "debug", "--set", "data.source=prepared"], "data.path='' is invalid"),
    ("train", ["train", "debug", "--set", "model.space=latent"], "model.vae_path='' is invalid"),
    ("train", ["train", "debug", "--set", "text.encoder=hf"], "text.hf_path='' is invalid"),
    ("train", ["train", "debug", "--set", "model.space=latnet"], "model.space='latnet' is invalid"),
    # info
    ("info", ["info", "smal"], "'smal' is neither a config file nor a preset (did you mean 'small'?)"),
    ("info", ["info", "small", "--set", "moe.top_k=x"], "moe.top_k='x' is invalid: expected an integer"),
    # fit
    ("fit", ["fit", "{ws}/missing.csv", "--x", "n", "--y", "loss"], "not found"),
    ("fit", ["fit", "{ws}/table.csv", "--x", "nn", "--y", "loss"], "did you mean 'n'"),
    ("fit", ["fit", "{ws}/empty.csv", "--x", "n", "--y", "loss"], "empty"),
    ("fit", ["fit", "{ws}/negative.csv", "--x", "n", "--y", "loss"], "column 'n' must be finite and > 0"),
    # plot and status
    ("plot", ["plot", "{ws}/nowhere"], "not found"),
    ("plot", ["plot", "{ws}/empty_dir"], "neither a study"),
    ("plot", ["plot", "{ws}/study"], "nothing has been trained yet"),
    ("status", ["status", "{ws}/empty_dir"], "neither a study directory"),
    ("collect", ["collect", "{ws}/no_such_study"], "study directory not found"),
    ("archive", ["archive", "{ws}/no_such_study", "{ws}/records"], "study directory not found"),
    ("archive", ["archive", "{ws}/empty_dir", "{ws}/records"], "is not a study directory (no manifest.csv)"),
    ("archive", ["archive", "{ws}/study", "{ws}/table.csv"], "archive is not a directory"),
    ("train", ["train", "debug", "--archive", "{ws}/records"], "--archive needs --sweep DIR"),
    ("analyze", ["analyze", "{ws}/empty_dir"], "has no final weights (final/model.pt)"),
    ("bench", ["bench", "data", "--image-size", "8"], "must be in 16..64 pixels"),
    ("bench", ["bench", "moe", "--images", "0"], "--images [0] is invalid"),
    # sample
    ("sample", ["sample", "{ws}/run", "--prompt", "a red dragon"], "dragon"),
    ("sample", ["sample", "{ws}/unfinished", "--prompt", "a red circle"], "has no final weights"),
    ("sample", ["sample", "{ws}/nowhere", "--prompt", "a red circle"], "not found"),
    ("sample", ["sample", "{ws}/run", "--prompt", "a red circle", "--steps", "0"], "steps"),
    ("sample", ["sample", "{ws}/run", "--prompt", "a red circle", "--guidance-max-t", "1.5"],
     "guidance max t must be in [0, 1] (1 = guidance at every step), got 1.5"),
    ("sample", ["sample", "{ws}/old_run", "--prompt", "a red circle"], "format version"),
    ("sample", ["sample", "{ws}/run", "--prompt", "a red circle", "--capacity-factor", "0"],
     "moe.capacity_factor=0.0 is invalid: must be > 0"),
    ("sample", ["sample", "{ws}/run", "--prompt", "a red circle", "--race-mode", "topk"],
     "--race-mode applies to race runs"),
    ("train", ["train", "debug", "--set", "moe.routing=token_choice", "--set", "moe.routing_group=batch"],
     "moe.routing_group='batch' is invalid: batch groups apply to moe.routing=expert_choice or race"),
    # tracking, cluster sweeps, export
    ("train", ["train", "debug", "--set", "train.tracker=[jsonl,mlflow]"],
     "train.tracker=['jsonl', 'mlflow'] is invalid: allowed: a list of jsonl, tensorboard, wandb, csv"),
    ("train", ["train", "debug", "--set", "train.wandb_mode=cloud"], "train.wandb_mode='cloud' is invalid: allowed:"),
    ("train", ["train", "debug", "--slurm"], "--slurm needs --sweep DIR"),
    ("train", ["train", "--sweep", "{ws}/study", "--partition", "gpu"], "--partition needs --slurm"),
    ("train", ["train", "--sweep", "{ws}/study", "--slurm", "--cluster", "moon"],
     "--cluster 'moon' is invalid: allowed: slurm, local"),
    ("train", ["train", "--sweep", "{ws}/study", "--slurm", "--nodes", "0"], "--nodes 0 is invalid: must be >= 1"),
    ("train", ["train", "--sweep", "{ws}/study", "--slurm", "--cluster", "local", "--nodes", "2"],
     "--nodes 2 is invalid with --cluster local"),
    ("train", ["train", "--sweep", "{ws}/study", "--slurm", "--cluster", "local", "--no-wait"],
     "--no-wait needs --cluster slurm"),
    ("train", ["train", "--sweep", "{ws}/study", "--slurm", "--archive", "{ws}/records"],
     "--archive cannot be combined with --slurm"),
    ("export", ["export", "{ws}/nowhere"], "run directory not found"),
    ("export", ["export", "{ws}/unfinished"], "has no final weights"),
    ("export", ["export", "{ws}/old_run"], "format version"),
    ("export", ["export", "{ws}/run", "-o", "{ws}/table.csv"], "export directory is not a directory"),
    ("sample", ["sample", "{ws}/export", "--prompt", "a red circle", "--no-ema"], "holds the EMA weights only"),
    # eval
    ("eval", ["eval", "{ws}/nowhere"], "not found"),
    ("eval", ["eval", "{ws}/run", "-n", "0"], "0"),
    ("eval", ["eval", "{ws}/unfinished"], "has no final weights"),
    ("eval", ["eval", "{ws}/run", "--race-mode", "fast"], "--race-mode 'fast' is invalid: allowed: threshold, topk"),
]


def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "/checkpoints/" not in str(p)}


@pytest.mark.parametrize("command,args,message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_gets_one_clear_line_and_exit_code_2_and_leaves_files_intact(ws, command, args, message, capsys):
    before = _snapshot(ws)
    argv = [a.format(ws=ws) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and message.format(ws=ws) in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert _snapshot(ws) == before


def test_the_catalogue_has_a_case_for_every_command_of_ecdit_help():
    # Read from the app itself, so a new command without a bad-input case fails here.
    import typer.main

    from ecdit_cli import cli

    cli._register()
    commands = set(typer.main.get_command(cli.app).commands)
    missing = commands - {c[0] for c in CASES}
    assert not missing, f"commands without a bad-input case: {sorted(missing)}"


def test_debug_shows_the_traceback(ws, capsys):
    with pytest.raises(Exception) as err:
        main(["--debug", "info", "smal"])
    assert "neither a config file nor a preset" in str(err.value)
