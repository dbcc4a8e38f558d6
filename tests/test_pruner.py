"""The global pruner: constraints, targets, determinism, and what η does to the ranking."""

from __future__ import annotations

import pytest
import torch

from nvit_lightning.latency import FlopsLatency
from nvit_lightning.models import EMB, KINDS, PrunableViT, ViTDims
from nvit_lightning.pruning import (
    GlobalPruner,
    Structure,
    UnreachableTargetError,
    build_pruning,
    prune_to_targets,
)
from nvit_lightning.pruning.criteria import MagnitudeCriterion, RandomCriterion

GROUPS = {"emb": 8, "head": 1, "qk": 4, "v": 4, "mlp": 8}


def _model(seed: int = 0) -> PrunableViT:
    torch.manual_seed(seed)
    dims = ViTDims(64, (4, 2, 4), (16, 16, 8), (16, 8, 16), (128, 64, 128))
    return PrunableViT(dims, img_size=32, patch_size=8, num_classes=10)


def _latency() -> FlopsLatency:
    return FlopsLatency(tokens=17, num_classes=10, patch_size=8)


def _scores(structure: Structure, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {layer.key: torch.rand(layer.size, generator=g) for layer in structure}


def test_latency_deltas_are_exact_differences() -> None:
    model = _model()
    structure = Structure(model, GROUPS)
    pruner = GlobalPruner(structure, _latency(), eta=1.0)
    dims = structure.live_dims()
    deltas = pruner.latency_deltas(dims)
    lat = _latency().model_latency
    assert deltas[EMB] == pytest.approx(lat(dims) - lat(ViTDims(dims.emb - 8, dims.heads, dims.qk, dims.v,
                                                                  dims.mlp)))
    heads = list(dims.heads)
    heads[1] -= 1
    assert deltas[("head", 1)] == pytest.approx(lat(dims) - lat(ViTDims(dims.emb, heads, dims.qk, dims.v,
                                                                          dims.mlp)))
    mlp = list(dims.mlp)
    mlp[2] -= 8
    assert deltas[("mlp", 2)] == pytest.approx(lat(dims) - lat(ViTDims(dims.emb, dims.heads, dims.qk, dims.v,
                                                                         mlp)))


def test_eta_zero_is_pure_saliency_ranking() -> None:
    structure = Structure(_model(), GROUPS)
    scores = _scores(structure)
    pruner = GlobalPruner(structure, _latency(), eta=0.0, groups_per_event=5, targets=[0.1])
    # brute force: every group = the g lowest remaining units of a layer, ranked by their summed score
    expected = []
    for layer in structure:
        s = scores[layer.key].sort().values
        allowed = layer.size // layer.group_size - 1
        for c in range(allowed):
            expected.append((float(s[c * layer.group_size:(c + 1) * layer.group_size].sum()), layer.key))
    expected.sort(key=lambda t: t[0])
    ranked = pruner.rank(scores)
    top = ranked.top(20)
    assert [key for key, _ in top] == [key for _, key in expected[:20]]
    torch.testing.assert_close(ranked.scores[:20], torch.tensor([s for s, _ in expected[:20]],
                                                                dtype=torch.float64))
    # and the units of the first group are that layer's lowest-scored ones
    first, units = top[0]
    g = structure.layers[first].group_size
    assert set(units.tolist()) == set(scores[first].argsort()[:g].tolist())


def test_large_eta_prefers_latency_heavy_groups() -> None:
    structure = Structure(_model(), GROUPS)
    uniform = {layer.key: torch.full((layer.size,), 1e-3) for layer in structure}
    pruner = GlobalPruner(structure, _latency(), eta=1e6)
    deltas = pruner.latency_deltas(structure.live_dims())
    [(first, _)] = pruner.rank(uniform).top(1)
    # saliency per group is g x 1e-3, negligible against η·ΔLat: the heaviest ΔLat goes first
    assert deltas[first] == pytest.approx(max(deltas.values()))
    [(first_without_penalty, _)] = GlobalPruner(structure, _latency(), eta=0.0).rank(uniform).top(1)
    assert first_without_penalty != first  # cheapest by count (groups of 1 head) without η


def test_reaches_target_and_records_crossings_in_order() -> None:
    model = _model()
    structure, criterion, pruner = build_pruning(model, _latency(), "magnitude", targets=[0.8, 0.5],
                                                 groups_per_event=3, group_sizes=GROUPS)
    ratios = []
    events = prune_to_targets(pruner, criterion, calibrate=lambda: None,
                              on_event=lambda e: ratios.append(e.ratio_after))
    assert pruner.reached == [0.8, 0.5]
    crossing = [e for e in events if e.targets_reached]
    assert [e.targets_reached for e in crossing] == [[0.8], [0.5]]
    assert crossing[0].ratio_after <= 0.8 and crossing[1].ratio_after <= 0.5
    # each event stops at the first group that crosses: the one before was still above the target
    before_last = events[events.index(crossing[1]) - 1].ratio_after
    assert before_last > 0.5
    assert ratios == [e.ratio_after for e in events] and ratios == sorted(ratios, reverse=True)
    assert pruner.latency_ratio() == pytest.approx(events[-1].ratio_after)
    assert structure.live_dims() == events[-1].dims


def test_extreme_target_respects_constraints() -> None:
    model = _model()
    structure, criterion, pruner = build_pruning(model, _latency(), "magnitude", targets=[0.05],
                                                 groups_per_event=50, group_sizes=GROUPS)
    prune_to_targets(pruner, criterion, calibrate=lambda: None)
    assert pruner.latency_ratio() <= 0.05
    for layer in structure:  # every layer keeps at least one group
        assert int(layer.mask.count_nonzero()) >= layer.group_size
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the tiny model still computes, and compacts exactly
        assert (model.eval()(x) - model.compact().eval()(x)).abs().max() < 1e-4


def test_unreachable_target_prunes_to_the_floor_and_says_so() -> None:
    model = _model()
    structure = Structure(model, GROUPS)
    pruner = GlobalPruner(structure, _latency(), targets=[0.02], groups_per_event=10_000)
    assert pruner.min_latency_ratio() > 0.02
    with pytest.raises(UnreachableTargetError, match="unreachable"):
        pruner.check_reachable()
    with pytest.raises(UnreachableTargetError, match="unreachable"):
        prune_to_targets(pruner, MagnitudeCriterion(structure), calibrate=lambda: None)
    first = pruner.step(MagnitudeCriterion(structure).scores())  # every allowed group goes at once
    second = pruner.step(MagnitudeCriterion(structure).scores())
    assert sum(first.pruned.values()) > 0 and sum(second.pruned.values()) == 0 and not pruner.done
    dims = structure.live_dims()  # pruned down to the floor, never below
    assert dims.emb == 8
    assert dims.heads == (1, 1, 1) and dims.qk == (4, 4, 4) and dims.v == (4, 4, 4) and dims.mlp == (8, 8, 8)
    assert pruner.latency_ratio() == pytest.approx(pruner.min_latency_ratio())


def test_pruned_units_never_count_again_and_weights_are_zero() -> None:
    model = _model()
    structure = Structure(model, GROUPS)
    pruner = GlobalPruner(structure, _latency(), groups_per_event=6, targets=[0.2])
    scores = _scores(structure)
    pruner.step(scores)
    dead = {layer.key: (layer.mask == 0).nonzero().flatten() for layer in structure}
    assert sum(d.numel() for d in dead.values()) > 0
    for layer in structure:
        for spec in layer.params:
            viewed = model.get_parameter(spec.name).view(spec.view)
            assert viewed.index_select(spec.axes[layer.key], dead[layer.key]).abs().sum() == 0
    for key, units in pruner.rank(scores).top():
        assert not set(units.tolist()) & set(dead[key].tolist())


def test_deterministic_for_fixed_seed() -> None:
    def run(seed: int) -> dict:
        model = _model()
        structure = Structure(model, GROUPS)
        pruner = GlobalPruner(structure, _latency(), groups_per_event=4, targets=[0.6])
        prune_to_targets(pruner, RandomCriterion(structure, seed=seed), calibrate=lambda: None, rescore=True)
        return {k: v.clone() for k, v in model.masks().items()}

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_bad_pruner_arguments() -> None:
    structure = Structure(_model(), GROUPS)
    for kwargs, message in [({"eta": -1.0}, "eta"), ({"targets": [1.2]}, "between 0 and 1"),
                            ({"targets": [0.0]}, "between 0 and 1"), ({"groups_per_event": 0}, "groups_per_event")]:
        with pytest.raises(ValueError, match=message):
            GlobalPruner(structure, _latency(), **kwargs)


def test_pruner_state_round_trip() -> None:
    structure = Structure(_model(), GROUPS)
    pruner = GlobalPruner(structure, _latency(), targets=[0.9, 0.6])
    pruner.step(_scores(structure), max_groups=200)
    other = GlobalPruner(structure, _latency(), targets=[0.9, 0.6])
    other.load_state_dict(pruner.state_dict())
    assert other.reached == pruner.reached and other.events == pruner.events
    with pytest.raises(ValueError, match="targets"):
        GlobalPruner(structure, _latency(), targets=[0.5]).load_state_dict(pruner.state_dict())


def test_kinds_are_all_prunable() -> None:
    structure = Structure(_model(), GROUPS)
    pruner = GlobalPruner(structure, _latency(), groups_per_event=10_000, targets=[0.3])
    event = pruner.step(_scores(structure))
    assert set(KINDS) == {k for k, n in event.pruned.items() if n > 0}


@pytest.mark.parametrize("rescore", [False, True])
def test_one_shot_scores_once_or_before_every_event(rescore: bool) -> None:
    model = _model()
    structure, criterion, pruner = build_pruning(model, _latency(), "hessian", targets=[0.6],
                                                 groups_per_event=2, group_sizes=GROUPS)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    calls = []

    def calibration(name: str):
        def calibrate() -> None:
            calls.append((name, structure.num_live_units()))
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            criterion.accumulate()
        return calibrate

    events = prune_to_targets(pruner, criterion, calibration("first"), rescore=rescore,
                              recalibrate=calibration("again"))
    assert len(events) > 2 and pruner.done
    if rescore:  # re-measured on the pruned model before every later event
        assert [name for name, _ in calls] == ["first"] + ["again"] * (len(events) - 1)
        live = [n for _, n in calls]
        assert live == sorted(live, reverse=True) and live[0] > live[-1]
        assert criterion.intervals == len(events)
    else:
        assert [name for name, _ in calls] == ["first"] and criterion.intervals == 1


def test_per_latency_ranking_is_saliency_per_ms_saved() -> None:
    structure = Structure(_model(), GROUPS)
    scores = _scores(structure, seed=3)
    pruner = GlobalPruner(structure, _latency(), ranking="per_latency")
    deltas = pruner.latency_deltas(structure.live_dims())
    expected = []
    for layer in structure:
        s = scores[layer.key].sort().values
        for c in range(layer.size // layer.group_size - 1):
            group = float(s[c * layer.group_size:(c + 1) * layer.group_size].sum())
            expected.append((group / deltas[layer.key], layer.key))
    expected.sort(key=lambda t: t[0])
    ranked = pruner.rank(scores)
    assert [key for key, _ in ranked.top(15)] == [key for _, key in expected[:15]]
    torch.testing.assert_close(ranked.scores[:15], torch.tensor([s for s, _ in expected[:15]],
                                                                dtype=torch.float64))


def test_per_latency_ranking_never_offers_groups_that_save_nothing() -> None:
    """A latency model under which MLP neurons cost nothing: their groups are never candidates."""

    class NoMlpCost(FlopsLatency):
        def block_latency(self, block_dims: torch.Tensor) -> torch.Tensor:
            rows = torch.as_tensor(block_dims, dtype=torch.float64).clone()
            rows[:, 4] = 64
            return super().block_latency(rows)

    structure = Structure(_model(), GROUPS)
    ranked = GlobalPruner(structure, NoMlpCost(tokens=17, num_classes=10, patch_size=8),
                          ranking="per_latency").rank(_scores(structure))
    kinds = {key[0] for key, _ in ranked.top()}
    assert "mlp" not in kinds and {"head", "emb"} <= kinds


@pytest.mark.parametrize("ranking", ["penalty", "per_latency"])
def test_latency_step_meets_budget_and_keeps_a_group_of_every_layer(ranking: str) -> None:
    model = _model()
    structure, criterion, pruner = build_pruning(model, _latency(), "random", targets=[0.7, 0.3],
                                                 groups_per_event=10_000, group_sizes=GROUPS, ranking=ranking,
                                                 latency_step=0.1)
    events = prune_to_targets(pruner, criterion, calibrate=lambda: None)
    assert pruner.latency_ratio() <= 0.3
    for before, event in zip([1.0, *[e.ratio_after for e in events]], events):
        drop = before - event.ratio_after
        # an event stops at its step (one group may overshoot it) or at a target crossing
        assert drop > 0 and (drop < 0.1 + 0.08 or event.targets_reached)
    assert len(events) >= 5  # 0.7 of the latency removed in steps of ~0.1 (+ one group)
    for layer in structure:
        assert int(layer.mask.count_nonzero()) >= layer.group_size


def test_relative_eta_is_unit_free() -> None:
    """η is relative to the saliency scale: scaling every saliency (or every latency) by a constant
    leaves the ranking unchanged."""
    structure = Structure(_model(), GROUPS)
    scores = _scores(structure, seed=5)

    class Scaled(FlopsLatency):
        def block_latency(self, block_dims: torch.Tensor) -> torch.Tensor:
            return 1000 * super().block_latency(block_dims)

        def base_latency(self, emb: int) -> float:
            return 1000 * super().base_latency(emb)

    def order(latency, factor: float) -> list:
        pruner = GlobalPruner(structure, latency, eta=0.5, ranking="penalty")
        return [k for k, _ in pruner.rank({k: factor * v for k, v in scores.items()}).top(25)]

    reference = order(_latency(), 1.0)
    assert order(_latency(), 1e-6) == reference
    assert order(Scaled(tokens=17, num_classes=10, patch_size=8), 1.0) == reference
    assert order(_latency(), 1.0) != [k for k, _ in GlobalPruner(structure, _latency()).rank(scores).top(25)]


def test_bad_ranking_and_step_are_refused() -> None:
    structure = Structure(_model(), GROUPS)
    with pytest.raises(ValueError, match="ranking"):
        GlobalPruner(structure, _latency(), ranking="knapsack")
    with pytest.raises(ValueError, match="latency_step"):
        GlobalPruner(structure, _latency(), latency_step=1.5)


def test_kinds_limit_what_competes_and_the_reachable_floor() -> None:
    model = _model()
    structure, criterion, pruner = build_pruning(model, _latency(), "random", targets=[0.6], groups_per_event=4,
                                                 group_sizes=GROUPS, kinds=["head", "mlp"])
    dense = structure.live_dims()
    prune_to_targets(pruner, criterion, calibrate=lambda: None)
    dims = structure.live_dims()
    assert (dims.emb, dims.qk, dims.v) == (dense.emb, dense.qk, dense.v)  # untouched kinds keep their width
    assert dims.heads != dense.heads and dims.mlp != dense.mlp
    only_mlp = GlobalPruner(Structure(_model(), GROUPS), _latency(), kinds=["mlp"])
    everything = GlobalPruner(Structure(_model(), GROUPS), _latency())
    assert only_mlp.min_latency_ratio() > everything.min_latency_ratio()
    with pytest.raises(UnreachableTargetError):
        GlobalPruner(Structure(_model(), GROUPS), _latency(), kinds=["mlp"], targets=[0.05]).check_reachable()
    with pytest.raises(ValueError, match="kinds"):
        GlobalPruner(Structure(_model(), GROUPS), _latency(), kinds=["mlp", "layers"])
