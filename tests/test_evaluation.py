"""kcs-lens evaluate / baseline: metrics of the three variants, subnetwork statistics, random
baselines, and clear errors for bad run directories and mismatched models."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _eval_fixtures import cli, write_run
from conftest import requires_bundled, tiny_hf_model

from kcs_lens.discovery.rundir import load_run
from kcs_lens.errors import RunError, SubnetworkError
from kcs_lens.evaluation.evaluate import baseline_run, evaluate_run
from kcs_lens.masks.subnetwork import Subnetwork, random_like
from kcs_lens.model.loading import available_backends

pytest_plugins = ["_eval_fixtures"]  # fixtures tiny_lm, real_run (shared by the session)


def test_evaluate_matches_discovery_summary(real_run, tiny_lm):
    res = evaluate_run(real_run, lens_model=tiny_lm, log=lambda m: None)
    s = json.loads((real_run / "summary.json").read_text())
    m = res["metrics"]
    for k in ("target", "control", "lm"):
        assert m["remaining"][k]["ppl"] == pytest.approx(s["remaining"][f"{k}_ppl"], rel=1e-6)
        assert m["original"][k]["ppl"] == pytest.approx(s["original"][f"{k}_ppl"], rel=1e-6)
        assert m["remaining"][k]["dppl"] == pytest.approx(s["delta"][f"{k}_dppl"], rel=1e-5, abs=1e-6)
    for k in ("target", "control"):  # one definition of the answers (scoring.TailScores) in both files
        for v in ("original", "remaining"):
            assert m[v][k]["top1"] == pytest.approx(s[v][f"{k}_top1"]) and m[v][k]["rank_mean"] == pytest.approx(
                s[v][f"{k}_rank"]
            )
            assert m[v][k]["mc"] == pytest.approx(s[v][f"{k}_mc"]) and m[v][k]["mc_norm"] == pytest.approx(s[v][f"{k}_mc_norm"])
    assert m["original"]["target"]["mc_chance"] == pytest.approx(s["multiple_choice"]["target"]["chance"])
    for v in ("original", "remaining"):  # the logit lens of the removed facts, as discovery recorded it
        assert m[v]["target"]["lens_top10_any"] == pytest.approx(s[v]["target_lens_top10_any"])
        assert m[v]["target"]["lens_top10_any"] >= m[v]["target"]["top10"]  # the last layer is the output
    assert res["subnetwork"]["sparsity"] == pytest.approx(s["sparsity"])
    assert json.loads((real_run / "evaluation.json").read_text())["subnetwork_sha"] == res["subnetwork_sha"]
    t = m["remaining"]["target"]
    assert t["drank_min"] <= t["drank_mean"] <= t["drank_max"] and t["dlogprob_min"] <= t["dlogprob_mean"] <= t["dlogprob_max"]
    assert 0 <= t["top1"] <= t["top5"] <= t["top10"] <= 1


def test_empty_subnetwork_changes_nothing_and_full_keeps_nothing(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    run = write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.0)
    res = evaluate_run(run, lens_model=tiny_lm, save=False)
    rem, sub = res["metrics"]["remaining"], res["metrics"]["subnetwork"]
    for k in ("target", "control", "lm"):
        assert rem[k]["dppl"] == pytest.approx(0.0, abs=1e-6)
        assert sub[k]["dppl"] != pytest.approx(0.0, abs=1e-3)  # every masked weight zeroed
    assert rem["target"]["drank_max"] == 0 and rem["target"]["dlogprob_max"] == pytest.approx(0, abs=1e-6)
    assert res["subnetwork"]["sparsity"] == 1.0 and not (run / "evaluation.json").exists()


def test_subnetwork_stats_density_per_layer_matrix_head(tiny_lm):
    from kcs_lens.masks.granularity import mask_shape
    from kcs_lens.masks.mask_config import MaskConfig

    s = tiny_lm.shape  # 4 layers, 4 heads, d_model 64
    mc = MaskConfig((2, 3))
    logits = {n: torch.full(mask_shape(s, n.split(".")[-1], "weight"), -10.0) for n in mc.model_names(s)}
    logits["blocks.2.attn.W_Q"][1] = 10.0  # all of head 1's query weights
    logits["blocks.3.mlp.W_in"][0, 0] = 0.5  # one weight, mask probability 0.62 (neither near 0 nor 1)
    st = Subnetwork(logits, mc, s).density_stats()
    d = st["density"]
    n_attn = s.n_heads * s.d_model * s.d_head
    assert d["per_head"]["2"]["W_Q"] == [0.0, 1.0, 0.0, 0.0]
    assert d["per_head"]["2"]["all"][1] == pytest.approx(0.25)
    assert d["per_layer_matrix"]["2"]["W_Q"] == pytest.approx(0.25)
    assert d["per_matrix"]["W_Q"] == pytest.approx(0.125)
    assert d["per_layer_matrix"]["3"]["W_in"] == pytest.approx(1 / (s.d_model * s.d_mlp))
    n_layer = 4 * n_attn + 2 * s.d_model * s.d_mlp
    assert d["per_layer"]["2"] == pytest.approx(s.d_model * s.d_head / n_layer)
    assert st["n_in_subnetwork"] == s.d_model * s.d_head + 1
    assert st["sparsity"] == pytest.approx(1 - st["n_in_subnetwork"] / (2 * n_layer))
    assert st["sparsity_all_linear"] == pytest.approx(1 - st["n_in_subnetwork"] / (4 * n_layer))
    n_logits = 2 * n_layer
    assert st["logits"]["near_1"] == pytest.approx(s.d_model * s.d_head / n_logits)
    assert st["logits"]["near_0"] == pytest.approx(1 - (s.d_model * s.d_head + 1) / n_logits)


def test_neuron_granularity_counts_rows(tiny_lm):
    from kcs_lens.masks.granularity import mask_shape
    from kcs_lens.masks.mask_config import MaskConfig

    s, mc = tiny_lm.shape, MaskConfig((3,), granularity="row")
    logits = {n: torch.full(mask_shape(s, n.split(".")[-1], "row"), -1.0) for n in mc.model_names(s)}
    logits["blocks.3.mlp.W_out"][5] = 1.0  # one MLP hidden unit: a row of d_model weights
    sub = Subnetwork(logits, mc, s)
    st = sub.density_stats()
    assert st["n_in_subnetwork"] == s.d_model
    assert st["density"]["per_layer_matrix"]["3"]["W_out"] == pytest.approx(1 / s.d_mlp)
    rnd = random_like(sub, torch.Generator().manual_seed(0))
    assert {n: int(b.sum()) for n, b in rnd.binary().items()} == {n: int(b.sum()) for n, b in sub.binary().items()}


def test_random_like_same_count_per_matrix(tiny_lm, tiny_kg, tiny_model_dir, tmp_path):
    sub = load_run(write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.1)).subnetwork
    a, b = (random_like(sub, torch.Generator().manual_seed(i)) for i in (0, 1))
    for n, m in sub.binary().items():
        assert int(a.binary()[n].sum()) == int(m.sum()) == int(b.binary()[n].sum())
    assert any(not torch.equal(a.binary()[n], b.binary()[n]) for n in sub.logits)


def test_baseline_spread_and_near_zero_for_a_small_subnetwork(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    run = write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.003)
    res = baseline_run(run, draws=3, lens_model=tiny_lm, log=lambda m: None)
    assert len(res["per_draw"]) == 3 and res["draw_seeds"] == [0, 1, 2]
    mean, std = res["baseline"]["mean"]["metrics"]["remaining"], res["baseline"]["std"]["metrics"]["remaining"]
    for k in ("target", "control", "lm"):
        draws = [d["remaining"][k]["dppl"] for d in res["per_draw"]]
        assert mean[k]["dppl"] == pytest.approx(sum(draws) / 3)
        assert std[k]["dppl"] >= 0
        assert abs(mean[k]["ppl_ratio"] - 1) < 0.1  # removing 0.3% of the weights at random: near zero
    assert "drank_max" in mean["target"] and "top10" in mean["target"]
    draws_mc = [d["remaining"]["target"]["mc"] for d in res["per_draw"]]
    assert mean["target"]["mc"] == pytest.approx(sum(draws_mc) / 3) and 0 <= min(draws_mc)
    assert json.loads((run / "baseline.json").read_text())["draws"] == 3


def test_extra_kgs_and_paraphrases(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    run = write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.05)
    para = tmp_path / "para.jsonl"
    para.write_text(
        "".join(
            json.dumps({"head": f"h{i}", "relation": "IsA", "tail": "animal", "text": f"The h{i} is an animal"}) + "\n"
            for i in range(3)
        )
    )
    res = evaluate_run(run, kgs=[str(tiny_kg["control"])], paraphrases=[str(para)], lens_model=tiny_lm, save=False)
    assert res["sets"]["paraphrases"]["n"] == 3 and res["sets"][str(tiny_kg["control"])]["n"] == 40
    for v in ("original", "remaining", "subnetwork"):
        assert {"target", "control", "lm", "paraphrases", str(tiny_kg["control"])} == set(res["metrics"][v])
    assert "dppl" in res["metrics"]["remaining"]["paraphrases"]


def test_cli_evaluate_and_baseline(real_run, tmp_path):
    for cmd in (("evaluate", real_run), ("export", real_run, "--out", tmp_path / "x"), ("compare-circuits", real_run)):
        bad = cli(*cmd, "--device", "gpu0")  # every command that loads the run's model takes --device
        assert bad.exit_code == 2 and "--device 'gpu0': not a torch device" in bad.output, (cmd, bad.output)
    assert not (tmp_path / "x").exists()
    r = cli("evaluate", real_run, "--json", tmp_path / "e.json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "TargetKG" in r.output and "density" in r.output and (tmp_path / "e.json").exists()
    assert "top-1" in r.output and "top-10" in r.output and "d logprob" in r.output and "MC (chance)" in r.output
    r = cli("baseline", real_run, "--draws", 2, "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    assert "random baseline" in r.output and json.loads((tmp_path / "b.json").read_text())["draws"] == 2
    assert "random: mean ± std" in r.output and "top-1" in r.output and "tail rank" in r.output and " MC " in r.output


def test_bad_run_directories(tmp_path, real_run):
    with pytest.raises(RunError, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="config.json missing"):
        load_run(tmp_path / "empty")
    inc = tmp_path / "incomplete"
    inc.mkdir()
    (inc / "config.json").write_text((real_run / "config.json").read_text())
    with pytest.raises(RunError, match="incomplete run.*--resume"):
        load_run(inc)
    (inc / "subnetwork.safetensors").write_bytes(b"garbage")
    with pytest.raises(SubnetworkError, match="not a kcs-lens subnetwork file"):
        load_run(inc)
    for bad in (tmp_path / "nope", inc):
        r = cli("evaluate", bad)
        assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: ")
    assert not (inc / "evaluation.json").exists()


def test_model_mismatch_is_refused(tmp_path, real_run, tiny_tokenizer):
    before = {p.name: p.stat().st_mtime_ns for p in real_run.iterdir()}
    other = tmp_path / "other"
    tiny_hf_model(tiny_tokenizer, seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    r = cli("evaluate", real_run, "--model", other)
    assert r.exit_code == 2 and "different weights" in r.output
    small = tmp_path / "small"
    tiny_hf_model(tiny_tokenizer, n_layers=2).save_pretrained(small)
    tiny_tokenizer.save_pretrained(small)
    r = cli("baseline", real_run, "--model", small)
    assert r.exit_code == 2 and "shape" in r.output
    assert {p.name: p.stat().st_mtime_ns for p in real_run.iterdir()} == before  # nothing written


@pytest.mark.slow
@requires_bundled
def test_bundled_random_baseline_near_zero(tmp_path):
    """On the bundled model: the found subnetwork removes the TargetKG, a random one of the same
    per-matrix size barely changes anything (uses $KCS_BUNDLED_RUN if set, else a discovery run)."""
    from kcs_lens.discovery.runner import discover

    run = os.environ.get("KCS_BUNDLED_RUN")
    if not run:
        run = tmp_path / "run"
        discover(out=run, log=lambda m: None)
    res = baseline_run(run, draws=3, save=False)
    own, rnd = res["run_metrics"]["remaining"], res["baseline"]["mean"]["metrics"]["remaining"]
    assert own["target"]["ppl_ratio"] > 5
    assert abs(math.log(rnd["target"]["ppl_ratio"])) < 0.1 * math.log(own["target"]["ppl_ratio"])
    for k in ("target", "control", "lm"):
        assert abs(math.log(rnd[k]["ppl_ratio"])) < math.log(1.5), (k, rnd[k])


@pytest.mark.skipif("hooked" not in available_backends(), reason="needs TransformerLens 3.x (HookedTransformer)")
def test_hooked_backend_gives_the_same_evaluation(real_run, tiny_lm, tiny_model_dir):
    from kcs_lens.model.loading import load_model

    a = evaluate_run(real_run, lens_model=tiny_lm, save=False)["metrics"]
    b = evaluate_run(real_run, lens_model=load_model(str(tiny_model_dir), backend="hooked"), save=False)["metrics"]
    for v in a:
        for s in a[v]:
            assert b[v][s]["ppl"] == pytest.approx(a[v][s]["ppl"], rel=1e-4)
