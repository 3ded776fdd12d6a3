"""Model EMA (mmengine's semantics), layer-wise lr decay (timm's groups as the oracle), the
ClassyVision pre-logits head, and the refusals."""
import copy
import pytest
import torch

from vit_accel.config import ConfigError, load_recipe
from vit_accel.engine.ema import ModelEMA, check_ema_backend
from vit_accel.engine.optim import build_optimizer, check_optim_backend, param_groups, set_lr
from vit_accel.model import create_vit

TINY = dict(img_size=32, patch_size=8, depth=3, num_classes=5)


class MMEngineEMA:
    """mmengine ExponentialMovingAverage.update_parameters, transcribed (steps == 0: copy)."""

    def __init__(self, model, momentum):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.momentum, self.steps = momentum, 0

    def update_parameters(self, model):
        src = dict(model.named_parameters())
        for k, p_avg in self.module.named_parameters():
            if self.steps == 0:
                p_avg.data.copy_(src[k].data)
            else:
                p_avg.data.mul_(1 - self.momentum).add_(src[k].data, alpha=self.momentum)
        self.steps += 1


def _train_steps(model, opt, n, seed=0, start=0):
    """Steps start..n-1 of a run on fixed batches (batch k is the same whichever step a run starts at)."""
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        x = torch.randn(2, 3, 32, 32, generator=g)
        y = torch.randint(0, 5, (2,), generator=g)
        if k < start:
            continue
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        yield


def test_ema_follows_mmengine_and_resumes_exactly():
    torch.manual_seed(0)
    model = create_vit("vit-ti16", **dict(TINY, depth=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref = MMEngineEMA(model, 0.1)
    ema = ModelEMA(0.1, dict(model.named_parameters()))
    for i, _ in enumerate(_train_steps(model, opt, 6)):
        ref.update_parameters(model)
        ema.update(dict(model.named_parameters()))
        if i == 2:   # a checkpoint after 3 steps: weights, optimizer and EMA, as the trainer saves them
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ema.state_dict()))
    assert ema.steps == 6
    for name, p in ref.module.named_parameters():
        torch.testing.assert_close(ema.params[name], p, rtol=1e-6, atol=1e-7)
    # the first update copied the weights after step 1; the average now lags the weights
    lag = max((ema.params[n] - p).abs().max().item() for n, p in model.named_parameters())
    assert lag > 1e-4
    # resumed from the checkpoint, three more steps continue the same average, bit for bit
    weights, opt_state, ema_state = saved
    resumed = create_vit("vit-ti16", **dict(TINY, depth=1))
    resumed.load_state_dict(weights)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(opt_state)
    again = ModelEMA(0.1, dict(resumed.named_parameters()))
    again.load_state_dict(ema_state)
    assert again.steps == 3
    for _ in _train_steps(resumed, resumed_opt, 6, start=3):
        again.update(dict(resumed.named_parameters()))
    assert again.steps == 6
    for name in ema.params:
        assert torch.equal(again.params[name], ema.params[name]), name
    # a resume that lost the EMA (restarted from the resumed weights) ends elsewhere
    fresh = ModelEMA(0.1, dict(resumed.named_parameters()))
    fresh.update(dict(resumed.named_parameters()))
    assert max((fresh.params[n] - ema.params[n]).abs().max().item() for n in ema.params) > 1e-4


def test_ema_swapped_in_for_evaluation_restores_the_weights_bit_for_bit():
    torch.manual_seed(0)
    model = create_vit("vit-ti16", **TINY)
    ema = ModelEMA(0.5, dict(model.named_parameters()))
    ema.update(dict(model.named_parameters()))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(dict(model.named_parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    with ema.swapped_in(dict(model.named_parameters())):
        assert torch.equal(model.pos_embed, ema.params["pos_embed"])
        out_ema = model(x)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert not torch.allclose(out_ema, model(x))


def test_ema_refused_in_one_line_where_it_cannot_see_full_weights():
    r = load_recipe("vit-b16-scratch")
    check_ema_backend(r, "gpu")
    r.distributed.zero_stage = 3
    with pytest.raises(ConfigError, match="zero_stage 3.*use zero_stage 0, 1 or 2.*train.ema_momentum=0") as e:
        check_ema_backend(r, "gpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="ipu backend"):
        check_ema_backend(r, "ipu")
    r.train.ema_momentum = 1.5
    with pytest.raises(ConfigError, match=r"train.ema_momentum 1.5 must be in \[0, 1\)"):
        check_ema_backend(r, "cpu")


def test_layer_decay_groups_match_timm():
    timm = pytest.importorskip("timm")
    from timm.optim._param_groups import param_groups_layer_decay

    r = load_recipe("vit-b16-scratch", ["optim.layer_decay=0.65"])   # no decay on 1-D, cls_token, pos_embed
    ours_model = create_vit("vit-ti16", img_size=32, patch_size=8, depth=3, num_classes=5)
    ref_model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=3,
                                                                 num_heads=3, num_classes=5)
    theirs, ref_ids = {}, {id(p): n for n, p in ref_model.named_parameters()}
    for g in param_groups_layer_decay(ref_model, weight_decay=0.3, no_weight_decay_list=ref_model.no_weight_decay(),
                                      layer_decay=0.65):
        for p in g["params"]:
            theirs[ref_ids[id(p)]] = (g["lr_scale"], g["weight_decay"])
    ids = {id(p): n for n, p in ours_model.named_parameters()}
    ours = {}
    for g in param_groups(ours_model, r.optim):
        for p in g["params"]:
            ours[ids[id(p)]] = (g["lr_scale"], g["weight_decay"])
    assert ours.keys() == theirs.keys()
    for n in ours:
        if n.startswith("norm."):  # mmpretrain's get_layer_depth / MAE: after the blocks; timm: with the last block
            assert ours[n] == (1.0, 0.0) and theirs[n] == (0.65, 0.0)
        else:
            assert ours[n] == pytest.approx(theirs[n]), n
    assert ours["pos_embed"][0] == pytest.approx(0.65 ** 4) and ours["head.weight"][0] == 1.0

    opt = build_optimizer(ours_model, r.optim)
    set_lr(opt, 2e-3)
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == sorted(
        {round(2e-3 * 0.65 ** k, 12) for k in range(5)})


def test_layer_decay_off_keeps_two_groups_and_runs_on_every_backend():
    r = load_recipe("vit-b16-ft")
    model = create_vit("vit-ti16", **TINY)
    groups = param_groups(model, r.optim)
    assert len(groups) == 2 and all("lr_scale" not in g for g in groups)
    r.optim.layer_decay = 0.75
    for backend in ("cpu", "gpu", "ipu"):  # the ipu backend pushes each group's rate (tests/test_ipu.py)
        check_optim_backend(r.optim, backend)
    r.optim.layer_decay = 1.5
    with pytest.raises(ConfigError, match=r"optim.layer_decay 1.5 must be in \(0, 1\]"):
        param_groups(model, r.optim)


def test_classyvision_recipes_decay_every_parameter_and_mmpretrain_exempts_its_own():
    model = create_vit("vit-ti16", representation_size=24, **TINY)
    classy = param_groups(model, load_recipe("vit-b16-classy").optim)
    assert len(classy) == 1 and classy[0]["weight_decay"] == 0.3          # only BatchNorm is exempt there
    mmp = param_groups(model, load_recipe("vit-b16-scratch").optim)
    ids = {id(p): n for n, p in model.named_parameters()}
    exempt = {ids[id(p)] for g in mmp if g["weight_decay"] == 0 for p in g["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias", "pre_logits.fc.bias"} <= exempt
    assert not any(n.endswith(".weight") and model.get_parameter(n).ndim > 1 for n in exempt)


def test_classyvision_head_has_a_lecun_normal_tanh_pre_logits_layer():
    r = load_recipe("vit-l16-classy")
    assert r.model.representation_size == 4096 and load_recipe("vit-b16-classy").model.representation_size == 3072
    torch.manual_seed(0)
    model = create_vit("vit-b16", img_size=32, patch_size=16, depth=1, num_classes=10, representation_size=3072)
    fc = model.pre_logits.fc
    assert (fc.in_features, fc.out_features) == (768, 3072)
    assert fc.weight.std().item() == pytest.approx((1 / 768) ** 0.5, rel=0.02)   # not timm's 0.02
    assert torch.count_nonzero(fc.bias) == 0 and torch.count_nonzero(model.head.weight) == 0
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)[:, 0]
    torch.testing.assert_close(model(x), model.head(torch.tanh(fc(feats))))


def test_optimizer_settings_per_recipe():
    model = create_vit("vit-ti16", **TINY)
    mmp = build_optimizer(model, load_recipe("vit-b16-scratch").optim)
    assert isinstance(mmp, torch.optim.AdamW)
    assert (mmp.defaults["betas"], mmp.defaults["eps"], mmp.defaults["weight_decay"]) == ((0.9, 0.95), 1e-8, 0.3)
    assert mmp.param_groups[0]["lr"] == pytest.approx(1e-4 * 4096 / 256)
    classy = build_optimizer(model, load_recipe("vit-l16-classy").optim)
    assert (classy.defaults["betas"], classy.defaults["eps"], classy.defaults["lr"]) == ((0.9, 0.999), 1e-8, 0.003)
    ft = build_optimizer(model, load_recipe("vit-b16-classy-ft-384").optim)
    assert isinstance(ft, torch.optim.SGD)
    assert (ft.defaults["nesterov"], ft.defaults["momentum"], ft.defaults["weight_decay"]) == (True, 0.9, 0.0)


def test_eval_ema_needs_a_checkpoint_with_an_ema(tmp_path):
    from vit_accel.engine.ema import load_ema_weights

    model = create_vit("vit-ti16", **TINY)
    path = tmp_path / "step.pt"
    torch.save({"format": "vit-accel-train", "model": model.state_dict()}, path)
    with pytest.raises(ConfigError, match="holds no EMA weights.*evaluate without --ema"):
        load_ema_weights(model, str(path))
    ema = ModelEMA(0.5, dict(model.named_parameters()))
    ema.update({n: p + 1 for n, p in model.named_parameters()})
    torch.save({"format": "vit-accel-train", "model": model.state_dict(), "ema": ema.state_dict()}, path)
    assert load_ema_weights(model, str(path)) == 1
    assert torch.equal(model.pos_embed, ema.params["pos_embed"])
    with pytest.raises(ConfigError, match="do not fit this model"):
        load_ema_weights(create_vit("vit-ti16", **dict(TINY, img_size=64)), str(path))
