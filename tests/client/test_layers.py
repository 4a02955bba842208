import re

import pytest
import torch

from healthd_client.layers import build_layer_plan, sanitize_layer_name, unwrap_model
from tests.client.conftest import Net

LAYER_NAME = re.compile(r"^[A-Za-z0-9_.:\-\[\]]+$")


def plan_for(model, max_layers=64, params=None):
    optimizer = torch.optim.SGD(params if params is not None else model.parameters(), lr=0.1)
    return build_layer_plan(model, optimizer, max_layers)


def test_layers_are_owning_modules_and_root():
    model = Net()
    plan = plan_for(model)
    assert plan.names == ["root", "net.0", "net.2", "head"]
    by_name = {layer.name: layer for layer in plan.layers}
    assert [plan.params[i] for i in by_name["head"].param_indices] == [model.head.weight, model.head.bias]
    assert by_name["root"].module_type == "Net"
    assert by_name["net.0"].numel == 40


def test_frozen_parameters_outside_the_optimizer_are_not_layers():
    model = Net()
    plan = plan_for(model, params=model.head.parameters())
    assert plan.names == ["head"]


def test_tied_parameters_belong_to_their_first_owner():
    emb = torch.nn.Embedding(10, 4)
    out = torch.nn.Linear(4, 10, bias=False)
    out.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "out": out})
    plan = plan_for(model)
    assert plan.names == ["emb"]
    assert len(plan.params) == 1


def test_parameters_no_module_owns_are_unowned():
    model = torch.nn.Linear(2, 2)
    extra = torch.nn.Parameter(torch.zeros(3))
    plan = plan_for(model, params=[*model.parameters(), extra])
    assert plan.names == ["root", "unowned"]


def test_smallest_layers_fold_into_other():
    sizes = [3, 50, 7, 20, 1]
    model = torch.nn.Sequential(*[torch.nn.Linear(s, 1, bias=False) for s in sizes])
    plan = plan_for(model, max_layers=3)
    assert plan.names == ["1", "3", "other"]  # the two largest keep their names, in model order
    other = plan.layers[-1]
    assert other.module_type == "folded"
    assert other.numel == 3 + 7 + 1
    assert sorted(plan.params[i].numel() for i in other.param_indices) == [1, 3, 7]
    assert plan.layer_of_param == [2, 0, 2, 1, 2]


def test_max_layers_one_folds_everything():
    model = Net()
    plan = plan_for(model, max_layers=1)
    assert plan.names == ["other"]
    assert plan.layer_of_param == [0] * len(plan.params)


def test_a_module_named_other_does_not_collide_with_the_fold():
    model = torch.nn.ModuleDict({
        "other": torch.nn.Linear(10, 10), "a": torch.nn.Linear(1, 1), "b": torch.nn.Linear(1, 1),
    })
    plan = plan_for(model, max_layers=2)
    assert plan.names == ["other", "other_2"]


@pytest.mark.parametrize("raw, expected", [
    ("", "root"),
    ("encoder.layers.1.attn", "encoder.layers.1.attn"),
    ("blocks[0]/attn proj", "blocks[0]_attn_proj"),
    ("ünï", "_n_"),
])
def test_sanitize(raw, expected):
    assert sanitize_layer_name(raw) == expected


def test_long_names_keep_their_tail_and_stay_valid():
    name = sanitize_layer_name("x" * 200 + ".attn")
    assert len(name) == 128 and name.endswith(".attn") and LAYER_NAME.match(name)


def test_every_generated_name_matches_the_schema():
    model = torch.nn.ModuleDict({"weird name!": torch.nn.Linear(2, 2), "ok": torch.nn.Linear(2, 2)})
    plan = plan_for(model)
    assert all(LAYER_NAME.match(n) for n in plan.names)
    assert plan.names == ["weird_name_", "ok"]


def test_wrappers_are_unwrapped():
    inner = Net()

    class Compiled(torch.nn.Module):  # looks like torch.compile's OptimizedModule
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

    wrapped = torch.nn.DataParallel(Compiled(inner))
    assert unwrap_model(wrapped) is inner
    assert plan_for(wrapped, params=inner.parameters()).names == ["root", "net.0", "net.2", "head"]


def test_layer_index_is_cached_per_device_and_pattern():
    plan = plan_for(Net())
    a = plan.layer_index(torch.device("cpu"), [0, 2, 4])
    assert a.tolist() == [plan.layer_of_param[i] for i in (0, 2, 4)]
    assert plan.layer_index(torch.device("cpu"), (0, 2, 4)) is a
    assert plan.memory_overhead_bytes() == 3 * 8
