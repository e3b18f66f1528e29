"""The restricted unpickler: plain data loads, code does not run."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import pytest

from lens_manifests.safe_pickle import UnsafePickleError, safe_load, safe_loads


class _SystemCall:
    """Unpickling this calls os.system, the classic malicious pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_refuses_os_system_payload(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "evil": _SystemCall(marker)}], protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"refusing to load global '(posix|os|nt)\.system'") as err:
        safe_load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_refuses_any_other_global() -> None:
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        safe_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"collections\.Counter"):
        safe_loads(pickle.dumps(collections.Counter("ab"), protocol=2))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_loads_plain_refs(protocol: int) -> None:
    refs = [
        {
            "ref_id": 7, "ann_id": 3, "image_id": 11, "split": "testA", "category_id": 1,
            "sentences": [{"sent": "the man on the left", "sent_id": 1, "tokens": ["the", "man"]}],
            "sent_ids": [1], "tags": {"a", "b"}, "box": (1.5, 2.0), "od": collections.OrderedDict(x=1),
            "dd": collections.defaultdict(list, {"k": [1]}),
        }
    ]  # fmt: skip
    assert safe_loads(pickle.dumps(refs, protocol=protocol)) == refs


def test_python2_byte_strings_fall_back_to_latin1() -> None:
    # protocol 2, as Python 2 wrote it: [{'sent': 'café'}] with a raw byte string (SHORT_BINSTRING)
    data = b"\x80\x02]q\x00}q\x01U\x04sentq\x02U\x04caf\xe9q\x03sa."
    assert safe_loads(data) == [{"sent": "café"}]
    # protocol 2 names the builtins module "__builtin__", as Python 2 did
    py2_set = pickle.dumps([{1}], protocol=2, fix_imports=True)
    assert b"__builtin__" in py2_set
    assert safe_loads(py2_set) == [{1}]
