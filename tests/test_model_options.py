"""GPT's speedrun options (QK-norm, relu^2, zero-initialised projections, logit soft-capping, untied
embeddings): each does what it says, and with all of them off the model is GPT-2's, weight for weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.export.gpt2 import gpt2_config
from lmlab.models import GPT
from lmlab.models.gpt import QKNormAttention

SIZES = dict(vocab_size=13, d_model=16, n_layer=2, n_head=2, block_size=8)


def gpt(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(**SIZES, **options).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 13, (2, 8), generator=torch.Generator().manual_seed(1))


def test_every_option_off_is_the_plain_gpt_weight_for_weight():
    plain, off = gpt(), gpt(qk_norm=False, relu_squared=False, zero_init_projections=False, logit_softcap=None)
    assert plain.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], off.state_dict()[k]) for k in plain.state_dict())
    assert torch.equal(plain(tokens())[0], off(tokens())[0]) and plain.lm_head.weight is plain.wte.weight


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """Scaling the query and key rows of qkv by 10 changes plain attention, not the normalised one."""
    for qk_norm in (False, True):
        model = gpt(qk_norm=qk_norm)
        before = model(tokens())[0]
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight[: 2 * 16].mul_(10.0)  # q and k rows; v untouched
        changed = not torch.allclose(model(tokens())[0], before, atol=1e-5)
        assert changed != qk_norm
        assert all(isinstance(b.attn, QKNormAttention) == qk_norm for b in model.blocks)


def test_relu_squared_mlp_computes_proj_of_relu_of_fc_squared():
    model = gpt(relu_squared=True)
    mlp, x = model.blocks[0].mlp, torch.randn(3, 16)
    assert torch.allclose(mlp(x), mlp.proj(F.relu(mlp.fc(x)) ** 2), atol=1e-6)
    assert not torch.allclose(gpt()(tokens())[0], model(tokens())[0])


def test_zero_initialised_projections_make_every_block_start_as_the_identity():
    model = gpt(zero_init_projections=True)
    projections = [w for n, w in model.blocks.named_parameters() if n.endswith("proj.weight")]
    assert len(projections) == 4 and all(torch.count_nonzero(w) == 0 for w in projections)
    idx = tokens()
    skipped = model.lm_head(model.ln_f(model.wte(idx) + model.wpe(torch.arange(8))))
    assert torch.allclose(model(idx)[0], skipped, atol=1e-6)
    assert torch.count_nonzero(model.blocks[0].attn.qkv.weight) > 0  # only the projections into the stream


def test_logit_softcap_is_c_tanh_of_the_uncapped_logits():
    capped = gpt(logit_softcap=0.05)
    logits = capped(tokens())[0]
    capped.logit_softcap = None
    uncapped = capped(tokens())[0]
    assert torch.allclose(logits, 0.05 * torch.tanh(uncapped / 0.05), atol=1e-7)
    assert logits.abs().max() < 0.05 < uncapped.abs().max()


def test_untied_embeddings_give_the_output_layer_its_own_matrix():
    tied, untied = gpt(), gpt(tie_weights=False)
    assert untied.lm_head.weight is not untied.wte.weight
    n_rows, d_model = untied.lm_head.weight.shape
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == n_rows * d_model


@pytest.mark.parametrize("cap", [0.0, -1.0])
def test_a_cap_that_is_not_positive_is_refused_in_one_line(cap):
    with pytest.raises(
        ValueError, match=rf"logit_softcap must be > 0 or null \(got {cap}\): set model.logit_softcap"
    ) as raised:
        gpt(logit_softcap=cap)
    assert "\n" not in str(raised.value)


def test_exporting_to_gpt2_refuses_what_gpt2_cannot_compute():
    assert gpt2_config(gpt(zero_init_projections=True, tie_weights=False))["tie_word_embeddings"] is False
    with pytest.raises(ConfigError, match="model.qk_norm, model.logit_softcap computes what GPT2LMHeadModel cannot"):
        gpt2_config(gpt(qk_norm=True, logit_softcap=30.0))
