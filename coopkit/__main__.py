"""``python -m coopkit``: the same CLI as the ``coopkit`` command."""

from .cli import run

if __name__ == "__main__":
    run()
