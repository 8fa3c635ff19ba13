"""Issue 13: our teacher options (alpha cap, EOS kept from DPO) and the diagnostics,
each against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from aligndistil_cli.teacher.compose import TeacherSpec, cap_alpha, compose, keep_token, realpha
from aligndistil_cli.teacher.health import mirror_cosine, stop_warning, summarise


def spec(**kw) -> TeacherSpec:
    return TeacherSpec(**{"variant": "aligndistil", "beta": 0.1, "kl_coef": 0.1, "alpha_scale": 20.0,
                          "alpha_eps": 1e-3, "temperature": 1.0, **kw})


def test_keep_token_gives_eos_the_dpo_probability_and_rescales_the_rest():
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    dpo = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    # EOS (id 0) gets DPO's 0.1; tokens 1 and 2 share 0.9 as 0.3 : 0.2 -> 0.54 and 0.36.
    torch.testing.assert_close(keep_token(teacher, dpo, 0).exp(), torch.tensor([[0.1, 0.54, 0.36]]))
    torch.testing.assert_close(keep_token(teacher, dpo, None).exp(), torch.tensor([[0.5, 0.3, 0.2]]))


def test_cap_alpha_caps_adaptive_alpha_and_its_coefficient_only():
    alpha, coef = torch.tensor([1.0, 3.0]), torch.tensor([0.1, 0.1 / 3])
    a, c = cap_alpha(alpha, coef, spec(alpha_max=2.0))
    torch.testing.assert_close(a, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(c, torch.tensor([0.1, 0.05]))  # c_t = beta / capped alpha_t
    a, c = cap_alpha(alpha, coef, spec(variant="contrastive", alpha_max=2.0))
    assert a is alpha and c is coef  # a fixed alpha is never capped
    a, c = cap_alpha(alpha, coef, spec())
    assert a is alpha and c is coef  # no cap: the paper's teacher


def test_compose_with_the_cap_by_hand():
    z_dpo = torch.log(torch.tensor([[0.8, 0.2]]))
    z_rev = torch.log(torch.tensor([[0.2, 0.8]]))
    # TVD = 0.6, alpha = 20 * 0.6 + 0.001 = 12.001, capped to 1: z* = 2 z_dpo - z_rev,
    # p* proportional to 0.8^2 / 0.2 = 3.2 and 0.2^2 / 0.8 = 0.05.
    t = compose({"dpo": z_dpo, "rev": z_rev}, spec(alpha_max=1.0), 2)
    torch.testing.assert_close(torch.softmax(t.logits, -1), torch.tensor([[3.2 / 3.25, 0.05 / 3.25]]))
    torch.testing.assert_close(t.alpha, torch.tensor([1.0]))
    torch.testing.assert_close(t.coef, torch.tensor([0.1]))
    torch.testing.assert_close(t.tvd, torch.tensor([0.6]))
    # Uncapped: alpha = 12.001, p* proportional to 0.8 * 4^12.001 and 0.2 * 0.25^12.001.
    a = 12.001
    hi, lo = 0.8 * 4.0**a, 0.2 * 0.25**a
    t = compose({"dpo": z_dpo, "rev": z_rev}, spec(), 2)
    torch.testing.assert_close(torch.softmax(t.logits.double(), -1), torch.tensor([[hi / (hi + lo), lo / (hi + lo)]],
                                                                                 dtype=torch.float64))
    # With EOS = token 1 kept: p*(1) is DPO's 0.2 and token 0 takes the rest.
    t = compose({"dpo": z_dpo, "rev": z_rev}, spec(keep_eos=1), 2)
    torch.testing.assert_close(t.logits.exp(), torch.tensor([[0.8, 0.2]]))


def test_realpha_applies_the_cap_from_the_stored_tvd():
    fields = {"tvd": torch.tensor([0.01, 0.5]), "alpha": torch.zeros(2), "coef": torch.zeros(2)}
    out = realpha(fields, spec(alpha_scale=10.0, alpha_eps=0.0, alpha_max=2.0))
    torch.testing.assert_close(out["alpha"], torch.tensor([0.1, 2.0]))  # 10 * 0.01; 10 * 0.5 = 5 -> 2
    torch.testing.assert_close(out["coef"], torch.tensor([1.0, 0.05]))


def test_mirror_cosine_by_hand():
    ref = torch.zeros(1, 2)  # uniform: log p_ref = log 0.5 for both
    dpo = torch.log(torch.tensor([[0.8, 0.2]]))
    rev = torch.log(torch.tensor([[0.2, 0.8]]))
    # D_dpo = (log 1.6, log 0.4) and D_rev = (log 0.4, log 1.6): -D_rev = (log 2.5, log 0.625).
    d, m = torch.tensor([math.log(1.6), math.log(0.4)]), torch.tensor([math.log(2.5), math.log(0.625)])
    assert mirror_cosine(ref, dpo, rev).item() == pytest.approx((d @ m / d.norm() / m.norm()).item(), rel=1e-6)
    assert mirror_cosine(ref, dpo, dpo).item() == pytest.approx(-1.0, abs=1e-6)


def test_summarise_diagnostics_by_hand():
    parts = [{"ref": torch.tensor([0.1, 0.5]), "dpo": torch.tensor([0.2, 0.6]), "rev": torch.tensor([0.3, 0.7]),
              "teacher": torch.tensor([0.0, 0.2]), "mirror": torch.tensor([0.9, 0.1]),
              "alpha": torch.tensor([1.0, 2.0]), "tvd": torch.tensor([0.05, 0.1])},
             {"ref": torch.tensor([0.3]), "dpo": torch.tensor([0.4]), "rev": torch.tensor([0.5]),
              "teacher": torch.tensor([0.4]), "mirror": torch.tensor([0.5]), "alpha": torch.tensor([3.0]),
              "tvd": torch.tensor([0.15])}]
    out = summarise(parts, torch.tensor([False, True, True]), spec())
    assert out["responses_ending_in_eos"] == 2 and out["positions"] == 3
    assert out["p_eos_at_end"] == pytest.approx({"ref": 0.4, "dpo": 0.5, "rev": 0.6, "teacher": 0.3})
    assert out["p_eos_elsewhere"] == pytest.approx({"ref": 0.1, "dpo": 0.2, "rev": 0.3, "teacher": 0.0})
    assert out["mirror_cosine_median"] == pytest.approx(0.5)
    assert out["mirror_cosine_median_at_end"] == pytest.approx(0.3)  # median of 0.1 and 0.5
    assert out["alpha"]["p50"] == pytest.approx(2.0) and out["alpha"]["max"] == pytest.approx(3.0)
    assert out["tvd"]["p50"] == pytest.approx(0.1)
    assert out["warning"] is None  # the teacher's 0.3 against DPO's 0.5 at the ends: it stops


def test_stop_warning_names_both_options():
    health = {"p_eos_at_end": {"ref": 0.4, "dpo": 0.32, "rev": 0.4, "teacher": 1e-4}}
    assert "--alpha-max" in stop_warning(health) and "--no-extrapolate-eos" in stop_warning(health)
    assert stop_warning({"p_eos_at_end": {**health["p_eos_at_end"], "teacher": 0.1}}) is None


def test_head_check_uses_the_head_it_is_given():
    """precompute's hidden-format check compares the model's own logits with the head it is handed (the whole,
    gathered head of a sharded teacher): the model's head passes, any other is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligndistil_cli.core.errors import UserError
    from aligndistil_cli.data.encode import Encoded, collate
    from aligndistil_cli.model.loading import output_head, response_hidden
    from aligndistil_cli.teacher.compose import check_head_reproduces

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    batch = collate([Encoded([3, 4, 5], [6, 7, 2]), Encoded([8], [9, 2])], 0)
    with torch.no_grad():
        hidden = response_hidden(model, batch)
    weight, bias = output_head(model)
    check_head_reproduces(model, "m", batch, hidden, (weight.detach().clone(), bias), 40)
    other = weight.detach().clone()
    other[5] += 0.5
    with pytest.raises(UserError, match="m: the output head applied to the final hidden states"):
        check_head_reproduces(model, "m", batch, hidden, (other, bias), 40)
