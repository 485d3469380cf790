"""Property-based: whatever a params.yaml holds, loading it ends in Params or one AlexopsError."""

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from alexops import params
from alexops.errors import AlexopsError

# the sections of fixed keys; `datasets` maps names to declarations (fuzzed in test_datasets.py)
SECTIONS = {
    f.name: f.default_factory
    for f in dataclasses.fields(params.Params)
    if dataclasses.is_dataclass(f.default_factory)
}
KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def loads_cleanly(raw) -> bool:
    try:
        params.from_dict(raw)
    except AlexopsError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
    return True


@settings(max_examples=300, deadline=None, derandomize=True)
@given(section=st.sampled_from(sorted(SECTIONS)), data=st.data(), value=scalars)
def test_any_value_for_a_known_key_is_accepted_or_a_clean_error(section, data, value):
    key = data.draw(st.sampled_from(KEYS[section]))
    assert loads_cleanly({section: {key: value}})


@settings(max_examples=200, deadline=None, derandomize=True)
@given(section=st.sampled_from(sorted(SECTIONS)), key=st.text(min_size=1, max_size=15), value=scalars)
def test_unknown_keys_are_always_named(section, key, value):
    if key in KEYS[section]:
        return
    try:
        params.from_dict({section: {key: value}})
    except AlexopsError as exc:
        assert params.printable(key) in str(exc)
    else:
        raise AssertionError(f"unknown key {key!r} was accepted")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(raw=st.one_of(scalars, st.dictionaries(st.text(max_size=10), scalars, max_size=4)))
def test_arbitrary_documents_never_raise_anything_else(raw):
    assert loads_cleanly(raw)
