"""`sparsity.double_prune: false`: plain static N:M training (the static-2:4 arm of the quality study).

Forward and dW are SLoPe's; only the input gradient changes: dX = dY (W*M) instead of
dY (W*M*M_C). Checked against an independent float64 formula, against the double-pruned
layer, through the model, the config, the backends, tensor parallelism and the run identity
(runs saved before the key existed still resume).
"""
import logging

import pytest
import torch

from helpers.dist import run_distributed
from helpers.train import fixed_batch_losses
from slope_megatron.config import Config, ConfigError, config_reference, load_config
from slope_megatron.model import GPTModel
from slope_megatron.sparsity import SlopeLinear, after_optimizer_step, slope_layers
from slope_megatron.sparsity.backends import cusparselt as cslt
from slope_megatron.sparsity.backends.auto import AutoBackend
from slope_megatron.sparsity.backends.reference import ReferenceBackend


def twin_layers(inn=32, out=24, seed=0, **kw):
    """The same random layer (same init, mask and values) with and without double pruning."""
    layers = []
    for double_prune in (True, False):
        torch.manual_seed(seed)
        layers.append(SlopeLinear(inn, out, double_prune=double_prune, **kw).double())
    with torch.no_grad():
        layers[0].bias.normal_()
        layers[1].bias.copy_(layers[0].bias)
    return layers


def run(layer, x, dy):
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    y.backward(dy)
    return y.detach(), xg.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_input_gradient_is_dy_times_masked_weight(n, m):
    slope, static = twin_layers(64, 32, n=n, m=m)
    assert torch.equal(slope.mask, static.mask) and torch.equal(slope.weight, static.weight)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    dy = torch.randn(3, 5, 32, dtype=torch.float64)
    y_s, dx_s, dw_s, db_s = run(slope, x, dy)
    y_t, dx_t, dw_t, db_t = run(static, x, dy)
    # independent formula: scatter the kept values by hand, no project helper
    w = torch.zeros(32, 64, dtype=torch.float64)
    w[static.mask] = static.weight.detach().reshape(-1)
    torch.testing.assert_close(dx_t, dy @ w)
    assert not torch.allclose(dx_s, dx_t)  # the double-pruned one differs
    assert torch.equal(y_s, y_t) and torch.equal(dw_s, dw_t) and torch.equal(db_s, db_t)
    torch.testing.assert_close(dw_t, (dy.reshape(-1, 32).t() @ x.reshape(-1, 64))[static.mask]
                               .view(32, -1))


def test_column_mask_is_the_static_mask_and_never_recomputed():
    torch.manual_seed(1)
    layer = SlopeLinear(16, 16, column_mask_refresh=1, double_prune=False)
    assert torch.equal(layer.column_mask, layer.mask)
    assert "double_prune=False" in repr(layer)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(5):
        x = torch.randn(8, 16, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        torch.testing.assert_close(x.grad, torch.ones(8, 16) @ layer.dense_weight().detach())
        opt.step()
        opt.zero_grad()
        after_optimizer_step(layer)
        assert torch.equal(layer.column_mask, layer.mask) and layer.column_mask_step == -1
    torch.testing.assert_close(layer.double_pruned_weight(), layer.dense_weight())


def test_state_dict_format_is_unchanged_both_ways():
    slope, static = twin_layers()
    assert slope.state_dict().keys() == static.state_dict().keys()
    assert slope.get_extra_state().keys() == static.get_extra_state().keys()
    static.load_state_dict(slope.state_dict())  # e.g. a checkpoint written before the option
    slope.load_state_dict(static.state_dict())
    x, dy = torch.randn(4, 32, dtype=torch.float64), torch.randn(4, 24, dtype=torch.float64)
    w = static.dense_weight().detach()
    torch.testing.assert_close(run(static, x, dy)[1], dy @ w)  # still W*M, whatever was loaded


def test_backends_never_run_it_on_sparse_kernels(caplog):
    slope, static = twin_layers(64, 32)
    assert cslt.static_unsupported_reason(static) == cslt.NO_DOUBLE_PRUNING
    assert "double pruning is off" in cslt.NO_DOUBLE_PRUNING

    def measure(*a):
        raise AssertionError("a layer without double pruning must not be timed")
    dense = ReferenceBackend()
    sparse = ReferenceBackend()
    sparse.linear = lambda layer, x: pytest.fail("routed to the sparse path")
    be = AutoBackend(sparse=sparse, dense=dense, measure=measure,
                     eligible=lambda layer, x: None)  # as if cusparselt could take the shape
    static.backend = be
    x = torch.randn(16, 64, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="slope_megatron.sparsity.backends.auto"):
        static(x)
    (decision,) = be.decisions.values()
    assert decision.backend == "reference" and "double pruning is off" in decision.reason
    assert "-> reference (cusparselt cannot take it: double pruning is off" in caplog.text
    # the explicit cusparselt backend falls back to the reference math (dX = dY (W*M))
    torch.manual_seed(0)
    fast = SlopeLinear(64, 32, backend="cusparselt", double_prune=False).double()
    xg = x.clone().requires_grad_(True)
    fast(xg).sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones(16, 32, dtype=torch.float64)
                               @ fast.dense_weight().detach())


def test_config_key_and_override():
    assert load_config(None).sparsity.double_prune is True
    cfg = load_config(None, ["sparsity.double_prune=false"])
    assert cfg.sparsity.double_prune is False
    with pytest.raises(ConfigError, match="sparsity.double_prune"):
        load_config(None, ["sparsity.double_prune=3"])
    assert "| `sparsity.double_prune` | `True` |" in config_reference()


def _tiny(*overrides):
    cfg = load_config(None, ["model.vocab_size=96", "model.hidden_size=32", "model.num_heads=4",
                             "model.num_layers=2", "model.seq_len=16", *overrides])
    return GPTModel.from_config(cfg)


def test_model_without_double_pruning_trains():
    torch.manual_seed(0)
    model = _tiny("sparsity.double_prune=false", "sparsity.column_mask_refresh=1")
    layers = list(slope_layers(model))
    assert layers and all(not layer.double_prune for layer in layers)
    losses = fixed_batch_losses(model)
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(layer.column_mask, layer.mask) for layer in layers)


def test_only_the_input_gradient_differs_in_the_model():
    grads = {}
    for flag in ("true", "false"):
        torch.manual_seed(0)
        model = _tiny(f"sparsity.double_prune={flag}").double()
        ids = torch.randint(0, 96, (2, 17))
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        grads[flag] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    assert grads["true"][0] == grads["false"][0]  # same forward
    last = max(n for n in grads["true"][1] if n.startswith("blocks.1.mlp.fc2"))
    # the last sparse linear's dW sees the same dY in both; earlier layers see different dX
    torch.testing.assert_close(grads["true"][1][last], grads["false"][1][last])
    assert not torch.allclose(grads["true"][1]["blocks.0.attn.qkv.weight"],
                              grads["false"][1]["blocks.0.attn.qkv.weight"])


def tp_worker(tp, kind):
    import torch.distributed as dist

    from slope_megatron.parallel import ColumnParallelLinear, RowParallelLinear, \
        initialize_parallel

    dist.init_process_group("gloo")
    st = initialize_parallel(tp, 1)
    r, inn, out = st.tp_rank, 32, 48
    init = lambda t: torch.nn.init.normal_(t, 0, 0.5)  # noqa: E731
    kw = dict(n=2, m=4, column_mask_refresh=1, backend="reference", double_prune=False)
    torch.manual_seed(0)
    ref = SlopeLinear(inn, out, init_method=init, **kw)
    torch.manual_seed(0)
    cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
    par = cls(inn, out, False, init, tp, r, st.tp_group, sparse_kw=kw)
    torch.manual_seed(1)
    x, dy = torch.randn(2, 5, inn), torch.randn(2, 5, out)
    xr = x.clone().requires_grad_(True)
    ref(xr).backward(dy)
    rows, cols = torch.arange(out).chunk(tp)[r], torch.arange(inn).chunk(tp)[r]
    if kind == "column":
        xp = x.clone().requires_grad_(True)
        par(xp).backward(dy[..., rows])
        want = xr.grad
    else:
        xp = x[..., cols].clone().requires_grad_(True)
        par(xp).backward(dy)
        want = xr.grad[..., cols]
    w = ref.dense_weight().detach()
    return {"local_flag": not par.local.double_prune,
            "dx_sharded": torch.allclose(xp.grad, want, atol=1e-5),
            "dx_formula": torch.allclose(xr.grad, dy @ w, atol=1e-5)}


@pytest.mark.parametrize("kind", ["column", "row"])
def test_tensor_parallel_layers_honour_it(kind):
    for ok in run_distributed(tp_worker, 2, 2, kind):
        assert all(ok.values()), ok


def test_runs_saved_before_the_key_existed_still_resume(tmp_path):
    from helpers.run_dir import recorded_run

    from slope_megatron.training.run_dir import check_output_dir
    from slope_megatron.training.run_identity import identity_diff, identity_of

    old = Config().to_dict()
    del old["sparsity"]["double_prune"]
    recorded_run(tmp_path, old)  # a checkpoint exists: run_config.yaml binds
    check_output_dir(load_config(None), tmp_path)  # default True: the same run
    with pytest.raises(ConfigError, match="sparsity.double_prune"):
        check_output_dir(load_config(None, ["sparsity.double_prune=false"]), tmp_path)
    # the checkpoint manifests' identity follows the same rule
    old_ident = identity_of(old)
    assert identity_diff(old_ident, identity_of(Config().to_dict())) == []
    new = load_config(None, ["sparsity.double_prune=false"]).to_dict()
    assert identity_diff(old_ident, identity_of(new)) == ["sparsity.double_prune"]
