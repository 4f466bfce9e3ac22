"""Inference-time exit criteria (plugins/exits.py): when they stop, what they cost, `loopsearch eval --exit`."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import run_cli
from helpers import tiny_model
from loopsearch.errors import LoopsearchError, UnknownPluginError
from loopsearch.eval import loop_scaling
from loopsearch.exits import check_exits, exit_label, exit_params, make_exit, parse_exit
from loopsearch.looping import LoopContext, run_with_exit
from loopsearch.registry import get_registry
from loopsearch.results import leaderboard
from loopsearch_builtins.exits import ArgmaxExit, CosineExit, EntropyExit, HiddenDelta, KLExit, MaxProbExit, MinPKLExit

B, T, D = 2, 6, 8
RF = 1000.0  # readout FLOPs per sequence given to the criteria in the synthetic tests


def crit(cls, **params):
    return cls(cls.Params(**params), RF)


def run(c, block, n=6, masked=None, h=None):
    h = torch.randn(B, T, D, generator=torch.Generator().manual_seed(0)) if h is None else h
    ctx = LoopContext(masked=torch.ones(B, T, dtype=torch.bool) if masked is None else masked, exit=c,
                      readout=lambda z: z)  # the hidden state read as logits over D tokens
    return run_with_exit(h, block, n, ctx)


CONST = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))


def settle(h):  # the identity after the first loop: every input maps to the same output
    return CONST.clone()


def roll(h):  # keeps changing: relative change sqrt(2)-ish, argmax moves every loop
    return h.roll(1, dims=-1)


def test_hidden_delta_stops_when_the_block_settles():
    assert run(crit(HiddenDelta), settle).applications == 2
    assert run(crit(HiddenDelta), roll).applications == 6
    assert run(crit(HiddenDelta), lambda h: 2 * h).applications == 6  # relative change 1
    assert run(crit(HiddenDelta, tol=1.5), lambda h: 2 * h).applications == 1
    assert run(crit(HiddenDelta, min_loops=4), settle).applications == 4
    assert run(crit(HiddenDelta), settle).extra_flops == 0.0


def test_hidden_delta_looks_at_masked_positions_only():
    masked = torch.zeros(B, T, dtype=torch.bool)
    masked[:, :3] = True

    def changes_unmasked(h):
        return torch.cat((h[:, :3], 2 * h[:, 3:]), dim=1)

    assert run(crit(HiddenDelta), changes_unmasked, masked=masked).applications == 1
    assert run(crit(HiddenDelta), changes_unmasked).applications == 6  # all positions masked
    # a sequence with nothing masked has nothing to decide: it says stop
    assert run(crit(HiddenDelta), roll, masked=torch.zeros(B, T, dtype=torch.bool)).applications == 1


def test_hidden_delta_reduce_max_vs_mean():
    def one_token_moves(h):
        return torch.cat((h[:, :1] * 3, h[:, 1:]), dim=1)  # relative change 2 at one of 6 tokens

    assert run(crit(HiddenDelta, tol=0.5), one_token_moves).applications == 6
    assert run(crit(HiddenDelta, tol=0.5, reduce="mean"), one_token_moves).applications == 1


def test_batch_stops_only_when_every_sequence_says_stop():
    def half(h):  # sequence 0 settles, sequence 1 keeps changing
        return torch.stack((CONST[0], h[1].roll(1, dims=-1)))

    c = crit(HiddenDelta)
    h = torch.randn(B, T, D)
    state = c.init(h)
    ctx = LoopContext(masked=torch.ones(B, T, dtype=torch.bool), exit=c)
    stops = []
    for _ in range(3):
        new = half(h)
        stop, state, _ = c.check(h, new, state, ctx)
        stops.append(stop.tolist())
        h = new
    assert stops == [[False, False], [True, False], [True, False]]
    assert run(c, half).applications == 6


def test_stops_are_sticky():
    a, b, c, d = (torch.randn(T, D, generator=torch.Generator().manual_seed(i)) for i in range(10, 14))
    calls = []

    def block(h):  # sequence 0 settles at loop 2 and moves again at 3; sequence 1 settles at loop 3
        calls.append(1)
        k = len(calls)
        return torch.stack((a if k <= 2 else b, c if k == 1 else d))

    assert run(crit(HiddenDelta), block).applications == 3  # not 4: sequence 0 had exited at loop 2


def test_kl_stops_when_predictions_settle_and_pays_a_readout_per_check():
    r = run(crit(KLExit), settle)
    assert r.applications == 2 and r.extra_flops == 2 * RF  # the first loop's readout counts too
    r = run(crit(KLExit), roll)
    assert r.applications == 6 and r.extra_flops == 5 * RF  # no check after the last allowed loop
    assert run(crit(KLExit, min_loops=5), settle).applications == 5
    assert run(crit(KLExit, tol=100.0), roll).applications == 2  # needs two distributions to compare


def test_argmax_waits_for_patience_and_pays_a_readout_per_check():
    r = run(crit(ArgmaxExit), settle)  # patience 2: loops 2 and 3 agree with their predecessors
    assert r.applications == 3 and r.extra_flops == 3 * RF
    assert run(crit(ArgmaxExit, patience=1), settle).applications == 2
    r = run(crit(ArgmaxExit, patience=1), roll)
    assert r.applications == 6 and r.extra_flops == 5 * RF  # no check after the last allowed loop
    assert run(crit(ArgmaxExit, patience=1), lambda h: 2 * h).applications == 2  # scaled logits, same argmax


def test_argmax_drops_the_mask_logit():
    # the largest logit is MASK's (id 0), which the model never predicts: only the rest counts
    def block(h):
        out = torch.randn_like(h)
        out[..., 0] = 100.0
        return out

    c = ArgmaxExit(ArgmaxExit.Params(patience=1), RF, mask_id=0)
    assert run(c, block).applications == 6
    assert run(ArgmaxExit(ArgmaxExit.Params(patience=1), RF), block).applications == 2


def test_cosine_ignores_scale_and_is_free():
    assert run(crit(CosineExit), settle).applications == 2
    assert run(crit(CosineExit), lambda h: 2 * h).applications == 1  # hidden_delta would run to the cap
    assert run(crit(CosineExit), roll).applications == 6
    assert run(crit(CosineExit), settle).extra_flops == 0.0


def test_entropy_and_min_p_kl_compare_successive_readouts():
    for cls in (EntropyExit, MinPKLExit):
        r = run(crit(cls), settle)
        assert r.applications == 2 and r.extra_flops == 2 * RF, cls.name
        assert run(crit(cls, min_loops=4), settle).applications == 4
    # a roll permutes the logits: the entropy is unchanged although the prediction moved
    assert run(crit(EntropyExit), roll).applications == 2
    r = run(crit(MinPKLExit), roll)
    assert r.applications == 6 and r.extra_flops == 5 * RF


def test_min_p_kl_is_blind_to_the_tail():
    """Only the tail (tokens far below min_p x the top probability) moves: KL sees it, min-p KL does not."""
    top = torch.full((B, T, D), -20.0)
    top[..., 0] = 10.0
    calls = []

    def tail_moves(h):
        calls.append(1)
        out = top.clone()
        out[..., 1:] += 5.0 * torch.randn(B, T, D - 1, generator=torch.Generator().manual_seed(len(calls)))
        return out

    assert run(crit(MinPKLExit), tail_moves).applications == 2
    assert run(crit(KLExit, tol=1e-30), tail_moves).applications == 6


def test_max_prob_stops_once_confident():
    sure = torch.zeros(B, T, D)
    sure[..., 2] = 20.0  # p(top) ~ 1
    r = run(crit(MaxProbExit), lambda h: sure.clone())
    assert r.applications == 1 and r.extra_flops == RF  # one readout, after the first loop
    flat = torch.zeros(B, T, D)  # uniform over D tokens: p(top) = 1/D
    assert run(crit(MaxProbExit), lambda h: flat.clone()).applications == 6
    assert run(crit(MaxProbExit, threshold=1.0 / D), lambda h: flat.clone()).applications == 1
    one_sure = flat.clone()
    one_sure[:, 0, 2] = 20.0  # one of T positions sure: mean doubt (T-1)/T x (1 - 1/D)
    assert run(crit(MaxProbExit, threshold=0.5), lambda h: one_sure.clone()).applications == 6
    assert run(crit(MaxProbExit, threshold=0.2, reduce="mean"), lambda h: one_sure.clone()).applications == 1


# ---- on a real LoopedMDM ------------------------------------------------------------------------------
def masked_input(seq_len=16, b=3, vocab=50):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, vocab, (b, seq_len), generator=g)
    return torch.where(torch.rand(b, seq_len, generator=g) < 0.5, torch.full_like(x, vocab), x)


def identity_block_model():
    model = tiny_model(loop=(1, 3, {"n_loops": 6})).eval()
    with torch.no_grad():
        for i in (1, 2):  # zero the residual writes: the loop block is the identity
            model.backbone.blocks[i].proj.weight.zero_()
            model.backbone.blocks[i].mlp.down.weight.zero_()
    return model


@pytest.mark.parametrize("name,params,loops", [("hidden_delta", {}, 1), ("kl", {}, 2), ("argmax", {}, 3),
                                               ("argmax", {"patience": 1, "min_loops": 4}, 4), ("cosine", {}, 1),
                                               ("min_p_kl", {}, 2), ("entropy", {}, 2),
                                               ("max_prob", {"threshold": 0.0}, 1)])
def test_identity_block_exits_early_in_the_model(name, params, loops):
    model = identity_block_model()
    x = masked_input()
    with torch.no_grad():
        out = model(x, exit=make_exit(name, params, model, 16))
        plain = model(x, n_loops=1)
    assert out.applications == loops and out.stats["loops_run"] == loops
    assert torch.allclose(out.logits, plain.logits, atol=1e-5)


@pytest.mark.parametrize("name,params", [("hidden_delta", {"tol": 1e-6}), ("kl", {"tol": 1e-9}),
                                         ("argmax", {"patience": 5}),  # 5 loops: at most 4 comparisons
                                         ("cosine", {"tol": 1e-9}), ("min_p_kl", {"tol": 1e-30}),
                                         ("entropy", {"tol": 1e-9}), ("max_prob", {"threshold": 1.0})])
def test_a_moving_block_runs_to_the_cap(name, params):
    model = tiny_model(loop=(1, 3, {"n_loops": 5})).eval()
    with torch.no_grad():
        for i in (1, 2):  # big residual writes: the hidden state keeps moving
            model.backbone.blocks[i].proj.weight.mul_(200)
            model.backbone.blocks[i].mlp.down.weight.mul_(200)
        out = model(masked_input(), exit=make_exit(name, params, model, 16))
    assert out.applications == 5


def measured(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name,params", [("hidden_delta", {"tol": 10.0}), ("kl", {"tol": 1e9}), ("kl", {"tol": 1e-9}),
                                         ("argmax", {"patience": 1}), ("argmax", {"patience": 9}),
                                         ("cosine", {"tol": 10.0}), ("min_p_kl", {"tol": 1e9}),
                                         ("entropy", {"tol": 1e-12}), ("max_prob", {"threshold": 0.0})])
@pytest.mark.parametrize("seq_len", [16, None])
def test_exit_flops_match_flop_counter(name, params, seq_len):
    model = tiny_model(loop=(1, 3, {"n_loops": 4}), seq_len=16).eval()
    x = masked_input()
    c = make_exit(name, params, model, seq_len)  # seq_len None: the readout cost follows the input
    res = {}

    def fwd():
        with torch.no_grad():
            res["out"] = model(x, exit=c)

    counted = measured(fwd)
    out = res["out"]
    per_check = 0.0 if name in ("hidden_delta", "cosine") else model.readout_flops(16)
    checks = out.applications if out.applications < 4 else 3  # no check after the cap's last loop
    assert out.extra_flops == pytest.approx(checks * per_check)
    analytic = model.inference_flops_per_token(16, out.applications, out.extra_flops) * 16 * x.shape[0]
    assert abs(analytic - counted) / counted < 0.02, (analytic, counted, out.applications)


# ---- lookup, specs, CLI ---------------------------------------------------------------------------------
def test_registered_and_built_through_the_registry():
    reg = get_registry()
    assert {"hidden_delta", "cosine", "kl", "min_p_kl", "entropy", "argmax", "max_prob"} <= set(
        reg.items("exit_criterion"))
    assert reg.get("exit_criterion", "kl") is KLExit
    with pytest.raises(UnknownPluginError,
                       match="available: argmax, cosine, entropy, hidden_delta, kl, max_prob, min_p_kl"):
        exit_params("nope")
    with pytest.raises(LoopsearchError, match="bad parameters for exit criterion 'kl'.*tol.*accepted"):
        exit_params("kl", {"tol": "-1"})
    with pytest.raises(LoopsearchError, match="patience"):
        exit_params("argmax", {"patiense": "2"})


def test_parse_exit_and_label():
    assert parse_exit("hidden_delta") == ("hidden_delta", {})
    assert parse_exit("hidden_delta:tol=0.01, reduce=mean") == ("hidden_delta", {"tol": "0.01", "reduce": "mean"})
    for bad in ("", ":tol=1", "kl:tol"):
        with pytest.raises(LoopsearchError, match="NAME:key=value"):
            parse_exit(bad)
    _, p = exit_params("hidden_delta", {"tol": "0.5"})
    assert p.tol == 0.5 and exit_label("hidden_delta", p) == "hidden_delta:tol=0.5"
    assert check_exits([("kl", {})]) == [("kl", "kl", {})]
    assert loop_scaling.check_exits is check_exits  # what the evaluations check with


def test_plugins_list_shows_the_criteria():
    r = run_cli("plugins", "list", "--json")
    assert r.returncode == 0, r.stderr
    found = {p["name"]: p for p in json.loads(r.stdout)["plugins"] if p["kind"] == "exit_criterion"}
    assert {"hidden_delta", "kl", "argmax"} <= set(found)
    assert found["hidden_delta"]["parameters"]["tol"]["description"]
    assert "min_loops" in found["argmax"]["parameters"]


@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown exit criterion 'nope'; available: argmax, cosine, entropy, hidden_delta, kl, max_prob, min_p_kl"),
    ("kl:tol=abc", "bad parameters for exit criterion 'kl'"),
    ("kl:tol", "NAME:key=value")])
def test_bad_exit_is_a_one_line_error(spec, message):
    # checked before the study is opened
    r = run_cli("evaluate", "no-such-study", "1", "--metric", "loop_scaling", "--exit", spec)
    assert r.returncode == 2 and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_eval_with_exit_criteria(trained):  # noqa: F811
    r = run_cli("evaluate", "scale", "1", "--metric", "loop_scaling", "--loops", "2,4",
                "--exit", "hidden_delta:tol=0.5", "--exit", "kl", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["n_loops"], row["exit"]) for row in rows] == [
        (2, "none"), (2, "hidden_delta:tol=0.5"), (2, "kl"), (4, "none"), (4, "hidden_delta:tol=0.5"), (4, "kl")]
    by = {(row["n_loops"], row["exit"]): row for row in rows}
    for (n, ex), row in by.items():
        assert 1 <= row["mean_loops"] <= n
        if ex == "none":
            assert row["mean_loops"] == n
        if ex == "kl":  # readouts make kl dearer than the same loops without it
            base = by[(n, "none")]["inference_flops_per_token"] / n
            assert row["inference_flops_per_token"] > base * row["mean_loops"] * 0.99
            assert row["mean_loops"] >= 2
    # executed loops price the FLOPs: fewer loops, fewer FLOPs; as many loops, the same FLOPs
    hd = by[(4, "hidden_delta:tol=0.5")]
    if hd["mean_loops"] < 4:
        assert hd["inference_flops_per_token"] < by[(4, "none")]["inference_flops_per_token"]
    else:
        assert hd["inference_flops_per_token"] == pytest.approx(by[(4, "none")]["inference_flops_per_token"])
    # a second run adds rows to the stored ones
    r = run_cli("evaluate", "scale", "1", "--metric", "loop_scaling", "--loops", "3", "--exit", "argmax:patience=1",
                "--json")
    assert r.returncode == 0, r.stderr
    df = leaderboard.scaling_frame(studies=["scale"])
    assert len(df) == 8 and set(df["exit"]) == {"none", "hidden_delta:tol=0.5", "kl", "argmax:patience=1"}
    assert (df["mean_loops"] <= df["n_loops"]).all()
    table = run_cli("leaderboard", "--study", "scale", "--scaling", "--format", "json")
    assert table.returncode == 0, table.stderr
    shown = json.loads(table.stdout)
    assert {"exit", "mean_loops"} <= set(shown[0]) and len(shown) == 8
