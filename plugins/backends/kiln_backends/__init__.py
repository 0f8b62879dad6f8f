"""kiln-backends: the devices kiln compiles for, each owning its lowering."""

from kiln import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_backends():
    from .cpu import CPU

    return [CPU]
