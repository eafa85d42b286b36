"""Pools are node labels: which nodes a label selector admits, as Ray decides it for the forms it accepts."""
import pytest

from actors.cluster import selects


@pytest.mark.parametrize("selector, admitted", [
    ({}, True),
    ({"pool": "data"}, True),
    ({"pool": "gpu"}, False),
    ({"pool": "!gpu"}, True),
    ({"pool": "in(data,gpu)"}, True),
    ({"pool": "!in(data, gpu)"}, False),
    ({"pool": "data", "zone": "a"}, False),
    ({"zone": "!a"}, True),            # a node without the key is not in "a"
])
def test_selects_follows_rays_label_selector_forms(selector, admitted):
    assert selects({"pool": "data"}, selector) is admitted
