"""QEMU keyval syntax: results and error texts (checked against qemu-storage-daemon 7.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsd.errors import QMPError
from qsd.keyval import is_json_arg, keyval_parse, keyval_parse_help


@pytest.mark.parametrize("params, implied, expected", [
    ("file,filename=x", "driver", {"driver": "file", "filename": "x"}),
    ("m", "chardev", {"chardev": "m"}),
    ("null-co,node-name=a,,b", "driver", {"driver": "null-co", "node-name": "a,b"}),
    ("null-co,a=1,a=2", "driver", {"driver": "null-co", "a": "2"}),
    ("null-co,x=,", "driver", {"driver": "null-co", "x": ""}),
    ("driver=file,filename=a=b", "driver", {"driver": "file", "filename": "a=b"}),
    ("fuse,id=e0,iothread.0=a,iothread.1=b", "type",
     {"type": "fuse", "id": "e0", "iothread": ["a", "b"]}),
    ("x.y.1.z=2,x.y.0.z=1", None, {"x": {"y": [{"z": "1"}, {"z": "2"}]}}),
    ("addr.type=unix,addr.path=/tmp/s", None, {"addr": {"type": "unix", "path": "/tmp/s"}}),
    ("__com.redhat_a=1", None, {"__com.redhat_a": "1"}),
    ("", "driver", {}),
])
def test_parse(params: str, implied: str | None, expected: dict[str, object]) -> None:
    assert keyval_parse(params, implied) == expected


@pytest.mark.parametrize("params, message", [
    ("null-co,foo", "Expected '=' after parameter 'foo'"),
    ("null-co,foo,bar=1", "Expected '=' after parameter 'foo'"),
    ("null-co,a.b=1,a=2", "Parameters 'a.*' used inconsistently"),
    ("null-co,a=1,a.b=2", "Parameters 'a.*' used inconsistently"),
    ("null-co,a.b.c=1,a.b=2", "Parameters 'a.b.*' used inconsistently"),
    ("null-co,a.1=x", "Parameter 'a.0' missing"),
    ("null-co,a.5=1,a.0=2", "Parameter 'a.1' missing"),
    ("null-co,a.0=x,a.b=y", "Parameters 'a.*' used inconsistently"),
    ("help", "Help is not available for this option"),
    ("null-co,help", "Help is not available for this option"),
    ("null-co,?", "Help is not available for this option"),
    ("null-co,,x", "Invalid parameter ''"),
    ("null-co,1a=2", "Invalid parameter '1a'"),
    ("null-co,a..b=2", "Invalid parameter 'a..b'"),
    ("null-co,a.1b=3", "Invalid parameter 'a.1b'"),
    ("null-co,_a=1", "Invalid parameter '_a'"),
    ("=x", "Invalid parameter ''"),
    (",x=1", "Invalid parameter ''"),
    ("null-co," + "a" * 128 + "=1", "Parameter '" + "a" * 128 + "' is too long"),
    ("null-co,b." + "a" * 128 + "=1", "Parameter fragment '" + "a" * 128 + "' is too long"),
])
def test_errors(params: str, message: str) -> None:
    with pytest.raises(QMPError) as info:
        keyval_parse(params, "driver")
    assert info.value.desc == message


def test_fragment_of_127_is_fine() -> None:
    assert keyval_parse("a" * 127 + "=1") == {"a" * 127: "1"}


def test_help_for_object() -> None:
    assert keyval_parse_help("help", "qom-type") == ({}, True)
    assert keyval_parse_help("iothread,id=x,help", "qom-type")[1] is True
    assert keyval_parse_help("iothread,id=x", "qom-type") == (
        {"qom-type": "iothread", "id": "x"}, False)


def test_is_json_arg() -> None:
    assert is_json_arg('{"driver": "file"}')
    assert not is_json_arg("driver=file")
    assert not is_json_arg(' {"driver": "file"}')


# Round trip: random trees of QAPI-named dicts, lists and strings, encoded as keyval.
names = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
trees: st.SearchStrategy[object] = st.recursive(
    values,
    lambda children: st.lists(children, min_size=1, max_size=3)
    | st.dictionaries(names, children, min_size=1, max_size=3),
    max_leaves=12,
)


def encode(tree: dict[str, object]) -> str:
    """The keyval text for ``tree`` (the inverse of keyval_parse, without implied key)."""
    items: list[str] = []

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(f"{prefix}{key}.", child)
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(f"{prefix}{index}.", child)
        else:
            assert isinstance(node, str)
            items.append(f"{prefix[:-1]}={node.replace(',', ',,')}")

    walk("", tree)
    return ",".join(items)


@settings(max_examples=300)
@given(st.dictionaries(names, trees, max_size=5))
def test_roundtrip(tree: dict[str, object]) -> None:
    assert keyval_parse(encode(tree)) == tree


@settings(max_examples=300)
@given(st.text(max_size=40), st.sampled_from([None, "driver"]))
def test_random_text_parses_or_fails_cleanly(params: str, implied: str | None) -> None:
    try:
        result = keyval_parse(params, implied)
    except QMPError:
        return
    assert isinstance(result, dict)
