"""`python -m ecdit_cli`: the `ecdit` program.

`python -m ecdit_cli _worker RUN_DIR` is one process of a launched run (train/launch.py starts N
of them through a launcher); it is not a user command, so it bypasses the Typer app.
"""

import sys

WORKER = "_worker"

if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER]:
        from ecdit_cli.cli.worker import main as worker_main

        sys.exit(worker_main(sys.argv[2:]))
    from ecdit_cli.cli import main

    main()
