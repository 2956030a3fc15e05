"""A few training steps of a tiny SLoPe model in any layout, for the layout-parity tests.

Every layout sees the same global batch (a fixed batch, so the loss must fall) and the
adapters switch on at step SWITCH, inside the window. `train_losses` returns the per-step
global mean loss and a dict of optional facts: optimizer-state step counts (check_state)
and, on rank 0, the trained model consolidated to the TP = 1, unpipelined state dict
(final_state; as the inference artifact is written). `initial_full_state` gives the TP = 1
view of a freshly built model.
"""
import torch

STEPS, SWITCH = 6, 3
GLOBAL_BATCH, MICRO = 8, 2


def tiny_config(tp=1, pp=1, stage=0, extra=()):
    from slope_megatron.config import load_config

    # grad_clip is small so that clipping is active: a wrong global norm changes the losses
    return load_config(None, ["model.vocab_size=128", "model.hidden_size=32", "model.num_heads=4",
                              "model.seq_len=16", "model.num_layers=2", f"zero.stage={stage}",
                              "optimizer.grad_clip=0.05",
                              "adapters.rank=2", f"parallel.tensor={tp}",
                              f"parallel.pipeline={pp}", f"train.micro_batch_size={MICRO}",
                              f"train.global_batch_size={GLOBAL_BATCH}", *extra])


def train_losses(tp=1, stage=0, check_state=False, arch="gpt", pp=1, extra=(),
                 final_state=False):
    from slope_megatron.parallel import initialize_parallel
    from slope_megatron.sparsity import after_optimizer_step
    from slope_megatron.distributed import init_distributed
    from slope_megatron.training.engine import build_engine
    from slope_megatron.training.optimizer import base_optimizer, set_lr, switch_on_adapters

    cfg = tiny_config(tp, pp, stage, [f"model.arch={arch}", *extra])
    d = init_distributed()
    par = initialize_parallel(tp, pp) if tp * pp > 1 else None
    dp_rank, dp = (par.dp_rank, par.dp_size) if par else (d.rank, d.world_size)
    model, engine, opt = build_engine(cfg, par, dp)
    ids = torch.randint(0, 128, (GLOBAL_BATCH, 17), generator=torch.Generator().manual_seed(1))
    per_rank = GLOBAL_BATCH // dp
    mine = ids[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    losses, info = [], {}
    for step in range(STEPS):
        if step == SWITCH:
            if check_state:
                w = model.blocks[1].mlp.fc1.weight
                info["weight_step_before"] = int(base_optimizer(opt).state[w]["step"])
            switch_on_adapters(model, opt, cfg)
        set_lr(opt, 1e-2)
        total = 0.0
        if pp > 1:  # the pipeline engine runs all micro-batches and the step itself
            micro = [(mine[i:i + MICRO, :-1], mine[i:i + MICRO, 1:])
                     for i in range(0, per_rank, MICRO)]
            total = engine.train_batch(iter(micro)).item() * len(micro)
        else:
            for i in range(0, per_rank, MICRO):
                x = mine[i:i + MICRO]
                loss = engine(x[:, :-1], x[:, 1:])
                engine.backward(loss)
                engine.step()
                total += loss.item()
        after_optimizer_step(model)
        t = torch.tensor([total / (per_rank // MICRO)])
        torch.distributed.all_reduce(t)
        losses.append(t.item() / d.world_size)
    if check_state:
        layer = model.blocks[1].mlp.fc1
        state = base_optimizer(opt).state
        info["weight_step_after"] = int(state[layer.weight]["step"])
        info["adapter_step_after"] = int(state[layer.adapter_a]["step"])
    if final_state:  # collective; the state dict on rank 0 only
        from slope_megatron.training.checkpoint import consolidated_state_dict

        state = consolidated_state_dict(engine, cfg, par)
        if state is not None:
            info["state"] = state
    return losses, info


def initial_full_state(tp=1, arch="gpt"):
    """The TP = 1 view of a freshly built model (gathered from shards when TP > 1)."""
    import torch.distributed as dist

    from slope_megatron.model import GPTModel
    from slope_megatron.parallel import initialize_parallel
    from slope_megatron.parallel.gather import gather_full_state_dict

    cfg = tiny_config(tp, 1, 0, [f"model.arch={arch}", "model.tie_embeddings=false"])
    dist.init_process_group("gloo")
    par = initialize_parallel(tp, 1) if tp > 1 else None
    torch.manual_seed(0)
    model = GPTModel.from_config(cfg, par)
    state = gather_full_state_dict(model) if par else model.state_dict()
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
