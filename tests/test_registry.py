import pytest

from rlhf_core.registry import lookup, register


def test_register_adds_function_under_name_and_returns_it_unchanged():
    registry: dict = {}

    @register(registry, "double")
    def double(x):
        return 2 * x

    assert registry == {"double": double}
    assert double(3) == 6  # the decorator does not wrap the function


def test_register_twice_raises_naming_the_duplicate_and_keeps_the_first():
    registry: dict = {}
    register(registry, "a")(len)
    with pytest.raises(ValueError, match="'a'"):
        register(registry, "a")(abs)
    assert registry["a"] is len


def test_lookup_returns_registered_function():
    registry = {"b": abs, "a": len}
    assert lookup(registry, "a", "estimator") is len


def test_lookup_unknown_name_lists_sorted_choices():
    registry = {"b": abs, "a": len}
    with pytest.raises(ValueError) as excinfo:
        lookup(registry, "c", "KL estimator")
    assert str(excinfo.value) == "unknown KL estimator 'c'; choose one of ['a', 'b']"
