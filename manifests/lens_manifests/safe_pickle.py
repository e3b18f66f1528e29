"""Load pickles that may only contain plain data (REFER's ``refs(<splitBy>).p``).

A pickle is a program: ``pickle.load`` can import and call any global
(``os.system`` included). REFER ships its refs as a pickle, so it is read with
:class:`RestrictedUnpickler`, whose ``find_class`` only hands out a short list
of container and scalar types. Lists, dicts, tuples, strings and numbers need
no globals at all; sets and ordered/default dicts need the few allowed below.
Anything else stops the load with :class:`UnsafePickleError` naming the global. A
file that is not a complete pickle (truncated, damaged) stops it with
:class:`BrokenPickleError`, never with the ``EOFError`` a CLI would take for Ctrl-D.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

#: (module, name) pairs a pickle may reference; all are inert data types.
#: ``bytes``/``bytearray`` are left out on purpose: called with a large int they
#: allocate that many bytes, and byte strings have their own opcodes anyway.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "str"): str,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "complex"): complex,
    ("builtins", "bool"): bool,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside :data:`ALLOWED_GLOBALS`."""


class BrokenPickleError(pickle.UnpicklingError):
    """A file is not a complete pickle: truncated, damaged, or not a pickle at all."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that builds plain containers only."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 pickles (protocol < 3) name the builtins module "__builtin__";
        # the default find_class would remap it, an override has to do it itself.
        if module == "__builtin__":
            module = "builtins"
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': only plain containers "
                "(dict, list, tuple, set, str, numbers) may appear in this pickle"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r}: only plain containers may appear in this pickle")


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    Python 2 pickles (REFER's files are protocol 2) may hold byte strings;
    they are read as ASCII first and, if that fails, as latin-1, the lossless
    byte-to-character mapping Python 2 ``str`` needs.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except UnicodeDecodeError:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def safe_load(path: str | Path) -> Any:
    """Unpickle the file at ``path`` with :class:`RestrictedUnpickler` (see :func:`safe_loads`)."""
    path = Path(path)
    try:
        return safe_loads(path.read_bytes())
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        # what a truncated or garbled opcode stream raises (the unpickler runs no code: see above)
        reason = str(e) or type(e).__name__
        raise BrokenPickleError(f"{path} is not a complete pickle (truncated or damaged: {reason})") from None
