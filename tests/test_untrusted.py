"""Names and JSON from disk and from targets: what ckptd accepts, what it refuses, and why (ckptd/untrusted.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptd.untrusted import NAME_MAX, UntrustedInput, component, fit_name, json_depth, load_json, printable, relative

# Names as a hostile index.json or listing could spell them: separators, dots, NUL, absolute paths, long ones.
hostile_text = st.lists(
    st.sampled_from(["/", "\\", ".", "..", "\x00", "a", "é", "\udcff", "\ud800", " ", "~", "-", "\n"]), max_size=40
).map("".join) | st.text(max_size=300)


@given(hostile_text)
def test_component_accepts_only_one_plain_name(name: str) -> None:
    """Whatever `component` accepts joins to a folder as exactly one entry directly inside it."""
    try:
        accepted = component(name)
    except UntrustedInput:
        return
    base = Path("/srv/restore")
    joined = base / accepted
    assert joined.parent == base and joined.name == accepted
    assert accepted not in ("", ".", "..") and "/" not in accepted and "\x00" not in accepted
    assert len(os.fsencode(accepted)) <= NAME_MAX


@given(st.lists(hostile_text, min_size=1, max_size=5).map("/".join))
def test_relative_never_leaves_the_folder(path: str) -> None:
    """Whatever `relative` accepts stays strictly inside the folder it is joined to, once normalised."""
    try:
        parts = relative(path)
    except UntrustedInput:
        return
    base = Path("/srv/restore")
    joined = Path(os.path.normpath(base.joinpath(*parts)))
    assert joined.is_relative_to(base) and joined != base


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\x00b", "x" * 256, "\\..\\x", "é" * 128]
)
def test_component_refuses_with_a_reason(name: str) -> None:
    """Each refused name gets a message saying what is wrong with it."""
    with pytest.raises(UntrustedInput, match=r"not a file name|separator or NUL|over the 255-byte limit"):
        component(name)


def test_component_takes_undecodable_bytes_and_long_names_up_to_the_limit() -> None:
    """A name of 255 bytes, or one with bytes that are not UTF-8 (surrogateescape), is a valid component."""
    assert component("x" * 255) == "x" * 255
    raw = os.fsdecode(b"caf\xe9.pt")
    assert component(raw) == raw


@given(st.text(min_size=1, max_size=300).filter(lambda n: "/" not in n and "\x00" not in n), st.sampled_from(
    ["", ".ckptd.json", ".0123abcd.ckptd-tmp"]))  # fmt: skip
def test_fit_name_stays_within_name_max_and_keeps_short_names(name: str, suffix: str) -> None:
    """fit_name never passes NAME_MAX; names that fit come back unchanged; shortened ones differ per name."""
    try:
        os.fsencode(name)
    except UnicodeError:
        return
    fitted = fit_name(name, suffix, prefix=".")
    assert len(os.fsencode(fitted)) <= NAME_MAX and fitted.endswith(suffix) and fitted.startswith(".")
    if len(os.fsencode("." + name + suffix)) <= NAME_MAX:
        assert fitted == "." + name + suffix
    else:
        assert fit_name(name + "x", suffix, prefix=".") != fitted


def test_load_json_refuses_depth_and_size_with_clear_messages() -> None:
    """Nesting past the limit or bytes past the limit are refused before parsing; brackets in strings count not."""
    assert json_depth(b'{"a": "[[[[", "b": [1, [2]]}') == 3
    with pytest.raises(UntrustedInput, match="header nests 200000 levels deep, over the limit of 64"):
        load_json(b"[" * 200_000 + b"]" * 200_000, what="header")
    with pytest.raises(UntrustedInput, match=r"index\.json is 11 bytes, over the limit of 10"):
        load_json(b'{"a": "bc"}', what="index.json", max_bytes=10)
    with pytest.raises(UntrustedInput, match=r"index\.json is not valid JSON"):
        load_json(b"{", what="index.json")
    assert load_json(b'{"copies": {"a.pt": 1}}', what="index.json") == {"copies": {"a.pt": 1}}


def test_printable_escapes_what_could_break_or_forge_a_line() -> None:
    """Undecodable bytes show as \\xNN, control characters (a newline in a name) as \\uNNNN."""
    assert printable(os.fsdecode(b"caf\xe9.pt")) == "caf\\xe9.pt"
    assert printable("a\nlevel=error event=forged") == "a\\u000alevel=error event=forged"
    assert printable("epoch=3-step=400.ckpt") == "epoch=3-step=400.ckpt"
