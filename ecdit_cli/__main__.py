"""`python -m ecdit_cli`: the `ecdit` program.

`python -m ecdit_cli _worker RUN_DIR` is one process of a launched run (train/launch.py starts N
of them through a launcher); it is not a user command, so it bypasses the Typer app.
"""

import sys

WORKER = "_worker"

if __name__ == "__main__":
    # The DeepSpeed launcher puts its --local_rank=N before the module's own arguments.
    if WORKER in sys.argv[1:3]:
        from ecdit_cli.cli.worker import main as worker_main

        args = sys.argv[1:]
        args.remove(WORKER)
        sys.exit(worker_main(args))
    from ecdit_cli.cli import main

    main()
