"""``python -m coopkit``: the same CLI as the ``coopkit`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="coopkit")
